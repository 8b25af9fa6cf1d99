"""The compute layer: functions from a model and its cached activations to numbers. Attention
scores, QK/OV circuits, direct logit attribution and path patching, the logit lens, causal tracing
and attention knockout, and attribution graphs over transcoders."""

from workbench.compute.attention_scores import induction_score, previous_token_score
from workbench.compute.attribution_graph import AttributionGraph, GraphConfig, build_graph, intervene, prune
from workbench.compute.causal_tracing import attention_knockout, causal_trace
from workbench.compute.lens import LogitLens, logit_lens
from workbench.compute.logit_attribution import LogitAttribution, direct_logit_attribution
from workbench.compute.path_patching import path_patch
from workbench.compute.qk_ov import composition_scores, ov_circuit, qk_circuit

__all__ = ["AttributionGraph", "GraphConfig", "LogitAttribution", "LogitLens", "attention_knockout", "build_graph",
           "causal_trace", "composition_scores", "direct_logit_attribution", "induction_score", "intervene",
           "logit_lens", "ov_circuit", "path_patch", "previous_token_score", "prune", "qk_circuit"]

from workbench.compute.steering import (  # noqa: E402  (appended: steering, issue 27)
    SteeringResult,
    direction,
    feature_direction,
    generate_steered,
    mean_difference,
    random_like,
    steer,
    steering_sweep,
)

__all__ += ["SteeringResult", "direction", "feature_direction", "generate_steered", "mean_difference", "random_like",
            "steer", "steering_sweep"]

from workbench.compute.probes import (  # noqa: E402  (appended: linear probes, issue 27)
    DirectionAblation,
    ProbeConfig,
    ProbeSweep,
    ablate_direction,
    fit_probes,
)

__all__ += ["DirectionAblation", "ProbeConfig", "ProbeSweep", "ablate_direction", "fit_probes"]
