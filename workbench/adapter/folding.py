"""The arithmetic behind the adapter's weights and residual-stream parts, each function given the
`Architecture` it computes for as an argument: norms and their folds into the weights, per-head
weights, the effective embedding and unembedding, each head's write to the residual stream and the
frozen final norm.

`workbench.adapter.probe` checks these against a run of the model while it builds the Architecture;
`workbench.adapter.weights` and `workbench.adapter.decompose` answer with them once it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from workbench.adapter.architecture import Architecture, NormKind, _block_norm, _device
from workbench.model.hooked import HookedModel


# -- norms -----------------------------------------------------------------------------------------------
def _norm_affine(norm: Any) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(weight, bias) of a workbench LayerNorm, a bridge's norm component, or (None, None) for none."""
    if norm is None or isinstance(norm, torch.nn.Identity):
        return None, None
    inner = norm.original_component if _is_bridge_component(norm) else norm
    weight = inner.w if hasattr(inner, "w") else inner.weight
    bias = inner.b if hasattr(inner, "b") else getattr(inner, "bias", None)
    return weight, bias


def _is_bridge_component(module: Any) -> bool:
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    return isinstance(module, GeneralizedComponent)


def _norm_scale(norm: Any, arch: Architecture) -> Optional[torch.Tensor]:
    """[D] the effective scale of a norm module (w, or 1 + w under the architecture's RMSNorm
    offset), fp32; None for no norm."""
    weight, _ = _norm_affine(norm)
    if weight is None:
        return None
    return weight.detach().float() + arch.norm_offset


def norm_bias(norm: Any, d_model: int, device: torch.device) -> torch.Tensor:
    """[D] a norm's bias, fp32; zeros where it has none."""
    _, bias = _norm_affine(norm)
    return bias.detach().float() if bias is not None else torch.zeros(d_model, device=device)


def normalize(x_BSD: torch.Tensor, scale_BS1: torch.Tensor, kind: NormKind) -> torch.Tensor:
    """x with the norm's per-token statistics applied (centred for LN) and no learned weight."""
    if kind == "none":
        return x_BSD
    if kind == "LN":
        x_BSD = x_BSD - x_BSD.mean(-1, keepdim=True)
    return x_BSD / scale_BS1


def _centre(W_ND: torch.Tensor) -> torch.Tensor:
    return W_ND - W_ND.mean(dim=-1, keepdim=True)


# -- weights ---------------------------------------------------------------------------------------------
def _stack_heads(model: HookedModel, attr: str, shape: tuple[int, ...]) -> torch.Tensor:
    """[L, ...] a per-block attention parameter, fp32; zeros where the model has none (bias-free)."""
    out = []
    for block in model.blocks:
        value = getattr(block.attn, attr)
        out.append(value.detach().float() if value is not None else torch.zeros(shape, device=_device(model)))
    return torch.stack(out)


def _expand(W_LG_: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat each key/value head for the query heads that share it: [L, G, ...] -> [L, H, ...]."""
    return W_LG_.repeat_interleave(n_heads // W_LG_.shape[1], dim=1)


@dataclass(frozen=True)
class HeadWeights:
    """Per-head attention weights as the model holds them (fp32, detached), with key/value heads
    expanded for grouped-query attention and zeros for absent biases."""

    W_Q: torch.Tensor
    """[L, H, D, K]"""
    W_K: torch.Tensor
    """[L, H, D, K]"""
    W_V: torch.Tensor
    """[L, H, D, K]"""
    W_O: torch.Tensor
    """[L, H, K, D]"""
    b_Q: torch.Tensor
    """[L, H, K]"""
    b_K: torch.Tensor
    """[L, H, K]"""
    b_V: torch.Tensor
    """[L, H, K]"""
    b_O: torch.Tensor
    """[L, D]"""
    W_K_grouped: torch.Tensor
    """[L, G, D, K] as the model holds it (equal to W_K without grouped-query attention)."""
    W_V_grouped: torch.Tensor
    """[L, G, D, K]"""
    b_K_grouped: torch.Tensor
    """[L, G, K]"""
    b_V_grouped: torch.Tensor
    """[L, G, K]"""


def _head_weights(model: HookedModel, arch: Architecture) -> HeadWeights:
    """Every head's W_Q, W_K, W_V, W_O and biases, unfolded; see HeadWeights."""
    H, G, D, K = arch.n_heads, arch.n_kv_heads, arch.d_model, arch.d_head
    W_Q, W_K, W_V, W_O = (_stack_heads(model, n, ()) for n in ("W_Q", "W_K", "W_V", "W_O"))
    b_Q, b_K, b_V = (_stack_heads(model, n, (h, K)) for n, h in (("b_Q", H), ("b_K", G), ("b_V", G)))
    b_O = _stack_heads(model, "b_O", (D,))
    return HeadWeights(W_Q, _expand(W_K, H), _expand(W_V, H), W_O, b_Q, _expand(b_K, H), _expand(b_V, H), b_O,
                       W_K, W_V, b_K, b_V)


def _embedding_matrix(model: HookedModel, arch: Architecture) -> torch.Tensor:
    """[V, D] what each token writes into the residual stream before the first block (positions
    aside): W_E, through BLOOM's embedding LayerNorm, times the architecture's embed_scale; fp32."""
    W_E = model.W_E.detach().float()
    if arch.embed_norm:
        inner = model.embed_ln.original_component
        W_E = F.layer_norm(W_E, inner.normalized_shape, inner.weight.detach().float(), inner.bias.detach().float(),
                           inner.eps)
    return W_E * arch.embed_scale


def _positional_matrix(model: HookedModel, arch: Architecture) -> Optional[torch.Tensor]:
    """[P, D] the learned positional embedding, fp32, or None for rotary, ALiBi and no positions."""
    return model.W_pos.detach().float() if arch.positional == "learned" else None


@dataclass(frozen=True)
class FoldedWeights:
    """A model's weights with its norms folded in (fp32, detached), shapes as in TransformerLens: each
    ln1 scale (w, or 1 + w) folded into W_Q, W_K, W_V and its bias into b_Q, b_K, b_V; ln_final's
    into W_U and b_U; a post-attention norm's scale into W_O; for LayerNorm, the centring folded
    into what writes to the residual stream (W_E, W_pos, W_O). Key/value heads are expanded."""

    W_E: torch.Tensor
    """[V, D] the effective token embedding (see embedding_matrix)."""
    W_pos: Optional[torch.Tensor]
    """[P, D], or None for a model without learned positions (rotary, ALiBi)."""
    W_Q: torch.Tensor
    """[L, H, D, K]"""
    W_K: torch.Tensor
    """[L, H, D, K]"""
    W_V: torch.Tensor
    """[L, H, D, K]"""
    W_O: torch.Tensor
    """[L, H, K, D]"""
    W_U: torch.Tensor
    """[D, V]"""
    b_Q: torch.Tensor
    """[L, H, K] so that hook_q = normalize(resid_pre) W_Q + b_Q."""
    b_K: torch.Tensor
    """[L, H, K]"""
    b_V: torch.Tensor
    """[L, H, K]"""
    b_U: torch.Tensor
    """[V] so that the logits are normalize(final resid) W_U + b_U (before any soft-cap)."""
    notes: tuple[str, ...] = ()
    """What the circuits of this architecture mean (rotary, ALiBi, GQA, post-norms)."""

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, n_heads)"""
        return self.W_Q.shape[0], self.W_Q.shape[1]


def _unembed(model: HookedModel, arch: Architecture) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U [D, V], b_U [V]) with ln_final folded in; fp32."""
    W_U, b_U = model.W_U.detach().float(), model.b_U.detach().float()
    final = model.ln_final
    scale = _norm_scale(final, arch)
    b_U = b_U + norm_bias(final, W_U.shape[0], W_U.device) @ W_U
    return (W_U if scale is None else scale[:, None] * W_U), b_U


def _fold(model: HookedModel, arch: Architecture) -> FoldedWeights:
    """The model's weights with its norms folded in, unchecked (see FoldedWeights)."""
    hw = _head_weights(model, arch)
    W_Q, W_K, W_V, b_Q, b_K, b_V = hw.W_Q, hw.W_K, hw.W_V, hw.b_Q, hw.b_K, hw.b_V
    device = W_Q.device
    ln1 = [_block_norm(block, "ln1") for block in model.blocks]
    scales = [_norm_scale(n, arch) for n in ln1]
    if all(s is not None for s in scales):  # the norm's bias passes through W: ln.b W + b
        bias_LD = torch.stack([norm_bias(n, arch.d_model, device) for n in ln1])
        b_Q, b_K, b_V = (b + torch.einsum("ld,lhdk->lhk", bias_LD, W) for b, W in ((b_Q, W_Q), (b_K, W_K), (b_V, W_V)))
        scale_L1D1 = torch.stack(scales)[:, None, :, None]
        W_Q, W_K, W_V = W_Q * scale_L1D1, W_K * scale_L1D1, W_V * scale_L1D1
    W_O = hw.W_O
    if arch.post_norms:
        post = torch.stack([_norm_scale(_block_norm(b, "ln1_post"), arch) for b in model.blocks])  # [L, D]
        W_O = W_O * post[:, None, None, :]
    W_E, W_pos = _embedding_matrix(model, arch), _positional_matrix(model, arch)
    W_U, b_U = _unembed(model, arch)
    if arch.norm == "LN":
        W_E, W_O = _centre(W_E), _centre(W_O)
        W_pos = _centre(W_pos) if W_pos is not None else None
    return FoldedWeights(W_E, W_pos, W_Q, W_K, W_V, W_O, W_U, b_Q, b_K, b_V, b_U, tuple(arch.notes()))


# -- the residual stream's parts -------------------------------------------------------------------------
def _head_outputs(model: HookedModel, arch: Architecture, layer: int, acts: dict[str, torch.Tensor],
                  hw: HeadWeights) -> torch.Tensor:
    """[H, B, S, D] each head's write to the residual stream at `layer`, z W_O (through a post-norm,
    with its per-token scale from `acts`)."""
    z_BSHK = acts[f"blocks.{layer}.attn.hook_z"].float()
    out_HBSD = torch.einsum("bshk,hkd->hbsd", z_BSHK, hw.W_O[layer])
    return _post_norm(model, arch, layer, out_HBSD, acts)


def _attn_bias_output(model: HookedModel, arch: Architecture, layer: int, acts: dict[str, torch.Tensor],
                      hw: HeadWeights) -> torch.Tensor:
    """[B, S, D] the attention output's bias term at `layer` (zeros where it has none)."""
    z_BSHK = acts[f"blocks.{layer}.attn.hook_z"]
    b_BSD = hw.b_O[layer].expand(*z_BSHK.shape[:2], -1)
    return _post_norm(model, arch, layer, b_BSD, acts)


def _post_norm(model: HookedModel, arch: Architecture, layer: int, x: torch.Tensor, acts: dict[str, torch.Tensor]
               ) -> torch.Tensor:
    if not arch.post_norms:
        return x
    norm = _block_norm(model.blocks[layer], "ln1_post")
    return x / acts[f"blocks.{layer}.ln1_post.hook_scale"].float() * _norm_scale(norm, arch)


def _apply_final_norm(arch: Architecture, x_CBSD: torch.Tensor, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Components of the final residual stream, normalised with the final norm's per-token scale
    frozen at its value on the real run (no learned weight: the unembedding holds it)."""
    if arch.norm == "none":
        return x_CBSD
    return normalize(x_CBSD, acts["ln_final.hook_scale"].float()[..., : x_CBSD.shape[-2], :], arch.norm)
