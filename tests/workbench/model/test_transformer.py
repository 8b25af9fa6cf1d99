"""Invariants of the hookable Transformer."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import FactoredMatrix

from tests.conftest import tiny_config
from workbench import ConfigError, HookNameError, InputError, ModelConfig, Transformer
from workbench.model.transformer import lm_loss

ISSUE_HOOKS = ["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"] + [
    f"blocks.{{l}}.{name}" for name in (
        "hook_resid_pre", "hook_resid_post", "attn.hook_q", "attn.hook_k", "attn.hook_v",
        "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out")
]
MLP_HOOKS = ["blocks.{l}.hook_resid_mid", "blocks.{l}.mlp.hook_pre", "blocks.{l}.mlp.hook_post",
             "blocks.{l}.hook_mlp_out"]


def _names(templates, n_layers):
    return {t.format(l=l) for t in templates for l in range(n_layers)}


def test_hook_names_and_shapes_follow_transformer_lens(mlp_model, tokens):
    cfg = mlp_model.cfg
    _, cache = mlp_model.run_with_cache(tokens)
    assert _names(ISSUE_HOOKS + MLP_HOOKS, cfg.n_layers) <= set(cache)
    B, S = tokens.shape
    D, H, K, M = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    assert cache["hook_embed"].shape == cache["hook_pos_embed"].shape == (B, S, D)
    assert cache["blocks.1.attn.hook_q"].shape == cache["blocks.1.attn.hook_z"].shape == (B, S, H, K)
    assert cache["blocks.1.attn.hook_pattern"].shape == cache["blocks.1.attn.hook_attn_scores"].shape == (B, H, S, S)
    assert cache["blocks.0.mlp.hook_post"].shape == (B, S, M)
    assert cache["ln_final.hook_normalized"].shape == (B, S, D)


def test_attention_only_model_has_no_mlp_hooks(attn_model, tokens):
    _, cache = attn_model.run_with_cache(tokens)
    assert _names(ISSUE_HOOKS, 2) <= set(cache)
    assert not any("mlp" in name or "resid_mid" in name for name in cache)
    with pytest.raises(InputError, match="attention-only"):
        attn_model.W_in  # noqa: B018


def test_weights_have_transformer_lens_names_and_shapes(mlp_model):
    cfg = mlp_model.cfg
    L, H, D, K, M, V = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    assert mlp_model.W_E.shape == (V, D) and mlp_model.W_U.shape == (D, V)
    assert mlp_model.W_pos.shape == (cfg.n_ctx, D)
    assert mlp_model.W_Q.shape == mlp_model.W_K.shape == mlp_model.W_V.shape == (L, H, D, K)
    assert mlp_model.W_O.shape == (L, H, K, D)
    assert mlp_model.b_Q.shape == (L, H, K) and mlp_model.b_O.shape == (L, D)
    assert mlp_model.W_in.shape == (L, D, M) and mlp_model.W_out.shape == (L, M, D)
    assert "blocks.0.attn.W_Q" in mlp_model.state_dict()


def test_factored_matrix_on_model_weights_equals_the_product(attn_model):
    W_Q, W_K = attn_model.W_Q[1, 2].detach(), attn_model.W_K[1, 2].detach()
    qk = FactoredMatrix(W_Q, W_K.T)
    torch.testing.assert_close(qk.AB, W_Q @ W_K.T)
    ov = FactoredMatrix(attn_model.W_V[0].detach(), attn_model.W_O[0].detach())  # all heads at once
    torch.testing.assert_close(ov.AB, attn_model.W_V[0].detach() @ attn_model.W_O[0].detach())


@pytest.mark.parametrize("fixture", ["attn_model", "mlp_model"])
def test_cached_and_hooked_runs_equal_the_plain_forward(fixture, tokens, request):
    model = request.getfixturevalue(fixture)
    plain = model(tokens)
    cached, cache = model.run_with_cache(tokens)  # hooks on the pattern: the materialised path
    hooked = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln1.hook_scale", lambda x, hook: None)])
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    assert torch.allclose(cache["blocks.1.attn.hook_pattern"].sum(-1), torch.ones(()), atol=1e-5)


def test_pattern_is_causal_and_scores_are_masked(attn_model, tokens):
    _, cache = attn_model.run_with_cache(tokens)
    pattern = cache["blocks.0.attn.hook_pattern"]
    upper = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
    assert (pattern[..., upper] == 0).all()
    assert torch.isinf(cache["blocks.0.attn.hook_attn_scores"][..., upper]).all()


def test_residual_stream_decomposes_into_component_outputs(mlp_model, tokens):
    _, cache = mlp_model.run_with_cache(tokens)
    total = cache["hook_embed"] + cache["hook_pos_embed"]
    for l in range(mlp_model.cfg.n_layers):
        total = total + cache[f"blocks.{l}.hook_attn_out"] + cache[f"blocks.{l}.hook_mlp_out"]
    torch.testing.assert_close(total, cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=1e-5)


def test_hooks_can_edit_activations(attn_model, tokens):
    plain = attn_model(tokens)

    def zero(x, hook):
        return torch.zeros_like(x)

    ablated = attn_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero)])
    assert not torch.allclose(plain, ablated)

    def uniform(pattern, hook):
        return torch.tril(torch.ones_like(pattern)) / torch.arange(1, pattern.shape[-1] + 1)[:, None]

    edited = attn_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
    assert not torch.allclose(plain, edited)


def test_no_hooks_are_left_behind(attn_model, tokens):
    attn_model.run_with_cache(tokens)
    attn_model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: None)])
    with pytest.raises(RuntimeError, match="boom"):
        with attn_model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: None)]):
            raise RuntimeError("boom")
    assert attn_model.list_hooks() == {}
    assert all(not hp._forward_hooks for hp in attn_model.hook_dict.values())


@pytest.mark.parametrize("call", ["run_with_hooks", "hooks", "run_with_cache", "add_hook"])
def test_unknown_hook_name_suggests_the_nearest(attn_model, tokens, call):
    bad = "blocks.0.attn.hook_patern"
    with pytest.raises(HookNameError, match=r"Did you mean: blocks\.0\.attn\.hook_pattern"):
        if call == "run_with_hooks":
            attn_model.run_with_hooks(tokens, fwd_hooks=[(bad, lambda x, hook: None)])
        elif call == "hooks":
            with attn_model.hooks(fwd_hooks=[(bad, lambda x, hook: None)]):
                pass
        elif call == "run_with_cache":
            attn_model.run_with_cache(tokens, names_filter=[bad])
        else:
            attn_model.add_hook(bad, lambda x, hook: None)
    assert attn_model.list_hooks() == {}


def test_bad_tokens_get_clear_errors(attn_model):
    with pytest.raises(InputError, match=r"\[0, 257\)"):
        attn_model(torch.tensor([[1, 2, 257]]))
    with pytest.raises(InputError, match="exceeds n_ctx=24"):
        attn_model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(InputError, match="integer ids"):
        attn_model(torch.zeros(1, 4))
    with pytest.raises(InputError, match="return_type"):
        attn_model(torch.zeros(1, 4, dtype=torch.long), return_type="probs")


@pytest.mark.parametrize("field,value", [("n_layers", 0), ("n_layers", 49), ("d_model", -1), ("n_heads", 0),
                                         ("act_fn", "swish"), ("normalization_type", "RMS"), ("d_mlp", 0),
                                         ("init_range", -0.1)])
def test_impossible_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}"):
        tiny_config(**{field: value})


def test_config_is_frozen_and_round_trips():
    cfg = tiny_config(d_mlp=16)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(AttributeError):
        cfg.n_layers = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="n_layer"):
        ModelConfig.from_dict({"n_layer": 2})


def test_return_types_agree(mlp_model, tokens):
    logits, loss = mlp_model(tokens, return_type="both")
    torch.testing.assert_close(mlp_model(tokens, return_type="loss"), loss)
    torch.testing.assert_close(loss, lm_loss(logits, tokens))
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, manual)
    assert lm_loss(logits, tokens, per_token=True).shape == (tokens.shape[0], tokens.shape[1] - 1)


@pytest.mark.parametrize("overrides", [dict(n_layers=1), dict(n_layers=8), dict(normalization_type=None),
                                       dict(d_mlp=16, act_fn="relu"), dict(d_head=5, n_heads=3)])
def test_configurations_run(overrides, tokens):
    model = Transformer(tiny_config(**overrides))
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (*tokens.shape, 257) and torch.isfinite(logits).all()
    assert f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" in cache


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = Transformer(tiny_config(seed=1)), Transformer(tiny_config(seed=1)), Transformer(tiny_config(seed=2))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.W_E, c.W_E)


def test_layernorm_scale_hook_path_matches_fused_path(mlp_model, tokens):
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x

    out = mlp_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln1.hook_scale", keep)])
    assert seen["blocks.0.ln1.hook_scale"].shape == (*tokens.shape, 1)
    torch.testing.assert_close(out, mlp_model(tokens), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward_and_backward(mlp_model, tokens):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mlp_model(tokens, return_type="loss")
    loss.backward()
    assert torch.isfinite(loss) and mlp_model.W_E.grad is not None
    assert abs(loss.item() - mlp_model(tokens, return_type="loss").item()) < 0.1


def test_hook_shapes_and_str_tokens(attn_model):
    shapes = attn_model.hook_shapes(seq_len=5)
    assert shapes["blocks.0.attn.hook_pattern"] == (1, 4, 5, 5)
    assert attn_model.to_str_tokens(attn_model.to_tokens("hi!")[0]) == ["h", "i", "!"]
    assert attn_model.to_string(attn_model.to_tokens("hello")) == ["hello"]


def _scale_edits():
    def returned(x, hook):
        return x * 2

    def in_place(x, hook):
        x.mul_(2)

    def through_data(x, hook):
        x.data.mul_(2)  # not seen by autograd's version counter: the value comparison catches it

    def through_view(x, hook):
        x[:, 1:] *= 2  # position 0 kept; an edit of part of the tensor through a view

    return [returned, in_place, through_data, through_view]


@pytest.mark.parametrize("edit", _scale_edits(), ids=lambda f: f.__name__)
def test_every_kind_of_edit_of_the_layernorm_scale_takes_effect(mlp_model, tokens, edit):
    """A read-only scale hook keeps the fused LayerNorm; any edit must still change the output, and
    by exactly as much as the unfused computation with the edited scale gives."""
    edited = mlp_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln2.hook_scale", edit)])
    assert not torch.allclose(edited, mlp_model(tokens))
    resid = mlp_model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_mid")[1]["blocks.0.hook_resid_mid"]
    ln = mlp_model.blocks[0].ln2
    centred = resid - resid.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    returned = edit(scale, None)
    scale = scale if returned is None else returned
    expected = mlp_model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.0.ln2.hook_normalized", lambda x, hook: centred / scale * ln.w + ln.b)])
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit", _scale_edits(), ids=lambda f: f.__name__)
def test_every_kind_of_edit_of_the_pattern_takes_effect_even_while_caching(attn_model, tokens, edit):
    """Edits through hook_pattern change the output, with every hook also cached: the cache holds
    the edited pattern, and hook_z is what that pattern makes of V."""
    plain = attn_model(tokens)
    with attn_model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", edit)]):
        edited, cache = attn_model.run_with_cache(tokens)
        again = attn_model(tokens)
    assert not torch.allclose(edited, plain)
    torch.testing.assert_close(edited, again)
    z = torch.einsum("bhst,bthk->bshk", cache["blocks.0.attn.hook_pattern"], cache["blocks.0.attn.hook_v"])
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], z, atol=1e-5, rtol=1e-5)


def test_caching_every_hook_under_inference_mode_equals_the_plain_forward(mlp_model, tokens):
    with torch.inference_mode():
        logits, cache = mlp_model.run_with_cache(tokens)
        plain = mlp_model(tokens)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=1e-5)
    scores = cache["blocks.1.attn.hook_attn_scores"]
    q, k = cache["blocks.1.attn.hook_q"], cache["blocks.1.attn.hook_k"]
    expected = torch.einsum("bshk,bthk->bhst", q, k) / q.shape[-1] ** 0.5
    lower = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
    torch.testing.assert_close(scores[..., lower], expected[..., lower], atol=1e-5, rtol=1e-5)
    ln = cache["blocks.1.ln1.hook_scale"]
    resid = cache["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(ln, (resid.var(-1, correction=0, keepdim=True) + 1e-5).sqrt())


def test_a_backward_hook_on_the_scale_sees_its_gradient(mlp_model, tokens):
    grads = []
    mlp_model.add_hook("blocks.0.ln1.hook_scale", lambda g, hook: grads.append(g), dir="bwd")
    try:
        mlp_model(tokens, return_type="loss").backward()
    finally:
        mlp_model.reset_hooks()
        mlp_model.zero_grad(set_to_none=True)
    assert len(grads) == 1 and grads[0].shape == (*tokens.shape, 1) and grads[0].abs().sum() > 0


def test_a_hook_that_returns_the_scale_detached_freezes_it(mlp_model, tokens):
    """Same values, no gradient through the scale: the gradient reaching the embedding must change
    (attribution freezes LayerNorm scales this way)."""
    def embed_grad(fwd_hooks):
        with mlp_model.hooks(fwd_hooks=fwd_hooks):
            loss = mlp_model(tokens, return_type="loss")
        (grad,) = torch.autograd.grad(loss, mlp_model.W_E)
        return grad

    names = [f"blocks.{l}.ln{i}.hook_scale" for l in range(2) for i in (1, 2)]
    frozen = embed_grad([(name, lambda x, hook: x.detach()) for name in names])
    assert not torch.allclose(frozen, embed_grad([]), atol=1e-6)
