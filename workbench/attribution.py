"""Activation-space attribution: direct logit attribution and path patching, with TL-style hooks.

Direct logit attribution splits the final residual stream into the parts that wrote it (the direct
path, i.e. blocks.0.hook_resid_pre: token and learned positional embeddings, through any embedding
scale or norm; each head's z W_O; the attention biases; each MLP) and maps each part through the
unembedding with the final norm's scale frozen at its value on the real run, as TransformerLens's
`ActivationCache.apply_ln_to_stack` does. The parts plus the bias term (ln_final.b W_U + b_U) add up
to the logits exactly (before a soft-cap, on Gemma 2). Every architecture-specific step goes
through `workbench.adapter`.

Path patching (Wang et al. 2022) changes one edge: head A's output as seen by one input (query,
key or value) of a later head B, with every other reader still seeing A's real output. Here the
run is on the clean tokens and B's chosen input gets A's output from another run added in its
place, which is `transformer_lens.patching.get_act_patch_direct_path` with the two runs' roles
swapped (it runs the corrupted tokens and adds the clean write). Under grouped-query attention a
key or value input belongs to a key/value head shared by several query heads: patching it changes
that shared head, for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from workbench import adapter
from workbench.errors import InputError
from workbench.hooked import HookedModel
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


Component = Literal["q", "k", "v"]


@torch.no_grad()
def path_patch(model: HookedModel, tokens: torch.Tensor, other_tokens: torch.Tensor, sender: tuple[int, int],
               receiver: tuple[int, int], component: Component,
               metric: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """`metric(logits)` of a run on `tokens` in which only the `component` input (q, k or v) of the
    receiver head sees the sender head's output from a run on `other_tokens`.

    The receiver's input is recomputed from its own copy of the residual stream, resid_pre plus the
    sender's change of write (z_other - z) W_O (`adapter.head_write_change`), through its ln1 and its
    W and b for `component` (the key/value head it shares, under grouped-query attention).
    """
    return float(path_patch_many(model, tokens, other_tokens, [sender], receiver, (component,), metric)[component][0])


@torch.no_grad()
def path_patch_many(model: HookedModel, tokens: torch.Tensor, other_tokens: torch.Tensor,
                    senders: Sequence[tuple[int, int]],
                    receiver: tuple[int, int], components: Sequence[Component],
                    metric: Callable[[torch.Tensor], torch.Tensor], progress: Callable = iter
                    ) -> dict[str, np.ndarray]:
    """{component: [sender]} `path_patch` for many senders into one receiver: the clean and other runs
    happen once, then one run per (sender, component). `progress` wraps the job list (e.g. tqdm)."""
    arch = adapter.describe(model)
    arch.require("qkv edits", "path patching")
    lr, hr = receiver
    for ls, hs in senders:
        if lr <= ls:
            raise InputError(f"Path patching needs the receiver (L{lr}H{hr}) in a later layer than the sender "
                             f"(L{ls}H{hs}).")
    for component in components:
        if component not in ("q", "k", "v"):
            raise InputError(f"component must be 'q', 'k' or 'v', got {component!r}.")
    z_names = sorted({f"blocks.{ls}.attn.hook_z" for ls, _ in senders})
    resid = f"blocks.{lr}.hook_resid_pre"
    _, clean = run_collect(model, tokens, [*z_names, resid])
    _, other = run_collect(model, other_tokens, z_names)
    hw = adapter.head_weights(model)
    group = arch.n_heads // arch.n_kv_heads
    weights = {"q": (hw.W_Q[lr, hr], hw.b_Q[lr, hr], hr),
               "k": (hw.W_K_grouped[lr, hr // group], hw.b_K_grouped[lr, hr // group], hr // group),
               "v": (hw.W_V_grouped[lr, hr // group], hw.b_V_grouped[lr, hr // group], hr // group)}
    ln1 = model.blocks[lr].ln1
    out = {c: np.zeros(len(senders)) for c in components}
    jobs = [(i, s, c) for i, s in enumerate(senders) for c in components]
    for i, (ls, hs), component in progress(jobs):
        z_name = f"blocks.{ls}.attn.hook_z"
        delta_BSD = adapter.head_write_change(model, ls, hs, clean[z_name], other[z_name][:, :, hs], hw)
        W, b, index = weights[component]
        resid_BSD = clean[resid]
        patched = (ln1(resid_BSD + delta_BSD.to(resid_BSD.dtype)).float() @ W + b)

        def patch_input(act, hook, patched=patched, index=index):
            act = act.clone()
            act[:, :, index] = patched.to(act.dtype)
            return act

        logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{lr}.attn.hook_{component}", patch_input)])
        out[component][i] = float(metric(logits))
    return out
