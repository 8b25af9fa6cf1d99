"""Sparse autoencoders: metrics against their textbook definitions, recovery of known features,
files (round trip, SAELens layout, folding), training safety, activation stores, interventions
and dashboards."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import workbench
from tests.conftest import signal_on_call
from workbench.artifacts import read_log
from workbench.errors import CheckpointError, ConfigError, HookNameError, InputError
from workbench.report.dashboards import render_dashboards
from workbench.sae import (
    ActivationStore,
    ReconstructionStats,
    SAEConfig,
    SAETrainConfig,
    SyntheticFeatures,
    TensorSource,
    TrainingDiverged,
    load_sae,
    make_sae,
    mmcs,
    save_sae,
    stream_activations,
    train_sae,
    train_saes,
)
from workbench.sae import training as sae_training
from workbench.sae.features import collect_feature_data
from workbench.sae.interventions import downstream_metrics, feature_hook, splice_hook
from workbench.sae.kernels import sparse_code, topk_indices
from workbench.sae.metrics import cosine, explained_variance, fvu, l0, l1, l2_ratio, mse_per_token
from workbench.sae.modules import TopKSAE
from workbench.train.runs import TrainingInterrupted

ROOT = Path(__file__).resolve().parents[2]


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


# -- files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    sae = make_sae(SAEConfig(d_in=16, d_sae=48, architecture=arch, k=4, hook_name="blocks.0.hook_resid_post"))
    x = torch.randn(64, 16)
    if arch == "batchtopk":
        sae.train_forward(x)  # learns its inference threshold
    sae.eval()
    loaded = load_sae(save_sae(sae, tmp_path / arch))
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    weights = load_file(str(tmp_path / arch / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (16, 48) and weights["W_dec"].shape == (48, 16)
    if arch == "jumprelu":
        assert torch.equal(weights["threshold"], sae.threshold.detach())  # stored directly, not as a log


def _saelens_folder(folder: Path, architecture: str, extra: dict, weights: dict) -> Path:
    """Files as SAELens 6 writes them: its field names, its tensor keys."""
    folder.mkdir()
    cfg = {"architecture": architecture, "d_in": 8, "d_sae": 12, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "hook_head_index": None,
                        "prepend_bos": True, "dataset_path": "x", "context_size": 128}, **extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


@pytest.mark.parametrize("architecture,extra", [("standard", {}), ("topk", {"k": 3}), ("jumprelu", {})])
def test_loads_files_written_in_saelens_layout(tmp_path, architecture, extra):
    gen = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(8, 12, generator=gen), "b_enc": torch.randn(12, generator=gen),
         "W_dec": torch.randn(12, 8, generator=gen), "b_dec": torch.randn(8, generator=gen)}
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(12, generator=gen)
    sae = load_sae(_saelens_folder(tmp_path / architecture, architecture, extra, w))
    x = torch.randn(5, 8, generator=gen)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        f = torch.relu(pre)
    elif architecture == "topk":
        top = pre.topk(3, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        f = pre * (pre > w["threshold"])
    assert torch.allclose(sae.encode(x), f, atol=1e-6)
    assert torch.allclose(sae(x), f @ w["W_dec"] + w["b_dec"], atol=1e-5)
    assert sae.cfg.hook_name == "blocks.3.hook_resid_pre" and sae.cfg.model_name == "gpt2"


def test_bad_sae_files_are_clear_errors(tmp_path):
    w = {k: torch.zeros(*s) for k, s in {"W_enc": (8, 12), "b_enc": (12,), "W_dec": (12, 8), "b_dec": (8,)}.items()}
    with pytest.raises(CheckpointError, match="architecture"):
        load_sae(_saelens_folder(tmp_path / "gated", "gatedd", {}, w))
    with pytest.raises(CheckpointError, match="not an SAE folder"):
        load_sae(tmp_path / "nothing")
    bad = _saelens_folder(tmp_path / "short", "standard", {}, {**w, "W_dec": torch.zeros(12, 7)})
    with pytest.raises(CheckpointError, match="W_dec"):
        load_sae(bad)
    with pytest.raises(ConfigError, match="architecture"):
        SAEConfig(d_in=8, d_sae=12, architecture="gated")
    with pytest.raises(ConfigError, match="at most d_sae"):
        SAEConfig(d_in=8, d_sae=12, architecture="topk", k=32)
    sae = make_sae(SAEConfig(d_in=8, d_sae=12, architecture="relu"))
    with pytest.raises(InputError, match="d_in = 8"):
        sae.encode(torch.zeros(3, 9))


def test_folding_the_normalisation_changes_outputs_by_less_than_1e_5(tmp_path):
    x = torch.randn(4096, 16) * 40 + 5  # far from E‖x‖ = √d_in, so the scale is far from 1
    cfg = SAETrainConfig(sae=SAEConfig(d_in=16, d_sae=64, architecture="relu", l1_coefficient=1.0), n_tokens=20 * 512,
                         batch_size=512, n_checkpoints=0)
    sae, _ = train_sae(cfg, TensorSource(x, 512), out=tmp_path / "sae", progress=False)  # folds at the end
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["workbench"]
    scale = meta["activation_scale_folded"]
    assert scale < 0.5
    unfolded = make_sae(cfg.sae)
    unfolded.load_state_dict(sae.state_dict())
    unfolded.fold_scale(1 / scale)  # undo the fold: the SAE as trained, on scaled inputs
    with torch.no_grad():
        y_folded, y_trained = sae(x[:256]), unfolded(x[:256] * scale) / scale
    assert ((y_folded - y_trained).abs().max() / y_trained.abs().max()) < 1e-5


# -- training safety, resume, several SAEs ---------------------------------------------------------------
def test_nan_activations_stop_training_and_keep_the_last_checkpoint(tmp_path):
    x = torch.randn(4096, 8)
    source = iter(TensorSource(x, 256))

    def poisoned():
        for step, batch in enumerate(source):
            if step == 30:
                batch = {"x": batch["x"].clone().fill_(float("nan"))}
            yield batch

    cfg = SAETrainConfig(sae=SAEConfig(d_in=8, d_sae=32), n_tokens=50 * 256, batch_size=256, n_checkpoints=3)
    with pytest.raises(TrainingDiverged, match="NaN") as err:
        train_sae(cfg, poisoned(), out=tmp_path / "run", progress=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts and ckpts[-1].name in str(err.value)
    assert not (tmp_path / "run" / "cfg.json").exists()  # no half-trained SAE presented as finished


def _sae_cfg(**kw):
    base = dict(sae=SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4), n_tokens=60 * 256, batch_size=256,
                n_checkpoints=4, dead_window=1000)
    return SAETrainConfig(**{**base, **kw})


def _signal_at(source, step: int):
    """The batches of `source`, with a Ctrl-C sent while batch `step` is being produced."""
    for i, batch in enumerate(source):
        if i == step:
            os.kill(os.getpid(), signal.SIGINT)
        yield batch


SAE_X = torch.randn(8192, 8, generator=torch.Generator().manual_seed(3))
SAE_PHASES = {  # where in a step the Ctrl-C lands (see the LM trainer's test of the same)
    "data": None,
    "after optimizer.step": (torch.optim.Adam, "step", 21, True),
    "forward": (TopKSAE, "train_forward", 17, False),
    "checkpoint write": (sae_training, "write_state", 2, False),
}


@pytest.mark.parametrize("phase", list(SAE_PHASES))
def test_ctrl_c_in_any_phase_then_resume_is_bit_identical(tmp_path, monkeypatch, phase):
    cfg = _sae_cfg()
    straight, _ = train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "a", progress=False)
    source = TensorSource(SAE_X, 256)
    with monkeypatch.context() as m:
        if SAE_PHASES[phase] is None:
            source = _signal_at(source, 20)
        else:
            signal_on_call(m, *SAE_PHASES[phase])
        with pytest.raises(TrainingInterrupted) as stop:
            train_sae(cfg, source, out=tmp_path / "b", progress=False)
    assert stop.value.saved and stop.value.folder is not None
    with pytest.raises(InputError, match="unfinished SAE run"):  # a fresh start would lose the checkpoints
        train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", progress=False)
    resumed, _ = train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", resume=True, progress=False)
    assert torch.equal(straight.W_dec, resumed.W_dec) and torch.equal(straight.b_enc, resumed.b_enc)
    log_a = [{k: v for k, v in r.items() if k != "tok_per_s"} for r in read_log(tmp_path / "a" / "log.jsonl")]
    log_b = [{k: v for k, v in r.items() if k != "tok_per_s"} for r in read_log(tmp_path / "b" / "log.jsonl")]
    assert log_a == log_b  # no duplicated or missing records after the resume
    with pytest.raises(InputError, match="already holds"):
        train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "a", progress=False)


def test_resume_with_a_different_config_names_the_fields(tmp_path):
    cfg = _sae_cfg()
    with pytest.raises(TrainingInterrupted):
        train_sae(cfg, _signal_at(TensorSource(SAE_X, 256), 20), out=tmp_path / "b", progress=False)
    changed = replace(cfg, lr=3e-3, sae=replace(cfg.sae, k=8))
    with pytest.raises(ConfigError, match=r"lr \(0.001 → 0.003\).*sae.k \(4 → 8\)|sae.k \(4 → 8\).*lr"):
        train_sae(changed, TensorSource(SAE_X, 256), out=tmp_path / "b", resume=True, progress=False)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, capsys):
    cfg = _sae_cfg(log_every=5)
    with pytest.raises(TrainingInterrupted):  # the first checkpoint is at step 1: a kill before it leaves a log
        train_sae(cfg, _signal_at(TensorSource(SAE_X, 256), 0), out=tmp_path / "b", progress=False)
    for folder in (tmp_path / "b" / "checkpoints").iterdir():  # as if killed -9 before the checkpoint
        shutil.rmtree(folder)
    (tmp_path / "b" / "log.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    with pytest.raises(InputError, match="--resume|resume=True"):
        train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", progress=False)
    resumed, _ = train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", resume=True, progress=False)
    assert "starting from step 0" in capsys.readouterr().out
    straight, _ = train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "a", progress=False)
    assert torch.equal(straight.W_dec, resumed.W_dec)


def test_a_crafted_pickle_in_an_sae_checkpoint_is_never_run(tmp_path):
    cfg = _sae_cfg()
    with pytest.raises(TrainingInterrupted) as stop:
        train_sae(cfg, _signal_at(TensorSource(SAE_X, 256), 20), out=tmp_path / "b", progress=False)
    for name in ("training_state.safetensors", "training_state.json"):
        (stop.value.folder / name).unlink()
    marker = tmp_path / "pwned"
    (stop.value.folder / "training_state.pt").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError, match="not loaded"):
        train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", resume=True, progress=False)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # what an attacker's os.system would be
        return (open, (self.path, "w"))


def test_several_saes_resume_from_the_step_all_of_them_saved(tmp_path, monkeypatch):
    """A kill between two SAEs' checkpoints leaves them at different steps; resume must realign them."""
    cfgs = {"a": make_sae(SAEConfig(d_in=8, d_sae=32, k=4, hook_name="x"), seed=1),
            "b": make_sae(SAEConfig(d_in=8, d_sae=32, architecture="relu", hook_name="x"), seed=2)}
    cfg = _sae_cfg(sae=cfgs["a"].cfg)
    train_saes({k: make_sae(v.cfg, seed=i + 1) for i, (k, v) in enumerate(cfgs.items())},
               TensorSource(SAE_X, 256, name="x"), cfg, out=tmp_path / "s", progress=False)
    with pytest.raises(TrainingInterrupted):
        train_saes({k: make_sae(v.cfg, seed=i + 1) for i, (k, v) in enumerate(cfgs.items())},
                   _signal_at(TensorSource(SAE_X, 256, name="x"), 40), cfg, out=tmp_path / "r", progress=False)
    newest = sorted((tmp_path / "r" / "b" / "checkpoints").iterdir())[-1]
    shutil.rmtree(newest)  # b's newest checkpoint never made it to disk
    saes = {k: make_sae(v.cfg, seed=i + 1) for i, (k, v) in enumerate(cfgs.items())}
    train_saes(saes, TensorSource(SAE_X, 256, name="x"), cfg, out=tmp_path / "r", resume=True, progress=False)
    for name in ("a", "b"):
        ref = load_sae(tmp_path / "s" / name)
        assert torch.equal(ref.W_dec, load_sae(tmp_path / "r" / name).W_dec)


def test_several_saes_train_from_one_forward_pass(attn_model, monkeypatch):
    rows = torch.randint(0, 256, (40, 24), generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}
    real_forward = attn_model.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(attn_model, "forward", counting)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"]
    saes = {h: make_sae(SAEConfig(d_in=32, d_sae=64, k=4, hook_name=h)) for h in hooks}
    saes["second on the same hook"] = make_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=hooks[0]))
    cfg = SAETrainConfig(sae=saes[hooks[0]].cfg, n_tokens=10 * 128, batch_size=128, n_checkpoints=0, log_every=5)
    logs = train_saes(saes, stream_activations(attn_model, rows, hooks, batch_size=128, rows_per_forward=8,
                                               buffer_batches=2), cfg, progress=False)
    assert all(len(log) == 2 for log in logs.values())
    assert calls["n"] <= 10  # one forward per 8 rows, shared by all three SAEs (not three times as many)
    with pytest.raises(HookNameError, match="Did you mean"):
        next(stream_activations(attn_model, rows, ["blocks.0.hook_resid_pots"]))


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
