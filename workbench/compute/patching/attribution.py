"""Attribution patching (Nanda 2023; Syed et al. 2023): the first-order estimate of every patch at
once. For a piece of an activation, patching changes the metric by about

    (a_source - a_base) · dm/da   at the base run

so one forward pass on each prompt set and one backward pass give every layer, position and head
together. It is exact where the metric is linear in the activation and can be far off where it is
not: a saturated softmax (the answer's probability near 1), a LayerNorm whose scale the patch
changes a lot, attention patterns (the softmax again). So every estimate comes with its error
against exact patching (`activation_patch`) on a sample of its own patches: the half of largest
estimated effect and a random half.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from workbench.cache.tasks import PatchingTask
from workbench.compute.patching.activation import Setup, run_patches
from workbench.compute.patching.metrics import Metric
from workbench.compute.patching.result import ApproximationCheck, PatchingResult, sample_for_check
from workbench.compute.patching.sites import By
from workbench.model.hooked import HookedModel


def base_gradients(model: HookedModel, tokens: torch.Tensor, hooks: Sequence[str], task: PatchingTask,
                   metric: Metric) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({hook: activation}, {hook: d metric / d activation}) of one run on `tokens`, the metric
    being the mean over prompts. Parameters get no gradient."""
    store: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(act: torch.Tensor, hook) -> torch.Tensor:
            if not act.requires_grad:  # a frozen model: the activation becomes a leaf that does
                act = act.detach().requires_grad_(True)
            store[name] = act
            return act
        return keep

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(h, keeper(h)) for h in hooks])
        value = metric(logits, task).float().mean()
        acts = [store[h] for h in hooks]
        grads = torch.autograd.grad(value, acts, allow_unused=True)
    return ({h: a.detach() for h, a in zip(hooks, acts)},
            {h: (torch.zeros_like(a) if g is None else g.detach()) for h, a, g in zip(hooks, acts, grads)})


def attribution_patch(model: HookedModel, task: PatchingTask, site: str = "resid_pre", by: By = "position", *,
                      direction: str = "denoise", metric: "Metric | str" = "auto", normalized: bool = True,
                      layers: Optional[Sequence[int]] = None, features: Optional[Sequence[int]] = None,
                      check: int = 32, seed: int = 0, batch_rows: int = 64, progress: bool = True) -> PatchingResult:
    """The linear estimate of `activation_patch(model, task, site, by, ...)` for every patch, in
    the same units, from one run on each prompt set and one backward pass; `result.check` holds its
    error against exact patching of `check` of the patches (0: no check)."""
    setup = Setup(model, task, site, by, direction, metric, layers, features, "attribution patching")
    acts, grads = base_gradients(model, setup.base, setup.hooks, setup.task, setup.metric)
    products = {h: ((setup.source[h].float() - acts[h].float()) * grads[h].float()).sum(0) for h in setup.hooks}
    base_value = setup.corrupt if direction == "denoise" else setup.clean
    raw = np.array([base_value + float(products[p.hook][p.index].sum()) for p in setup.patches])
    result = setup.finish(raw, normalized, "attribution patching")
    if check <= 0:
        return result
    picked = sample_for_check(raw - base_value, check, seed)
    exact = run_patches(model, setup.task, setup.base, setup.source, [setup.patches[i] for i in picked],
                        setup.metric, batch_rows, desc=f"checking attribution patching of {site}", progress=progress,
                        route=setup.route)
    checked = ApproximationCheck.of([_label(result, i) for i in picked], result.values.reshape(-1)[picked],
                                    _units(exact, setup, normalized))
    return setup.finish(raw, normalized, "attribution patching", check=checked)


def _units(raw: np.ndarray, setup: Setup, normalized: bool) -> np.ndarray:
    if not normalized:
        return raw
    return (raw - setup.corrupt) / (setup.clean - setup.corrupt)


def _label(result: PatchingResult, flat: int) -> tuple[str, ...]:
    idx = np.unravel_index(flat, result.values.shape)
    return tuple(result.labels[a][j] for a, j in enumerate(idx))
