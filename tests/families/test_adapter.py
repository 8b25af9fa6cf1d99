"""Ground truth for the model-facing layer on every family: each check compares the adapter's answer
with the Hugging Face model's own computation, not with the adapter itself."""

from __future__ import annotations

import pytest
import torch

from workbench import adapter
from workbench.adapter.edits import _copy
from workbench.adapter.folding import _norm_affine
from workbench.cache.collect import half_losses, per_token_loss
from workbench.cache.rows import probe_tokens
from workbench.compute.logit_attribution import direct_logit_attribution
from workbench.compute.path_patching import path_patch

EXPECTED = {  # family: (norm, positional, parallel, KV heads of 4, knockout)
    "gpt2": ("LN", "learned", False, 4, "attn_scores"),
    "gpt_neox": ("LN", "rotary", True, 4, "attn_scores"),
    "llama": ("RMS", "rotary", False, 4, "attn_scores"),
    "mistral": ("RMS", "rotary", False, 2, "attn_scores"),
    "qwen2": ("RMS", "rotary", False, 2, "attn_scores"),
    "gemma": ("RMS", "rotary", False, 4, "attn_scores"),
    "gemma2": ("RMS", "rotary", False, 2, "attn_scores"),
    "opt": ("LN", "learned", False, 4, "recompute_z"),
    "gptj": ("LN", "rotary", True, 4, "recompute_z"),
    "phi": ("LN", "rotary", True, 4, "attn_scores"),
    "bloom": ("LN", "alibi", False, 4, "attn_scores"),
}


def _tokens(S: int = 9, B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 290, (B, S), generator=torch.Generator().manual_seed(seed))


def _normalize(x: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """The norm's statistics computed here from its definition (not read from a hook)."""
    if kind == "LN":
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def test_describe_finds_each_architecture_and_every_check_passes(family):
    name, model = family
    arch = adapter.describe(model)
    norm, positional, parallel, kv, knockout = EXPECTED[name]
    assert (arch.family, arch.norm, arch.positional, arch.parallel, arch.n_kv_heads, arch.knockout) == (
        name, norm, positional, parallel, kv, knockout)
    assert arch.problems == ()
    assert arch.norm_offset == (1.0 if name.startswith("gemma") else 0.0)
    # registered is not fired: rotary and ALiBi models never fire hook_pos_embed, parallel blocks no resid_mid
    assert ("hook_pos_embed" in arch.fired) == (positional == "learned")
    assert ("blocks.0.hook_resid_mid" in arch.fired) == (not parallel)


def test_folded_weights_reproduce_hook_q_k_v_and_the_logits(family):
    name, model = family
    arch = adapter.describe(model)
    tokens = _tokens()
    _, cache = model.run_with_cache(tokens)
    w = adapter.folded_weights(model)
    eps = float(model.cfg.eps)
    for l in range(arch.n_layers):
        xn = _normalize(cache[f"blocks.{l}.hook_resid_pre"], arch.norm, eps)
        for comp, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
            got = cache[f"blocks.{l}.attn.hook_{comp}"]
            got = got.repeat_interleave(arch.n_heads // got.shape[2], dim=2)  # GQA: one copy per query head
            assert torch.allclose(torch.einsum("bsd,hdk->bshk", xn, W[l]) + b[l], got, atol=1e-4), (name, l, comp)
    hf_logits = model.original_model(tokens).logits
    final = _normalize(cache[f"blocks.{arch.n_layers - 1}.hook_resid_post"], arch.norm, eps)
    logits = final @ w.W_U + w.b_U
    if arch.logit_softcap is not None:
        logits = arch.logit_softcap * torch.tanh(logits / arch.logit_softcap)
    assert torch.allclose(logits, hf_logits, atol=1e-4), name


def test_the_effective_embedding_and_positions_are_what_enters_the_residual_stream(family):
    name, model = family
    tokens = _tokens()
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    pos = adapter.positional_matrix(model)
    expected = adapter.embedding_matrix(model)[tokens] + (pos[: tokens.shape[1]] if pos is not None else 0)
    assert torch.allclose(expected, cache["blocks.0.hook_resid_pre"], atol=1e-5), name


def test_gemma_folds_one_plus_w_and_w_alone_misses_hook_q(family):
    """Defect 3: Gemma's RMSNorm scales by 1 + w; a fold with w is far off, the one with 1 + w exact."""
    name, model = family
    if not name.startswith("gemma"):
        pytest.skip("RMSNorm with an offset only in Gemma and Gemma 2")
    tokens = _tokens()
    _, cache = model.run_with_cache(tokens)
    xn = _normalize(cache["blocks.0.hook_resid_pre"], "RMS", float(model.cfg.eps))
    W_Q = adapter.head_weights(model).W_Q[0]
    w = _norm_affine(model.blocks[0].ln1)[0].detach()
    q = cache["blocks.0.attn.hook_q"]
    assert torch.allclose(torch.einsum("bsd,hdk->bshk", xn * (1 + w), W_Q), q, atol=1e-5)
    assert (torch.einsum("bsd,hdk->bshk", xn * w, W_Q) - q).abs().max() > 0.1


def test_direct_logit_attribution_adds_up_to_the_hugging_face_logits(family):
    name, model = family
    tokens = _tokens()
    a = direct_logit_attribution(model, tokens)
    hf = model.original_model(tokens).logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(a.contributions_CBP.sum(0) + a.bias_BP, a.logits_BP, atol=1e-4), name
    assert torch.allclose(adapter.uncap_logits(model, hf), a.logits_BP, atol=1e-3), name
    assert len(a.labels) == 1 + model.cfg.n_layers * model.cfg.n_heads + 1 + model.cfg.n_layers


def test_knocking_out_all_earlier_tokens_makes_every_pattern_one_hot(family):
    """Each query then attends only to itself, so its z is its own value (checked at every layer,
    downstream of the edit, so an edit that does not take effect cannot pass)."""
    name, model = family
    tokens = _tokens()
    B, S = tokens.shape
    H = model.cfg.n_heads
    blocked = {l: torch.ones(S, S, dtype=torch.bool).tril(-1).expand(B, S, S) for l in range(model.cfg.n_layers)}
    seen = {}

    def keep(act, hook, name):
        seen[name] = act
        return act

    names = [f"blocks.{l}.attn.hook_{c}" for l in range(model.cfg.n_layers) for c in ("z", "v")]
    adapter.run_with_knockout(model, tokens, blocked, fwd_hooks=[(n, lambda a, hook, n=n: keep(a, hook, n))
                                                                 for n in names])
    for l in range(model.cfg.n_layers):
        v = seen[f"blocks.{l}.attn.hook_v"]
        assert torch.allclose(seen[f"blocks.{l}.attn.hook_z"], v.repeat_interleave(H // v.shape[2], dim=2),
                              atol=1e-5), (name, l)


def test_the_two_knockout_methods_agree_where_both_work(family):
    """On models where -inf at hook_attn_scores takes effect, recomputing z from the pattern gives
    the same logits, for windows of layers that differ from row to row."""
    name, model = family
    if adapter.describe(model).knockout != "attn_scores":
        pytest.skip("only one method works on this architecture")
    tokens = _tokens(S=7, B=3)
    L, S = model.cfg.n_layers, 7
    blocked = {}
    for l in range(L):
        mask = torch.zeros(3, S, S, dtype=torch.bool)
        mask[l, -1, 1:4] = True  # row l blocks from layer l on
        mask[2, 3, 0:2] = l == L - 1
        blocked[l] = mask
    a = adapter.run_with_knockout(model, tokens, blocked, method="attn_scores")
    b = adapter.run_with_knockout(model, tokens, blocked, method="recompute_z")
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, model(tokens), atol=1e-4)


def test_head_ablation_at_hook_z_equals_zeroing_the_heads_slice_of_the_output_projection(family):
    name, model = family
    tokens = _tokens()
    layer, head, K = model.cfg.n_layers - 1, 1, model.cfg.d_head

    def ablate(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    ours = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
    edited = _copy(model)
    proj = edited.blocks[layer].attn.o.original_component
    with torch.no_grad():
        if isinstance(proj, torch.nn.Linear):  # weight [out, in]
            proj.weight[:, head * K:(head + 1) * K] = 0
        else:  # GPT-2's Conv1D: weight [in, out]
            proj.weight[head * K:(head + 1) * K] = 0
    assert torch.allclose(ours, edited.original_model(tokens).logits, atol=1e-5), name
    assert not torch.allclose(ours, model(tokens), atol=1e-5)


def test_the_random_control_is_initialised_as_its_architecture_initialises(family):
    name, model = family
    from transformers import AutoModelForCausalLM

    original = {n: p.clone() for n, p in model.named_parameters()}
    control = adapter.random_control(model, seed=3)
    fresh = AutoModelForCausalLM.from_config(model.original_model.config)
    fresh_params = dict(fresh.named_parameters())
    n_norms = 0
    for module_name, module in control.original_model.named_modules():
        if "Norm" not in type(module).__name__ or "Bridge" in type(module).__name__:
            continue
        for pname, p in module.named_parameters(recurse=False):
            key = f"{module_name}.{pname}".replace("._original_component", "")
            assert torch.equal(p, fresh_params[key]), (name, key)  # 1 (0 for Gemma's 1 + w), biases 0
            n_norms += 1
    assert n_norms >= 2 * model.cfg.n_layers
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # the model is untouched
    changed = [n for n, p in control.named_parameters() if p.ndim == 2 and not torch.equal(p, original[n])]
    assert len(changed) == sum(p.ndim == 2 for p in control.parameters())
    config = model.original_model.config
    init_std = config.init_std if name == "opt" else config.initializer_range  # OPT names it init_std
    assert float(control.blocks[0].attn.W_Q.detach().std()) == pytest.approx(init_std, rel=0.3)
    assert torch.equal(adapter.random_control(model, seed=3).W_E, control.W_E)  # seeded


def test_path_patching_from_the_same_tokens_changes_nothing_even_for_shared_key_heads(family):
    name, model = family
    rep, prefix = probe_tokens(model, 6, 2, 2, 0, prepend_bos=True)

    def metric(logits):
        return torch.tensor(half_losses(per_token_loss(logits, rep), prefix, 6)[1])

    clean = float(metric(model(rep)))
    for comp in ("q", "k", "v"):
        assert path_patch(model, rep, rep, (0, 1), (1, 2), comp, metric) == pytest.approx(clean, abs=1e-5), comp
    other, _ = probe_tokens(model, 6, 2, 2, 1, prepend_bos=True)

    def spread(logits):  # more sensitive than a loss on a random model, where the effect is ~1e-8 nats
        return logits.double().pow(2).mean()

    for comp in ("q", "k", "v"):
        assert path_patch(model, rep, other, (0, 1), (1, 2), comp, spread) != float(spread(model(rep))), comp
