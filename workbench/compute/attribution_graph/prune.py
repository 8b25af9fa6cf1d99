"""Influence, pruning and scores: how much of the influence on the logits flows from each node
(`influence`), the nodes and edges that carry most of it (`prune`), the replacement and completeness
scores (`graph_scores`), and where in the prompt the answer is computed (`position_influence`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from workbench.compute.attribution_graph.graph import AttributionGraph
from workbench.errors import InputError


def normalized(A: torch.Tensor) -> torch.Tensor:
    """|A| with each row scaled to sum to 1 (rows with no inputs stay 0)."""
    absA = A.abs()
    return absA / absA.sum(1, keepdim=True).clamp_min(1e-30)


def influence(An: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weightsᵀ (An + An² + An³ + …): how much of the weighted targets' input flows from each node,
    through any path. The graph is acyclic, so the series ends after its depth."""
    total = torch.zeros_like(weights)
    cur = weights @ An
    for _ in range(An.shape[0]):
        if not bool(cur.abs().sum() > 0):
            break
        total += cur
        cur = cur @ An
    return total


def _cut(scores: torch.Tensor) -> torch.Tensor:
    """For each entry, the share of the total score held by the entries ranked above it: keeping the
    entries with cut < t keeps the fewest entries that hold a share t."""
    order = scores.argsort(descending=True)
    total = scores.sum().clamp_min(1e-30)
    before = torch.cat([torch.zeros(1), (scores[order].cumsum(0) / total)[:-1]])
    out = torch.empty_like(scores)
    out[order] = before.to(scores.dtype)
    return out


@dataclass(frozen=True)
class Pruned:
    """Which nodes and edges survive pruning, and each one's cut (its threshold)."""

    node_mask: torch.Tensor
    """[N] bool."""
    edge_mask: torch.Tensor
    """[N, N] bool, only between kept nodes."""
    node_cut: torch.Tensor
    """[N]: a node is kept at node threshold t when cut < t (0 for tokens and logits)."""
    edge_cut: torch.Tensor
    """[N, N]: the same for edges, among the nodes kept."""
    node_influence: torch.Tensor
    """[N] each node's influence on the logits (for the logit nodes, their probability)."""


def _check_threshold(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise InputError(f"The {name} threshold must be in [0, 1] (a share of the influence on the logits), got "
                         f"{value!r}.")


def _definition(graph: AttributionGraph, name: str, value: Optional[bool]) -> bool:
    """A node-definition option: as given, else as the graph was built with (`GraphConfig`)."""
    return bool(graph.meta.get("config", {}).get(name, False)) if value is None else bool(value)


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          count_sources: Optional[bool] = None, require_feature_inputs: Optional[bool] = None) -> Pruned:
    """Keep the features and errors that hold `node_threshold` of the influence on the logits, then the
    edges that hold `edge_threshold` of the influence among them (the Attribution Graphs methods
    paper's defaults). Tokens and logits are always kept; a node left with no kept edge to a kept
    node is dropped, and no edge is kept that touches a dropped node. `count_sources` (token nodes
    ranked in the node share) and `require_feature_inputs` (a feature also needs a kept incoming edge)
    default to the graph's `GraphConfig`; circuit-tracer does both."""
    _check_threshold("node", node_threshold)
    _check_threshold("edge", edge_threshold)
    count_sources = _definition(graph, "count_sources", count_sources)
    require_feature_inputs = _definition(graph, "require_feature_inputs", require_feature_inputs)
    A, w = graph.adjacency, graph.logit_weights()
    N, first_token = graph.n_nodes, graph.n_features + graph.n_errors
    always = torch.zeros(N, dtype=torch.bool)
    always[first_token:] = True
    is_feature = torch.arange(N) < graph.n_features
    infl = influence(normalized(A), w)
    node_cut = torch.zeros(N)
    ranked = first_token + (graph.n_pos if count_sources else 0)
    node_cut[:ranked] = _cut(infl[:ranked])
    node_cut[first_token:] = 0  # tokens are kept whatever their share
    node_mask = always | (node_cut < node_threshold)
    An = normalized(A * node_mask[:, None] * node_mask[None, :])
    infl_kept = influence(An, w)
    edge_score = An * (infl_kept + w)[:, None]
    edge_cut = _cut(edge_score.flatten()).view(N, N)
    edge_mask = (edge_cut < edge_threshold) & (edge_score > 0)
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        has_out = edge_mask.any(0)
        has_in = edge_mask.any(1) | ~is_feature if require_feature_inputs else True
        keep = always | (node_mask & has_out & has_in)
        if bool((keep == node_mask).all()):
            break
        node_mask = keep
    infl[first_token + graph.n_pos:] = w[first_token + graph.n_pos:]
    return Pruned(node_mask, edge_mask, node_cut, edge_cut, infl)


def graph_scores(graph: AttributionGraph, pruned: Optional[Pruned] = None,
                 count_sources: Optional[bool] = None) -> dict[str, float]:
    """The replacement score (the share of the influence on the logits that starts at tokens rather
    than at error nodes) and the completeness score (the share of the nodes' inputs, weighted by each
    node's influence, that comes from non-error nodes; with `count_sources`, as in circuit-tracer,
    tokens and errors are weighed too, as fully explained, and it defaults to the graph's
    `GraphConfig`). With `pruned`, pruned features count as error nodes, as the methods paper scores a
    pruned graph."""
    count_sources = _definition(graph, "count_sources", count_sources)
    A, w = graph.adjacency, graph.logit_weights()
    nf, ne, S = graph.n_features, graph.n_errors, graph.n_pos
    N = graph.n_nodes
    error_like = torch.zeros(N, dtype=torch.bool)
    error_like[nf:nf + ne] = True
    An = normalized(A)
    if pruned is not None:
        gone = ~pruned.node_mask
        gone[nf + ne:] = False
        error_like |= gone
        An = An * (~gone)[:, None]  # a pruned node's own inputs are not traced: it acts as a source
    infl = influence(An, w)
    tokens = slice(nf + ne, nf + ne + S)
    from_tokens = float(infl[tokens].sum())
    from_errors = float(infl[error_like].sum())
    replacement = from_tokens / max(from_tokens + from_errors, 1e-30)
    has_inputs = An.sum(1) > 0
    weight = (infl + w) if count_sources else (infl + w) * has_inputs
    non_error = 1 - An[:, error_like].sum(1)
    completeness = float((non_error * weight).sum() / weight.sum().clamp_min(1e-30))
    return {"replacement_score": replacement, "completeness_score": completeness}


def position_influence(graph: AttributionGraph, logit: int = 0) -> dict[str, torch.Tensor]:
    """Influence on one logit node (index into the logit nodes), by kind, [n_layers, S] for features
    and errors and [S] for tokens: where in the prompt, and at which layer, the answer is computed."""
    w = torch.zeros(graph.n_nodes)
    w[graph.logit_index(logit)] = 1.0
    infl = influence(normalized(graph.adjacency), w)
    L, S, nf = graph.n_layers, graph.n_pos, graph.n_features
    feats = torch.zeros(L, S)
    if nf:
        feats.index_put_((graph.features[:, 0], graph.features[:, 1]), infl[:nf], accumulate=True)
    errors = infl[nf:nf + graph.n_errors].view(L, S)
    tokens = infl[nf + graph.n_errors: nf + graph.n_errors + S]
    return {"features": feats, "errors": errors, "tokens": tokens}
