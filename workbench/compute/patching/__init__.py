"""Causal interventions: activation patching, attribution patching, and (in `edges` and
`discovery`) edge attribution patching and automatic circuit discovery, on any `HookedModel`.

    from workbench.cache.tasks import induction_task
    from workbench.compute.patching import activation_patch, attribution_patch

    task = induction_task(model)
    exact = activation_patch(model, task, "z", by="head")       # every head, batched
    approx = attribution_patch(model, task, "z", by="head")     # one backward; approx.check: its error

The modules, lowest first: `metrics` (functions of the logits), `sites` (hooks and the pieces
cut from them), `result` (PatchingResult, ApproximationCheck), `activation`, `attribution`.
"""

from workbench.compute.patching.activation import activation_patch, run_patches
from workbench.compute.patching.attribution import attribution_patch
from workbench.compute.patching.metrics import (
    METRICS,
    answer_logprob,
    answer_loss,
    answer_prob,
    logit_diff,
    normalize,
)
from workbench.compute.patching.result import ApproximationCheck, PatchingResult
from workbench.compute.patching.sites import SITES

__all__ = ["METRICS", "SITES", "ApproximationCheck", "PatchingResult", "activation_patch", "answer_logprob",
           "answer_loss", "answer_prob", "attribution_patch", "logit_diff", "normalize", "run_patches"]
