"""`describe(model)`: the model's `Architecture`, read from its config and then checked by running
the model once on a few random tokens (the checks are listed in the `workbench.adapter` docstring).

The probe is a sequence of named steps, each given the Architecture as far as it is known so far
and the record of the run: the config, the run, the embedding, the fold, the residual stream, the
edits at hook_z and hook_q/k/v, and the knockout. A failed check is kept as a problem of its piece
(the first failure of each piece); nothing is assumed that the run did not show.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import replace
from typing import Any, Optional

import torch

from workbench.adapter.architecture import Architecture, KnockoutMethod, Piece, _block_norm, _device, _is_bridge
from workbench.adapter.folding import (
    HeadWeights,
    _apply_final_norm,
    _attn_bias_output,
    _embedding_matrix,
    _fold,
    _head_outputs,
    _head_weights,
    normalize,
)
from workbench.adapter.knockout import _knock_out
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.model.transformer import Transformer

# the hooks `describe` probes on every layer (those a model does not register are skipped)
_BLOCK_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
                "attn.hook_z", "attn.hook_rot_q", "attn.hook_rot_k", "ln1.hook_scale", "ln1.hook_normalized",
                "ln2.hook_scale", "ln2.hook_normalized", "ln1_post.hook_scale", "ln2_post.hook_scale",
                "mlp.hook_pre", "mlp.hook_post")
_TOP_HOOKS = ("hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized")
_PIECES: tuple[Piece, ...] = ("fold", "embedding", "residual", "z edits", "qkv edits", "knockout")

_CACHE: "weakref.WeakKeyDictionary[Any, Architecture]" = weakref.WeakKeyDictionary()


def describe(model: HookedModel) -> Architecture:
    """The model's Architecture, probed once per model object (kept for as long as the model lives)."""
    if model not in _CACHE:
        _CACHE[model] = _probe(model)
    return _CACHE[model]


@torch.no_grad()
def _probe(model: HookedModel) -> Architecture:
    """Read the config, run the model once, and check each piece on that run, in order."""
    arch = _from_config(model)
    if arch.n_heads < 1 or not hasattr(model, "blocks"):
        return arch  # no heads: analyses that need them refuse through require_attention
    tokens = _probe_tokens(model, arch)
    logits, acts = _record_run(model, arch, tokens)
    arch = replace(arch, fired=frozenset(acts))
    problems: dict[str, str] = {}
    missing = _missing_hooks(arch, acts)
    if missing:
        why = f"the model never fires {', '.join(missing[:3])}"
        problems.update((piece, why) for piece in _PIECES)
        return replace(arch, problems=tuple(problems.items()))
    arch = replace(arch, embed_scale=_check_embedding(model, arch, tokens, acts, problems))
    _check_fold(model, arch, acts, logits, problems)
    hw = _head_weights(model, arch)
    _check_residual(model, arch, acts, hw, problems)
    _check_z_edits(model, arch, tokens, hw, problems)
    _check_qkv_edits(model, tokens, acts, problems)
    knockout = _verify_knockout(model, arch, tokens, acts) if "z edits" not in problems else None
    if knockout is None:
        problems["knockout"] = ("neither -inf at hook_attn_scores nor recomputing z from the reported pattern "
                                "removes attention to the blocked keys")
    return replace(arch, knockout=knockout, problems=tuple(problems.items()))


def _check(problems: dict[str, str], piece: Piece, ok: bool, why: str) -> None:
    """Keep `why` as the problem of `piece` unless `ok` (or `piece` already failed)."""
    if not ok and piece not in problems:
        problems[piece] = why


def _tolerance(model: HookedModel, *tensors: torch.Tensor) -> float:
    """An absolute tolerance for comparing recomputed activations: relative to their size, looser
    for half-precision models."""
    dtype = next(model.parameters()).dtype
    rel = 1e-4 if dtype == torch.float32 else 3e-2
    return rel * (1.0 + max(float(t.abs().max()) for t in tensors))


# -- the config and the run ------------------------------------------------------------------------------
def _read_config(model: HookedModel) -> dict[str, Any]:
    """Architecture fields from the model's config, before any probing."""
    cfg = model.cfg
    H = int(cfg.n_heads)
    if isinstance(model, Transformer):
        return dict(family="workbench", class_name="Transformer", n_kv_heads=H,
                    norm="LN" if cfg.normalization_type == "LN" else "none", norm_offset=0.0, positional="learned",
                    parallel=False, post_norms=False, has_mlp=not cfg.attn_only, embed_norm=False, logit_softcap=None)
    bridge = _is_bridge(model)
    hf_config = model.original_model.config if bridge else None
    norm = str(getattr(cfg, "normalization_type", None) or "none").upper()
    pos = str(getattr(cfg, "positional_embedding_type", "standard"))
    cap = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
    block0 = model.blocks[0]
    return dict(
        family=hf_config.model_type if bridge else type(model).__name__,
        class_name=type(model.original_model).__name__ if bridge else type(model).__name__,
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or H),
        norm="LN" if norm.startswith("LN") else "RMS" if norm.startswith("RMS") else "none",
        norm_offset=1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0,
        positional={"standard": "learned", "rotary": "rotary", "alibi": "alibi"}.get(pos, "none"),
        parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        post_norms=_block_norm(block0, "ln1_post") is not None,
        has_mlp=not getattr(cfg, "attn_only", False) and _block_norm(block0, "mlp") is not None,
        embed_norm=bridge and "embed_ln" in model._modules,
        logit_softcap=cap if cap > 0 else None)


def _from_config(model: HookedModel) -> Architecture:
    """The Architecture as the config states it: nothing fired yet, no knockout, embedding scale 1."""
    cfg = model.cfg
    fields_ = _read_config(model)
    L, H, V = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_vocab)
    D = int(cfg.d_model)
    K = int(getattr(cfg, "d_head", D // max(H, 1)))
    return Architecture(n_layers=L, n_heads=H, d_model=D, d_head=K, d_vocab=V, embed_scale=1.0,
                        fired=frozenset(), knockout=None, **fields_)


def _probe_tokens(model: HookedModel, arch: Architecture) -> torch.Tensor:
    """[2, S] the probe's random tokens (fixed seed; S = 8, or the context if shorter)."""
    S = int(min(8, int(model.cfg.n_ctx)))
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, min(arch.d_vocab, 1000), (2, S), generator=gen).to(_device(model))


def _record_run(model: HookedModel, arch: Architecture, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, every probed hook that fired on the run); an error where the logits are not finite."""
    L = arch.n_layers
    names = [n for n in (*_TOP_HOOKS, *(f"blocks.{l}.{s}" for l in range(L) for s in _BLOCK_HOOKS))
             if n in model.hook_dict]
    acts: dict[str, torch.Tensor] = {}

    def save(act, hook, name):
        acts[name] = act.detach()
        return act

    logits = model.run_with_hooks(tokens, fwd_hooks=[(n, lambda a, hook, n=n: save(a, hook, n)) for n in names])
    if not bool(torch.isfinite(logits).all()):  # every check below compares within a tolerance of a finite size
        raise InputError(f"The model's output is not finite (NaN or inf logits on {tokens.shape[1]} random tokens): "
                         "its weights are damaged, or it overflows in this precision. Load a checkpoint from before "
                         "training diverged, or the model in float32.")
    return logits, acts


def _missing_hooks(arch: Architecture, acts: dict[str, torch.Tensor]) -> list[str]:
    """The hooks every check reads that did not fire on the run."""
    L = arch.n_layers
    need = ["blocks.0.hook_resid_pre", f"blocks.{L - 1}.hook_resid_post",
            *(f"blocks.{l}.attn.{s}" for l in range(L) for s in ("hook_q", "hook_k", "hook_v", "hook_z"))]
    if arch.norm != "none":
        need += ["ln_final.hook_scale", *(f"blocks.{l}.ln1.hook_scale" for l in range(L))]
    return [n for n in need if n not in acts]


# -- the checks ------------------------------------------------------------------------------------------
def _check_embedding(model: HookedModel, arch: Architecture, tokens: torch.Tensor, acts: dict[str, torch.Tensor],
                     problems: dict[str, str]) -> float:
    """The embedding scale: (normalised) W_E rows times a constant scale, plus W_pos, make the first
    residual stream. `arch` has embed_scale 1; the scale found is checked and returned."""
    resid0 = acts["blocks.0.hook_resid_pre"].float()
    pos = model.W_pos.detach().float()[: tokens.shape[1]] if arch.positional == "learned" else 0.0
    rows = _embedding_matrix(model, arch)[tokens]
    target = resid0 - pos
    embed_scale = float((rows * target).sum() / (rows * rows).sum().clamp_min(1e-30))
    _check(problems, "embedding", torch.allclose(rows * embed_scale, target, atol=_tolerance(model, target)),
           "the embedding (W_E, its norm and scale, and W_pos) does not reproduce blocks.0.hook_resid_pre")
    return embed_scale


def _check_fold(model: HookedModel, arch: Architecture, acts: dict[str, torch.Tensor], logits: torch.Tensor,
                problems: dict[str, str]) -> None:
    """The fold: hook_q/k/v from the normalised residual stream, logits from the normalised final one."""
    L, H = arch.n_layers, arch.n_heads
    w = _fold(model, arch)
    for l in range(L):
        x = acts[f"blocks.{l}.hook_resid_pre"].float()
        xn = normalize(x, acts[f"blocks.{l}.ln1.hook_scale"].float(), arch.norm) if arch.norm != "none" else x
        for name, W, b in (("q", w.W_Q, w.b_Q), ("k", w.W_K, w.b_K), ("v", w.W_V, w.b_V)):
            got = acts[f"blocks.{l}.attn.hook_{name}"].float()
            got = got.repeat_interleave(H // got.shape[2], dim=2)
            pred = torch.einsum("bsd,hdk->bshk", xn, W[l]) + b[l]
            _check(problems, "fold", torch.allclose(pred, got, atol=_tolerance(model, got)),
                   f"the norm fold does not reproduce hook_{name} of layer {l} (max error "
                   f"{float((pred - got).abs().max()):.2g})")
    final = acts[f"blocks.{L - 1}.hook_resid_post"].float()
    fn = _apply_final_norm(arch, final, acts)
    pred = fn @ w.W_U + w.b_U
    if arch.logit_softcap is not None:
        pred = arch.logit_softcap * torch.tanh(pred / arch.logit_softcap)
    _check(problems, "fold", torch.allclose(pred, logits.float(), atol=_tolerance(model, logits)),
           "the folded unembedding does not reproduce the logits")


def _check_residual(model: HookedModel, arch: Architecture, acts: dict[str, torch.Tensor], hw: HeadWeights,
                    problems: dict[str, str]) -> None:
    """The residual stream: the embedding plus every attention and MLP output, each attention output
    from its heads."""
    L = arch.n_layers
    final = acts[f"blocks.{L - 1}.hook_resid_post"].float()
    total = acts["blocks.0.hook_resid_pre"].float().clone()
    for l in range(L):
        attn_out = acts.get(f"blocks.{l}.hook_attn_out")
        if attn_out is None or (arch.post_norms and f"blocks.{l}.ln1_post.hook_scale" not in acts):
            _check(problems, "residual", False, f"the model never fires blocks.{l}.hook_attn_out")
            break
        heads = _head_outputs(model, arch, l, acts, hw).sum(0) + _attn_bias_output(model, arch, l, acts, hw)
        _check(problems, "residual", torch.allclose(heads, attn_out.float(), atol=_tolerance(model, attn_out)),
               f"the heads' z W_O does not add up to hook_attn_out of layer {l}")
        total = total + attn_out.float()
        if arch.has_mlp:
            mlp_out = acts.get(f"blocks.{l}.hook_mlp_out")
            if mlp_out is None:
                _check(problems, "residual", False, f"the model never fires blocks.{l}.hook_mlp_out")
                break
            total = total + mlp_out.float()
    _check(problems, "residual", torch.allclose(total, final, atol=_tolerance(model, final)),
           "the last residual stream is not the embedding plus every attention and MLP output")


def _perturb(act: torch.Tensor, hook: Any) -> torch.Tensor:
    """The probe's edit: an activation replaced by a different one of the same shape."""
    return -act + 0.5


def _check_z_edits(model: HookedModel, arch: Architecture, tokens: torch.Tensor, hw: HeadWeights,
                   problems: dict[str, str]) -> None:
    """An edit at hook_z reaches the attention output (head ablation works)."""
    edited: dict[str, torch.Tensor] = {}
    post = (["blocks.0.ln1_post.hook_scale"] if arch.post_norms else [])
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", _perturb),
                                            *((n, lambda a, hook, n=n: edited.__setitem__(n, a.detach()) or a)
                                              for n in ("blocks.0.attn.hook_z", "blocks.0.hook_attn_out", *post))])
    want = _head_outputs(model, arch, 0, edited, hw).sum(0) + _attn_bias_output(model, arch, 0, edited, hw)
    got = edited["blocks.0.hook_attn_out"].float()
    _check(problems, "z edits", torch.allclose(want, got, atol=_tolerance(model, got)),
           "an edit at hook_z does not reach the attention output")


def _check_qkv_edits(model: HookedModel, tokens: torch.Tensor, acts: dict[str, torch.Tensor],
                     problems: dict[str, str]) -> None:
    """Edits at hook_q, hook_k and hook_v change the heads' z (path patching works)."""
    edited: dict[str, torch.Tensor] = {}
    z_clean = acts["blocks.0.attn.hook_z"].float()
    for name in ("q", "k", "v"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.0.attn.hook_{name}", _perturb),
                                                ("blocks.0.attn.hook_z",
                                                 lambda a, hook: edited.__setitem__("z", a.detach()) or a)])
        _check(problems, "qkv edits", not torch.allclose(edited["z"].float()[:, 1:], z_clean[:, 1:],
                                                         atol=_tolerance(model, z_clean)),
               f"an edit at hook_{name} does not change the heads' outputs")


def _verify_knockout(model: HookedModel, arch: Architecture, tokens: torch.Tensor, acts: dict[str, torch.Tensor]
                     ) -> Optional[KnockoutMethod]:
    """The first knockout edit that really removes attention: with every earlier key blocked at layer
    0, each query's z must equal its own value (a one-hot pattern)."""
    S = tokens.shape[1]
    blocked = {0: torch.ones(S, S, dtype=torch.bool, device=tokens.device).tril(-1).expand(tokens.shape[0], S, S)}
    H = arch.n_heads
    for method in ("attn_scores", "recompute_z"):
        if method == "attn_scores" and "blocks.0.attn.hook_attn_scores" not in arch.fired:
            continue
        if method == "recompute_z":
            if "blocks.0.attn.hook_pattern" not in arch.fired:
                continue
            p, v = acts["blocks.0.attn.hook_pattern"].float(), acts["blocks.0.attn.hook_v"].float()
            z = acts["blocks.0.attn.hook_z"].float()
            from_pattern = torch.einsum("bhst,bthk->bshk", p, v.repeat_interleave(H // v.shape[2], dim=2))
            if not torch.allclose(from_pattern, z, atol=_tolerance(model, z)):
                continue  # the reported pattern is not the one that made z
        seen: dict[str, torch.Tensor] = {}

        def keep(a, hook, name, seen=seen):
            seen[name] = a.detach()
            return a

        with warnings.catch_warnings():  # a bridge warns when a scores edit is discarded: that is what we test
            warnings.simplefilter("ignore", UserWarning)
            _knock_out(model, tokens, blocked, method,
                       fwd_hooks=[(n, lambda a, hook, n=n: keep(a, hook, n))
                                  for n in ("blocks.0.attn.hook_z", "blocks.0.attn.hook_v")])
        v = seen["blocks.0.attn.hook_v"].float()
        v = v.repeat_interleave(H // v.shape[2], dim=2)
        z = seen["blocks.0.attn.hook_z"].float()
        if torch.allclose(z, v, atol=_tolerance(model, v)) and not torch.allclose(
                acts["blocks.0.attn.hook_z"].float()[:, 1:], v[:, 1:], atol=_tolerance(model, v)):
            return method  # type: ignore[return-value]
    return None
