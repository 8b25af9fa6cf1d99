"""Attribution graphs: the direct, linear effects between a prompt's tokens, transcoder features,
error terms and top logits (Ameisen et al., "Circuit Tracing: Revealing Computational Graphs in
Language Models", 2025).

The local replacement model of one prompt is the model with every MLP replaced by its transcoder
plus an error term per (layer, position) that makes its output exact, and with the attention
patterns and the normalisation scales frozen at their values on that prompt. Frozen, everything
between the sources (token embeddings, feature activations, error terms) and the targets (feature
pre-activations, logits) is linear, so each target is exactly its bias term plus the sum of its
incoming direct effects. The graph is computed by running the frozen model once on B copies of the
prompt and asking, per backward pass, for the gradient of B different targets (one per copy).

    g = build_graph(model, transcoders, "Alice's birthplace is")
    g.adjacency[t, s]                   direct effect of node s on node t (targets are rows)
    kept = prune(g, 0.8, 0.98)          nodes and edges that carry 80% / 98% of the logit influence
    graph_scores(g)                     replacement and completeness scores
    intervene(model, transcoders, g, nodes, scale=0.0)   the real model's logit change vs the graph's
    save_graph(g, folder); load_graph(folder)            safetensors + JSON

Nodes are ordered features (by layer, position, id), errors (layer-major), tokens, logits.
`build_graph` checks both identities on every graph it returns: each target equals its bias plus
its incoming edges, and the frozen replacement model reproduces the logits; a model on which
freezing does not take effect is refused (`DoesNotApplyError`), never given a wrong graph.

The package, in the order a graph is made and used: `graph` (the graph and its config), `build`
(build_graph, whose phases live in `nodes` and `edges`), `prune` (influence, pruning, scores),
`intervene` (interventions on the real model), `files` (saving, loading, the viewer's payload).
"""

from workbench.compute.attribution_graph.build import build_graph, check_supported
from workbench.compute.attribution_graph.edges import IDENTITY_TOL, LOGIT_TOL
from workbench.compute.attribution_graph.files import (
    GRAPH_FORMAT,
    graph_files,
    load_graph,
    save_graph,
    viewer_data,
    viewer_examples,
)
from workbench.compute.attribution_graph.findings import fact_finding, induction_finding
from workbench.compute.attribution_graph.graph import AttributionGraph, GraphConfig
from workbench.compute.attribution_graph.intervene import check_graph_model, intervene
from workbench.compute.attribution_graph.nodes import TC_DTYPE
from workbench.compute.attribution_graph.prune import (
    Pruned,
    graph_scores,
    influence,
    normalized,
    position_influence,
    prune,
)

__all__ = ["GRAPH_FORMAT", "IDENTITY_TOL", "LOGIT_TOL", "TC_DTYPE", "AttributionGraph", "GraphConfig", "Pruned",
           "build_graph", "check_graph_model", "check_supported", "fact_finding", "graph_files", "graph_scores",
           "induction_finding", "influence", "intervene", "load_graph", "normalized", "position_influence", "prune",
           "save_graph", "viewer_data", "viewer_examples"]
