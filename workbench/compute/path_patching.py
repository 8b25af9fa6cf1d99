"""Path patching (Wang et al. 2022) changes one edge: head A's output as seen by one input (query,
key or value) of a later head B, with every other reader still seeing A's real output. Here the
run is on the clean tokens and B's chosen input gets A's output from another run added in its
place, which is `transformer_lens.patching.get_act_patch_direct_path` with the two runs' roles
swapped (it runs the corrupted tokens and adds the clean write). Under grouped-query attention a
key or value input belongs to a key/value head shared by several query heads: patching it changes
that shared head, for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from workbench import adapter
from workbench.cache.collect import run_collect
from workbench.errors import InputError
from workbench.model.hooked import HookedModel

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
