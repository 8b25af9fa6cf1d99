"""Sparse autoencoders: metrics against their textbook definitions, recovery of known features,
activation streams and stores, interventions and dashboards. Their files: test_files.py; their
training: test_training.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import workbench
from workbench.errors import CheckpointError, InputError
from workbench.report.dashboards import render_dashboards
from workbench.sae import (
    ActivationStore,
    ReconstructionStats,
    SAEConfig,
    SAETrainConfig,
    SyntheticFeatures,
    TensorSource,
    make_sae,
    mmcs,
    stream_activations,
    train_sae,
)
from workbench.sae.features import collect_feature_data
from workbench.sae.interventions import downstream_metrics, feature_hook, splice_hook
from workbench.sae.kernels import sparse_code, topk_indices
from workbench.sae.metrics import cosine, explained_variance, fvu, l0, l1, l2_ratio, mse_per_token

ROOT = Path(__file__).resolve().parents[3]  # the checkout (its tests/workbench would shadow the package)


# -- metrics --------------------------------------------------------------------------------------------
def test_metrics_match_their_textbook_definitions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=gen) + 3
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-6)  # predicting the mean
    assert explained_variance(x, x) == pytest.approx(1.0)  # a perfect reconstruction
    noisy = x + 0.1 * torch.randn(500, 8, generator=gen)
    r2 = 1 - ((x - noisy) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu(x, noisy) == pytest.approx(float(1 - r2), rel=1e-5)
    assert mse_per_token(x, noisy) == pytest.approx(float(((x - noisy) ** 2).sum(1).mean()), rel=1e-6)
    f = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 0.5]])
    assert l0(f) == 1.5 and l1(f) == pytest.approx(1.75)
    assert cosine(x, 2 * x) == pytest.approx(1.0) and l2_ratio(x, 0.5 * x) == pytest.approx(0.5)


def test_streamed_statistics_do_not_depend_on_the_batch_size():
    gen = torch.Generator().manual_seed(1)
    x, x_hat = torch.randn(600, 8, generator=gen), torch.randn(600, 8, generator=gen)
    f = torch.relu(torch.randn(600, 16, generator=gen))
    whole, parts = ReconstructionStats(16), ReconstructionStats(16)
    whole.add(x, x_hat, f)
    for i in range(0, 600, 7):
        parts.add(x[i:i + 7], x_hat[i:i + 7], f[i:i + 7])
    a, b = whole.summary(), parts.summary()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key
    assert a["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-6) and a["mse"] == pytest.approx(mse_per_token(x, x_hat))


# -- recovering known features --------------------------------------------------------------------------
DATA = SyntheticFeatures(n_features=128, d=64, mean_active=5, seed=0)


@pytest.fixture(scope="module")
def synthetic():
    x, _ = DATA.sample(200_000)
    return x


def _fit(x, arch, d_sae, steps=1500, **sae_kwargs):
    cfg = SAETrainConfig(sae=SAEConfig(d_in=64, d_sae=d_sae, architecture=arch, **sae_kwargs),
                         n_tokens=steps * 1024, batch_size=1024, lr=1e-3, n_checkpoints=0)
    sae, _ = train_sae(cfg, TensorSource(x, 1024), progress=False)
    with torch.no_grad():
        xs = x[:20_000]
        f = sae.encode(xs)
        stats = ReconstructionStats(d_sae)
        stats.add(xs, sae.decode(f), f)
    return sae, stats.summary()


@pytest.mark.parametrize("expansion", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_topk_at_the_true_l0_recovers_the_features(synthetic, expansion):
    sae, s = _fit(synthetic, "topk", 128 * expansion, k=5)
    score, recovered = mmcs(DATA.directions, sae.W_dec)
    assert score >= 0.95 and recovered > 0.9 and s["dead_fraction"] < 0.01


@pytest.mark.slow
def test_l1_recovers_the_features_and_topk_reconstructs_better_at_matched_l0(synthetic):
    sae, s_l1 = _fit(synthetic, "relu", 128, l1_coefficient=3.0)
    assert mmcs(DATA.directions, sae.W_dec)[0] >= 0.95
    _, s_topk = _fit(synthetic, "topk", 128, k=round(s_l1["l0"]))
    assert abs(s_topk["l0"] - s_l1["l0"]) < 1.0 and s_topk["fvu"] <= s_l1["fvu"]


@pytest.mark.slow
def test_a_half_size_dictionary_cannot_recover_them(synthetic):
    sae, _ = _fit(synthetic, "topk", 64, k=5)
    assert mmcs(DATA.directions, sae.W_dec)[0] < 0.85


def test_topk_sparse_training_path_has_the_dense_gradients():
    """TopK trains through a sparse decoder and a sparse encoder backward; the loss and every
    gradient must equal plain autograd through the dense latents (AuxK included)."""
    torch.manual_seed(0)
    sparse = make_sae(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4, aux_k=8))
    dense = make_sae(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4, aux_k=8))
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sparse.train_forward(x)
    ((out.x_hat - x).pow(2).sum(-1).mean() + sparse.aux_loss(x, out, dead)).backward()
    pre = dense.pre_acts(x)
    f = dense.activate(pre)
    x_hat = dense.decode(f)
    residual = (x - x_hat).detach()
    idx = pre.detach().masked_fill(~dead, float("-inf")).topk(8, dim=-1).indices
    f_aux = torch.zeros_like(pre).scatter(-1, idx, pre.gather(1, idx))  # no ReLU: dead latents' pre is mostly < 0
    aux = (f_aux @ dense.W_dec - residual).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    ((x_hat - x).pow(2).sum(-1).mean() + dense.cfg.aux_coefficient * aux).backward()
    assert torch.allclose(out.x_hat, x_hat, atol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(sparse, name).grad, getattr(dense, name).grad, atol=1e-5), name


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("centred", [True, False])
def test_sparse_code_kernel_has_the_dense_gradients_for_every_input(relu, centred):
    """The sparse TopK kernel against autograd through dense latents, for x, b_dec (or none, as a
    transcoder), W_enc, b_enc and W_dec; latents repeat across tokens and some kept values are < 0."""
    gen = torch.Generator().manual_seed(1)
    B, d_in, d_sae, k = 24, 8, 20, 5
    x = torch.randn(B, d_in, generator=gen)
    params = {n: torch.randn(*shape, generator=gen) for n, shape in
              (("b_dec", (d_in,)), ("W_enc", (d_in, d_sae)), ("b_enc", (d_sae,)), ("W_dec", (d_sae, 6)))}
    g_out = torch.randn(B, 6, generator=gen)

    def run(sparse):
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        xi = x.clone().requires_grad_()
        b_dec = p["b_dec"] if centred else None
        xc = xi - b_dec if centred else xi
        pre = xc @ p["W_enc"] + p["b_enc"]
        idx = pre.detach().topk(k, dim=-1).indices
        if sparse:
            vals, decoded = sparse_code(xi, b_dec, p["W_enc"], p["b_enc"], p["W_dec"], idx, pre.detach(), relu=relu)
        else:
            vals = pre.gather(1, idx)
            vals = F.relu(vals) if relu else vals
            decoded = torch.zeros(B, d_sae).scatter(1, idx, vals) @ p["W_dec"]
        ((decoded * g_out).sum() + vals.pow(2).sum()).backward()
        grads = {n: t.grad for n, t in p.items() if t.grad is not None}
        return decoded.detach(), {"x": xi.grad, **grads}

    decoded, grads = run(True)
    ref_decoded, ref_grads = run(False)
    torch.testing.assert_close(decoded, ref_decoded)
    assert grads.keys() == ref_grads.keys() == {"x", "W_enc", "b_enc", "W_dec", *(["b_dec"] if centred else [])}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("n", [2048, 4096, 16384])
def test_blocked_topk_finds_exactly_the_k_largest(n):
    gen = torch.Generator().manual_seed(n)
    pre = torch.randn(64, n, generator=gen)
    pre[:8] = pre[:8].round()  # many ties
    pre[8:16, :40] += 10  # the largest values bunched in a few blocks
    pre[16:24] = pre[16:24].sort(dim=1).values  # and all at one end
    for k in (32, 256):  # k = 256: AuxK's k_aux at d_in 512, with smaller blocks
        idx = topk_indices(pre, k)
        assert idx.shape == (64, k) and all(len(set(row.tolist())) == k for row in idx)
        assert torch.equal(pre.gather(1, idx).sort(1).values, pre.topk(k, dim=1).values.sort(1).values)


def test_activations_stream_from_a_transformer_bridge(tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    rows = torch.randint(1, 280, (12, 16), generator=torch.Generator().manual_seed(0))
    batch = next(stream_activations(bridge, rows, ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"],
                                    batch_size=32, rows_per_forward=4, buffer_batches=2))
    assert batch["blocks.1.hook_resid_post"].shape == (32, 32)
    assert batch["blocks.0.attn.hook_z"].shape == (32, 32)  # per-head outputs, flattened: 2 heads × 16


# -- activation store ------------------------------------------------------------------------------------
def test_activation_store_round_trip_and_corrupt_shard(tmp_path):
    x = torch.arange(5000 * 4, dtype=torch.float32).view(5000, 4)
    store = ActivationStore.write(tmp_path / "store", iter(TensorSource(x, 250)), n_tokens=5000, shard_tokens=1200)
    assert store.n_tokens == 5000 and len(store.manifest["shards"]) == 5
    seen = torch.cat([b["x"] for b in store.batches(500, loop=False)])
    assert sorted(seen[:, 0].tolist()) == sorted(x[:, 0].tolist())  # every row once per epoch
    shard = tmp_path / "store" / store.manifest["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        list(ActivationStore(tmp_path / "store").batches(500, loop=False))


_PEAK_RSS = """
import resource, sys
from workbench.sae import ActivationStore
for batch in ActivationStore(sys.argv[1]).batches(4096, loop=False, verify=False):
    pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_reading_a_store_keeps_peak_memory_flat_as_it_grows(tmp_path):
    shard_tokens, d = 32_768, 128  # 16 MB per shard
    for n_shards in (2, 8):
        x = torch.randn(shard_tokens * n_shards, d)
        ActivationStore.write(tmp_path / f"s{n_shards}", iter(TensorSource(x, 8192)), len(x), shard_tokens)
    peaks = [int(subprocess.run([sys.executable, "-c", _PEAK_RSS, str(tmp_path / f"s{n}")], capture_output=True,
                                text=True, check=True, cwd=ROOT).stdout) for n in (2, 8)]
    grown_mb = (peaks[1] - peaks[0]) / 1024
    assert grown_mb < 24, f"peak RSS grew {grown_mb:.0f} MB for 6 more 16 MB shards"  # would be ~96 MB if held


# -- interventions and dashboards ------------------------------------------------------------------------
def _exact_sae(d: int, hook: str):
    """ReLU SAE with latents +x and −x: it reconstructs exactly."""
    sae = make_sae(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name=hook))
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_splicing_an_exact_sae_recovers_all_the_loss(attn_model, tokens):
    hook = "blocks.0.hook_resid_post"
    m = downstream_metrics(attn_model, _exact_sae(32, hook), tokens)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-5) and m["kl_div"] == pytest.approx(0, abs=1e-6)
    assert m["ce_loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    lossy = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name=hook))
    assert downstream_metrics(attn_model, lossy, tokens)["kl_div"] > 0


def test_splice_with_error_term_is_the_identity_and_ablation_only_moves_active_features(attn_model, tokens):
    hook = "blocks.0.hook_resid_post"
    sae = make_sae(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name=hook)).eval()
    clean = attn_model(tokens)
    assert torch.allclose(attn_model.run_with_hooks(tokens, fwd_hooks=[(hook, splice_hook(sae, keep_error=True))]),
                          clean, atol=1e-5)
    _, cache = attn_model.run_with_cache(tokens, names_filter=hook)
    f = sae.encode(cache[hook])
    active, silent = int(f[0, -1].argmax()), int((f == 0).all(0).all(0).nonzero()[0])
    ablated = attn_model.run_with_hooks(tokens, fwd_hooks=[(hook, feature_hook(sae, active))])
    untouched = attn_model.run_with_hooks(tokens, fwd_hooks=[(hook, feature_hook(sae, silent))])
    assert not torch.allclose(ablated, clean, atol=1e-4) and torch.allclose(untouched, clean, atol=1e-5)
    steered = attn_model.run_with_hooks(tokens, fwd_hooks=[(hook, feature_hook(sae, silent, add=10.0))])
    assert not torch.allclose(steered, clean, atol=1e-4)
    with pytest.raises(InputError, match="out of range"):
        feature_hook(sae, 64)


def test_dashboards_collect_the_right_top_activations(attn_model):
    hook = "blocks.1.hook_resid_post"
    sae = make_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=hook)).eval()
    rows = torch.randint(0, 256, (20, 24), generator=torch.Generator().manual_seed(0))
    data = collect_feature_data(attn_model, sae, rows, features=[0, 5, 9], top_n=4, rows_per_forward=6,
                                progress=False)
    with torch.no_grad():
        _, cache = attn_model.run_with_cache(rows, names_filter=hook)
        f = sae.encode(cache[hook])[:, 1:, [0, 5, 9]]  # position 0 (BOS) is never counted
    for j in range(3):
        assert data.top_values[j, 0] == pytest.approx(float(f[..., j].max()), rel=1e-5)
        assert data.density[j] == pytest.approx(float((f[..., j] > 0).float().mean()), rel=1e-5)
        assert list(data.top_values[j]) == sorted(data.top_values[j], reverse=True)
    pages = render_dashboards(data, "tiny")
    assert {"index.html", "feature_00005.html", "features.json"} <= set(pages)
    assert "sortBy" in pages["index.html"] and "<script src" not in pages["index.html"]  # sortable, offline
    assert "Top activations" in pages["feature_00009.html"]
    assert "A sample of 3 of the SAE's 64 latents (chosen by the caller)" in pages["index.html"]


def test_dashboards_show_bytes_and_newlines_as_escapes(attn_model):
    """Byte tokens used to show as '�' and a newline broke the row of a context."""
    hook = "blocks.1.hook_resid_post"
    sae = make_sae(SAEConfig(d_in=32, d_sae=8, architecture="relu", hook_name=hook)).eval()
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every latent fires everywhere: every token shows up in some context
    rows = torch.tensor([[256, 10, 0x8F, 65, 9, 0xC3, 0xA9, 66] * 3])
    data = collect_feature_data(attn_model, sae, rows, features=list(range(8)), top_n=24, progress=False)
    strings = data.token_strings[0]
    assert strings[:8] == ["<|endoftext|>", "\\n", "\\x8f", "A", "\\t", "\\xc3", "\\xa9", "B"]
    page = render_dashboards(data, "bytes")["feature_00003.html"]
    assert "\ufffd" not in page and "\\x8f" in page and "\n</span>" not in page
    assert "All 8 latents of the SAE." in render_dashboards(data, "bytes")["index.html"]
