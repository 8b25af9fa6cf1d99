"""Causal interventions: activation patching, attribution patching, and (in `edges` and
`discovery`) edge attribution patching and automatic circuit discovery, on any `HookedModel`.

    from workbench.cache.tasks import induction_task
    from workbench.compute.patching import activation_patch, attribution_patch

    task = induction_task(model)
    exact = activation_patch(model, task, "z", by="head")       # every head, batched
    approx = attribution_patch(model, task, "z", by="head")     # one backward; approx.check: its error

    scores = edge_attribution(model, task, "eap-ig")           # every edge; scores.check: its error
    circuit = discover_circuit(model, task)                     # the fewest top edges recovering 80%
    faithfulness(model, task, scores)                           # recovered against edges kept

The modules, lowest first: `metrics` (functions of the logits), `sites` (hooks and the pieces
cut from them), `result` (PatchingResult, ApproximationCheck), `activation`, `attribution`,
`edges` (the component graph, EAP, EAP-IG, exact edge patching) and `discovery` (circuits, ACDC).
"""

from workbench.compute.patching.activation import activation_patch, run_patches
from workbench.compute.patching.attribution import attribution_patch
from workbench.compute.patching.discovery import (
    Circuit,
    FaithfulnessCurve,
    acdc,
    discover_circuit,
    faithfulness,
    verify_circuit,
)
from workbench.compute.patching.edges import (
    ComponentGraph,
    EdgeScores,
    component_graph,
    edge_attribution,
    patch_edges,
    run_with_edges,
)
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

__all__ = ["METRICS", "SITES", "ApproximationCheck", "Circuit", "ComponentGraph", "EdgeScores", "FaithfulnessCurve",
           "PatchingResult", "acdc", "activation_patch", "answer_logprob", "answer_loss", "answer_prob",
           "attribution_patch", "component_graph", "discover_circuit", "edge_attribution", "faithfulness",
           "logit_diff", "normalize", "patch_edges", "run_patches", "run_with_edges", "verify_circuit"]
