"""Circuits as FactoredMatrix objects, their statistics, composition scores, direct logit
attribution and path patching: each checked against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from transformer_lens import FactoredMatrix
from transformer_lens.patching import get_act_patch_direct_path

import workbench
from tests.conftest import tiny_config
from workbench.cache.collect import half_losses, parse_head, per_token_loss
from workbench.cache.rows import probe_tokens
from workbench.compute.logit_attribution import direct_logit_attribution
from workbench.compute.path_patching import path_patch
from workbench.compute.qk_ov import (
    composition_scores,
    copying_score,
    diagonal_fraction,
    direct_path,
    effective_rank,
    folded_weights,
    ov_circuit,
    pos_qk_circuit,
    qk_circuit,
    random_composition_baseline,
    sample_rows,
)
from workbench.errors import InputError


@pytest.fixture
def trained_like(attn_model):
    """The tiny model with non-trivial LayerNorm scales and biases, so that folding matters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in attn_model.named_parameters():
            if name.endswith((".w", ".b")) or name.startswith("blocks") and ".b_" in name:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen))
    return attn_model


def test_factored_circuits_equal_the_materialised_products(trained_like):
    w = folded_weights(trained_like)
    for l in range(2):
        for h in range(4):
            qk = w.W_E @ w.W_Q[l, h] @ w.W_K[l, h].T @ w.W_E.T
            pos = w.W_pos @ w.W_Q[l, h] @ w.W_K[l, h].T @ w.W_pos.T
            ov = w.W_E @ w.W_V[l, h] @ w.W_O[l, h] @ w.W_U
            assert torch.allclose(qk_circuit(w, l).AB[h], qk, atol=1e-5)
            assert torch.allclose(pos_qk_circuit(w, l).AB[h], pos, atol=1e-5)
            assert torch.allclose(ov_circuit(w, l).AB[h], ov, atol=1e-5)
    assert torch.allclose(direct_path(w).AB, w.W_E @ w.W_U, atol=1e-5)


def test_folded_weights_reproduce_the_models_queries(trained_like):
    """LN(x) W_Q + b_Q == (centred x / σ(x)) (folded W_Q) + (ln.b W_Q + b_Q): the fold is exact but for 1/σ."""
    tokens = torch.tensor([[5, 9, 200, 31, 7]])
    _, cache = trained_like.run_with_cache(tokens, names_filter="blocks.0.attn.hook_q")
    w = folded_weights(trained_like)
    x = trained_like.W_E[tokens[0]] + trained_like.W_pos[:5]
    sigma = (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    ln1, attn = trained_like.blocks[0].ln1, trained_like.blocks[0].attn
    folded_x = w.W_E[tokens[0]] + w.W_pos[:5]
    q = torch.einsum("sd,hdk->shk", folded_x / sigma, w.W_Q[0]) + torch.einsum("d,hdk->hk", ln1.b, attn.W_Q) + attn.b_Q
    assert torch.allclose(cache["blocks.0.attn.hook_q"][0], q, atol=1e-4)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_match_the_direct_formula(trained_like, mode):
    w = folded_weights(trained_like)
    scores = composition_scores(w, mode)
    assert scores[1, :, :, :].isnan().all() and scores[0, :, 0, :].isnan().all()  # only earlier -> later
    for a in range(4):
        for b in range(4):
            ov_a = w.W_V[0, a] @ w.W_O[0, a]
            right = {"Q": w.W_Q[1, b] @ w.W_K[1, b].T, "K": w.W_K[1, b] @ w.W_Q[1, b].T,
                     "V": w.W_V[1, b] @ w.W_O[1, b]}[mode]
            direct = (ov_a @ right).norm() / (ov_a.norm() * right.norm())
            assert scores[0, a, 1, b] == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("d_model,d_head", [(64, 16), (768, 64)])
def test_random_baseline_is_one_over_root_d_model(d_model, d_head):
    for mode in ("Q", "K", "V"):
        assert random_composition_baseline(d_model, d_head, mode, n_samples=32) == pytest.approx(
            1 / math.sqrt(d_model), rel=0.05)


def test_statistics_on_hand_built_circuits():
    eye = FactoredMatrix(torch.eye(6)[:, :4], torch.eye(6)[:4, :])  # the identity on 4 of 6 tokens
    rows = torch.arange(4)
    assert copying_score(eye) == pytest.approx(1.0)
    assert diagonal_fraction(eye, rows) == pytest.approx(1.0)
    assert effective_rank(eye) == pytest.approx(4.0, rel=1e-4)
    assert copying_score(FactoredMatrix(torch.eye(6)[:, :4], -torch.eye(6)[:4, :])) == pytest.approx(-1.0)
    shift = FactoredMatrix(torch.eye(6), torch.eye(6).roll(1, dims=0))  # row i peaks at column i - 1
    assert diagonal_fraction(shift, torch.arange(1, 6), causal=True, offset=1) == pytest.approx(1.0)


def test_diagonal_fraction_in_chunks_and_on_a_sample_agrees_with_the_whole_matrix():
    gen = torch.Generator().manual_seed(0)
    c = FactoredMatrix(torch.randn(3, 500, 8, generator=gen), torch.randn(3, 8, 500, generator=gen))
    full = (c.AB.argmax(-1) == torch.arange(500)).float().mean(-1)
    assert torch.equal(diagonal_fraction(c, torch.arange(500), chunk_elems=2000), full)
    rows, note = sample_rows(500, 100, seed=0)
    assert len(rows) == 100 and "100 of 500" in note
    assert torch.equal(diagonal_fraction(c, rows), (c.AB[:, rows].argmax(-1) == rows).float().mean(-1))
    assert sample_rows(50, 100)[1] is None


@pytest.mark.parametrize("fixture", ["trained_like", "mlp_model"])
def test_direct_logit_attributions_plus_biases_are_the_logits(fixture, request, tokens):
    model = request.getfixturevalue(fixture)
    a = direct_logit_attribution(model, tokens)
    n_mlps = 0 if model.cfg.attn_only else 2
    assert a.labels[0] == "direct path" and len(a.labels) == 1 + 8 + 1 + n_mlps
    assert torch.allclose(a.contributions_CBP.sum(0) + a.bias_BP, a.logits_BP, atol=1e-4)
    expected = model(tokens)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(a.logits_BP, expected, atol=1e-5)


def test_direct_logit_attribution_on_a_transformer_bridge(tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    tokens = torch.randint(1, 280, (2, 12), generator=torch.Generator().manual_seed(0))
    a = direct_logit_attribution(bridge, tokens)
    assert "MLP 1" in a.labels
    assert torch.allclose(a.contributions_CBP.sum(0) + a.bias_BP, a.logits_BP, atol=1e-4)


def _repeated_loss(tokens, prefix, seq_len):
    return lambda logits: torch.tensor(half_losses(per_token_loss(logits, tokens), prefix, seq_len)[1])


def test_path_patching_from_the_same_tokens_changes_nothing(trained_like):
    rep, prefix = probe_tokens(trained_like, 8, 2, 3, 0, prepend_bos=True)
    metric = _repeated_loss(rep, prefix, 8)
    clean = float(metric(trained_like(rep)))
    for comp in ("q", "k", "v"):
        assert path_patch(trained_like, rep, rep, (0, 1), (1, 2), comp, metric) == pytest.approx(clean, abs=1e-5)
    other, _ = probe_tokens(trained_like, 8, 2, 3, 1, prepend_bos=True)
    assert path_patch(trained_like, rep, other, (0, 1), (1, 2), "k", metric) != pytest.approx(clean, abs=1e-6)
    with pytest.raises(InputError, match="later layer"):
        path_patch(trained_like, rep, other, (1, 0), (0, 2), "k", metric)


def test_path_patching_agrees_with_transformer_lens_direct_path(tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    rep, prefix = probe_tokens(bridge, 10, 2, 3, 0, prepend_bos=True)
    other, _ = probe_tokens(bridge, 10, 2, 3, 1, prepend_bos=True)
    metric = _repeated_loss(rep, prefix, 10)
    _, clean_cache = bridge.run_with_cache(rep)
    _, other_cache = bridge.run_with_cache(other)
    for comp in ("q", "k", "v"):
        # TransformerLens runs its "corrupted" tokens and adds the "clean" write: here, rep and other
        tl = get_act_patch_direct_path(bridge, rep, other_cache, clean_cache, metric, 0, 1, comp, verbose=False)
        ours = [path_patch(bridge, rep, other, (0, 1), (1, h), comp, metric) for h in range(2)]
        assert torch.allclose(tl[1], torch.tensor(ours), atol=1e-5), comp


def test_head_names_are_parsed_and_checked(attn_model):
    assert parse_head(attn_model, "L1H3") == (1, 3) and parse_head(attn_model, "l0h2") == (0, 2)
    with pytest.raises(InputError, match="out of range"):
        parse_head(attn_model, "L2H0")
    with pytest.raises(InputError, match="out of range"):
        parse_head(attn_model, "L0H4")
    with pytest.raises(InputError, match="form"):
        parse_head(attn_model, "head 3")


def test_a_model_without_layernorm_folds_nothing():
    model = workbench.Transformer(tiny_config(normalization_type=None))
    w = folded_weights(model)
    assert torch.equal(w.W_E, model.W_E) and torch.equal(w.W_Q, model.W_Q) and torch.equal(w.W_U, model.W_U)
