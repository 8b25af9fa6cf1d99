"""Activation-space attribution: direct logit attribution and path patching, with TL-style hooks.

Direct logit attribution splits the final residual stream into the parts that wrote it (the direct
path W_E + W_pos, each head's z W_O, the attention biases, each MLP) and maps each part through the
unembedding with the final LayerNorm's scale frozen at its value on the real run, as
TransformerLens's `ActivationCache.apply_ln_to_stack` does. The parts plus the bias term
(ln_final.b W_U + b_U) add up to the logits exactly.

Path patching (Wang et al. 2022) changes one edge: head A's output as seen by one input (query,
key or value) of a later head B, with every other reader still seeing A's real output. Here the
run is on the clean tokens and B's chosen input gets A's output from another run added in its
place, which is `transformer_lens.patching.get_act_patch_direct_path` with the two runs' roles
swapped (it runs the corrupted tokens and adds the clean write).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from workbench.circuits import centres, ln_bias, ln_weight
from workbench.errors import InputError
from workbench.probes import head_names, run_collect


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
    """[batch, position]: the model's own logit of the correct next token."""

    def mean(self, mask_BP: torch.Tensor | None = None) -> dict[str, float]:
        """Mean contribution of each component over the (masked) positions."""
        weights = torch.ones_like(self.bias_BP) if mask_BP is None else mask_BP.float()
        totals = (self.contributions_CBP * weights).sum(dim=(1, 2)) / weights.sum()
        return dict(zip(self.labels, totals.tolist()))


def _has_mlps(model: Any) -> bool:
    return not getattr(model.cfg, "attn_only", False) and "blocks.0.hook_mlp_out" in model.hook_dict


@torch.no_grad()
def direct_logit_attribution(model: Any, tokens: torch.Tensor) -> LogitAttribution:
    """Split the logit of each correct next token into per-component direct contributions."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = ["hook_embed", "ln_final.hook_scale", *(f"blocks.{l}.attn.hook_z" for l in range(L))]
    has_pos = "hook_pos_embed" in model.hook_dict
    names += ["hook_pos_embed"] if has_pos else []
    names += [f"blocks.{l}.hook_mlp_out" for l in range(L)] if _has_mlps(model) else []
    has_scale = "ln_final.hook_scale" in model.hook_dict and ln_weight(getattr(model, "ln_final", None)) is not None
    if not has_scale:
        names.remove("ln_final.hook_scale")
    logits, acts = run_collect(model, tokens, names)
    parts = [acts["hook_embed"] + (acts["hook_pos_embed"] if has_pos else 0)]
    W_O = model.W_O.detach()
    for l in range(L):
        parts += list(torch.einsum("bshk,hkd->hbsd", acts[f"blocks.{l}.attn.hook_z"], W_O[l]))
    b_O = model.b_O.detach()
    parts.append(b_O.sum(0).expand_as(parts[0]))
    parts += [acts[f"blocks.{l}.hook_mlp_out"] for l in range(L)] if _has_mlps(model) else []
    stack_CBSD = torch.stack(parts).float()[:, :, :-1]  # position p predicts token p + 1
    target_BP = tokens[:, 1:]
    W_U = model.W_U.detach().float()
    norm = getattr(model, "ln_final", None)
    if has_scale:
        if centres(model):
            stack_CBSD = stack_CBSD - stack_CBSD.mean(-1, keepdim=True)
        stack_CBSD = stack_CBSD / acts["ln_final.hook_scale"].float()[:, :-1] * ln_weight(norm).detach().float()
    W_U_BPD = W_U.T[target_BP]  # unembedding column of each correct token
    contributions = torch.einsum("cbpd,bpd->cbp", stack_CBSD, W_U_BPD)
    bias_V = model.b_U.detach().float() if getattr(model, "b_U", None) is not None else torch.zeros(W_U.shape[1])
    b_ln = ln_bias(norm) if has_scale else None
    if b_ln is not None:
        bias_V = bias_V + b_ln.detach().float() @ W_U
    labels = ("direct path", *head_names(L, H), "attention biases",
              *((f"MLP {l}" for l in range(L)) if _has_mlps(model) else ()))
    return LogitAttribution(labels, contributions, bias_V[target_BP],
                            logits.float()[:, :-1].gather(-1, target_BP[..., None])[..., 0])


Component = Literal["q", "k", "v"]


@torch.no_grad()
def path_patch(model: Any, tokens: torch.Tensor, other_tokens: torch.Tensor, sender: tuple[int, int],
               receiver: tuple[int, int], component: Component,
               metric: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """`metric(logits)` of a run on `tokens` in which only the `component` input (q, k or v) of the
    receiver head sees the sender head's output from a run on `other_tokens`.

    The receiver's input is recomputed from its own copy of the residual stream,
    resid_pre + (z_other - z) W_O of the sender, through its ln1 and its W and b for `component`.
    """
    (ls, hs), (lr, hr) = sender, receiver
    if lr <= ls:
        raise InputError(f"Path patching needs the receiver (L{lr}H{hr}) in a later layer than the sender "
                         f"(L{ls}H{hs}).")
    if component not in ("q", "k", "v"):
        raise InputError(f"component must be 'q', 'k' or 'v', got {component!r}.")
    z_name = f"blocks.{ls}.attn.hook_z"
    _, clean = run_collect(model, tokens, [z_name])
    _, other = run_collect(model, other_tokens, [z_name])
    W_O = model.W_O[ls, hs].detach()
    delta_BSD = (other[z_name][:, :, hs] - clean[z_name][:, :, hs]) @ W_O
    W = getattr(model, f"W_{component.upper()}")[lr, hr].detach()  # [D, K]
    b = getattr(model, f"b_{component.upper()}")[lr, hr].detach()  # [K]
    block = model.blocks[lr]
    resid: dict[str, torch.Tensor] = {}

    def keep_resid(x, hook):
        resid["pre"] = x
        return x

    def patch_input(act, hook):
        if act.shape[2] != model.cfg.n_heads:
            raise InputError(f"Path patching into {component} needs one {component} per head; this model groups "
                             f"them ({act.shape[2]} for {model.cfg.n_heads} heads). Patch a query instead.")
        act = act.clone()
        act[:, :, hr] = block.ln1(resid["pre"] + delta_BSD.to(resid["pre"].dtype)) @ W + b
        return act

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{lr}.hook_resid_pre", keep_resid),
                                                     (f"blocks.{lr}.attn.hook_{component}", patch_input)])
    return float(metric(logits))
