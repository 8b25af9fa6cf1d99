"""The residual stream in parts, from a run's cached activations: each head's write (z W_O, through
Gemma 2's post-attention norm), the attention bias, the change of write when one head's z changes,
the final norm with its per-token scale frozen, and the logits before a soft-cap. The probe
verified that the parts add up to the model's own activations (`workbench.adapter.probe`)."""

from __future__ import annotations

from typing import Optional

import torch

from workbench.adapter.architecture import _block_norm
from workbench.adapter.folding import HeadWeights, _apply_final_norm, _attn_bias_output, _head_outputs, _head_weights
from workbench.adapter.probe import describe
from workbench.model.hooked import HookedModel


def head_output_hooks(model: HookedModel, layer: int) -> list[str]:
    """Hooks `head_outputs` and `attn_bias_output` read at `layer`."""
    names = [f"blocks.{layer}.attn.hook_z"]
    if describe(model).post_norms:
        names.append(f"blocks.{layer}.ln1_post.hook_scale")
    return names


def head_outputs(model: HookedModel, layer: int, acts: dict[str, torch.Tensor], hw: Optional[HeadWeights] = None
                 ) -> torch.Tensor:
    """[H, B, S, D] each head's write to the residual stream at `layer`, z W_O (through a post-norm,
    with its per-token scale from `acts`); with `attn_bias_output`, sums to hook_attn_out."""
    arch = describe(model)
    return _head_outputs(model, arch, layer, acts, hw if hw is not None else _head_weights(model, arch))


def attn_bias_output(model: HookedModel, layer: int, acts: dict[str, torch.Tensor], hw: Optional[HeadWeights] = None
                     ) -> torch.Tensor:
    """[B, S, D] the attention output's bias term at `layer` (zeros where it has none)."""
    arch = describe(model)
    return _attn_bias_output(model, arch, layer, acts, hw if hw is not None else _head_weights(model, arch))


def head_write_change(model: HookedModel, layer: int, head: int, z_BSHK: torch.Tensor, z_new_BSK: torch.Tensor,
                      hw: Optional[HeadWeights] = None) -> torch.Tensor:
    """[B, S, D] how the residual stream changes when one head's z becomes `z_new_BSK`, the other
    heads keeping theirs (`z_BSHK`): (z_new - z) W_O, or through Gemma 2's post-norm, the change
    of the normalised attention output."""
    arch = describe(model)
    hw = hw if hw is not None else _head_weights(model, arch)
    delta_BSD = (z_new_BSK.float() - z_BSHK[:, :, head].float()) @ hw.W_O[layer, head]
    if not arch.post_norms:
        return delta_BSD
    out_BSD = torch.einsum("bshk,hkd->bsd", z_BSHK.float(), hw.W_O[layer]) + hw.b_O[layer]
    norm = _block_norm(model.blocks[layer], "ln1_post")
    dtype = next(model.parameters()).dtype
    return norm((out_BSD + delta_BSD).to(dtype)).float() - norm(out_BSD.to(dtype)).float()


def final_norm_hooks(model: HookedModel) -> list[str]:
    """The hook with the final norm's per-token scale, if the model has a final norm."""
    return ["ln_final.hook_scale"] if describe(model).norm != "none" else []


def apply_final_norm(model: HookedModel, x_CBSD: torch.Tensor, acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Components of the final residual stream, normalised with the final norm's per-token scale
    frozen at its value on the real run (no learned weight: `unembed` holds it)."""
    return _apply_final_norm(describe(model), x_CBSD, acts)


def uncap_logits(model: HookedModel, logits: torch.Tensor) -> torch.Tensor:
    """Logits before the final soft-cap c·tanh(x / c) (unchanged for models without one)."""
    cap = describe(model).logit_softcap
    return logits if cap is None else cap * torch.atanh((logits.float() / cap).clamp(-1 + 1e-7, 1 - 1e-7))
