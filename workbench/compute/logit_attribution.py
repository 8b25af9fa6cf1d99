"""Activation-space attribution: direct logit attribution and path patching, with TL-style hooks.

Direct logit attribution splits the final residual stream into the parts that wrote it (the direct
path, i.e. blocks.0.hook_resid_pre: token and learned positional embeddings, through any embedding
scale or norm; each head's z W_O; the attention biases; each MLP) and maps each part through the
unembedding with the final norm's scale frozen at its value on the real run, as TransformerLens's
`ActivationCache.apply_ln_to_stack` does. The parts plus the bias term (ln_final.b W_U + b_U) add up
to the logits exactly (before a soft-cap, on Gemma 2). Every architecture-specific step goes
through `workbench.adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench import adapter
from workbench.cache.collect import head_names, run_collect
from workbench.model.hooked import HookedModel


@dataclass(frozen=True)
class LogitAttribution:
    """Each residual-stream component's direct contribution to the logit of the next token."""

    labels: tuple[str, ...]
    """'direct path', 'L<l>H<h>' for each head, 'attention biases', and 'MLP <l>' for each MLP."""
    contributions_CBP: torch.Tensor
    """[component, batch, position]: contribution to the logit of token p + 1 at position p."""
    bias_BP: torch.Tensor
    """[batch, position]: ln_final.b W_U + b_U at the correct token."""
    logits_BP: torch.Tensor
    """[batch, position]: the model's own logit of the correct next token (before any soft-cap)."""

    def mean(self, mask_BP: torch.Tensor | None = None) -> dict[str, float]:
        """Mean contribution of each component over the (masked) positions."""
        weights = torch.ones_like(self.bias_BP) if mask_BP is None else mask_BP.float()
        totals = (self.contributions_CBP * weights).sum(dim=(1, 2)) / weights.sum()
        return dict(zip(self.labels, totals.tolist()))


@torch.no_grad()
def direct_logit_attribution(model: HookedModel, tokens: torch.Tensor) -> LogitAttribution:
    """Split the logit of each correct next token into per-component direct contributions."""
    arch = adapter.describe(model)
    arch.require("residual", "direct logit attribution")
    arch.require("fold", "direct logit attribution (the folded unembedding)")
    L, H = arch.n_layers, arch.n_heads
    names = ["blocks.0.hook_resid_pre", *adapter.final_norm_hooks(model)]
    for l in range(L):
        names += adapter.head_output_hooks(model, l)
    names += [f"blocks.{l}.hook_mlp_out" for l in range(L)] if arch.has_mlp else []
    logits, acts = run_collect(model, tokens, names)
    hw = adapter.head_weights(model)
    parts = [acts["blocks.0.hook_resid_pre"].float()]
    for l in range(L):
        parts += list(adapter.head_outputs(model, l, acts, hw))
    parts.append(sum(adapter.attn_bias_output(model, l, acts, hw) for l in range(L)))
    parts += [acts[f"blocks.{l}.hook_mlp_out"].float() for l in range(L)] if arch.has_mlp else []
    stack_CBSD = torch.stack(parts)[:, :, :-1]  # position p predicts token p + 1
    stack_CBSD = adapter.apply_final_norm(model, stack_CBSD, acts)
    target_BP = tokens[:, 1:]
    W_U, b_U = adapter.unembed(model)
    contributions = torch.einsum("cbpd,bpd->cbp", stack_CBSD, W_U.T[target_BP])
    labels = ("direct path", *head_names(L, H), "attention biases",
              *((f"MLP {l}" for l in range(L)) if arch.has_mlp else ()))
    own = adapter.uncap_logits(model, logits.float()[:, :-1].gather(-1, target_BP[..., None])[..., 0])
    return LogitAttribution(labels, contributions, b_U[target_BP], own)
