"""What a prompt's graph says about the question the prompt asks: for a fact the model recalls, where
the answer is computed, set beside causal tracing on the same prompt (`fact_finding`); for an
induction prompt, whether the answer's influence starts at the token after the earlier occurrence
(`induction_finding`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.compute.attribution_graph.graph import AttributionGraph
from workbench.compute.attribution_graph.prune import position_influence
from workbench.compute.causal_tracing import GROUPS, Encoded, FactPrompt, causal_trace, position_groups
from workbench.model.hooked import HookedModel


def fact_finding(model: HookedModel, graph: AttributionGraph, fact: FactPrompt, enc: Encoded) -> dict[str, Any]:
    """Influence on the answer logit by layer and position group (features + errors), next to causal
    tracing's MLP restoration effect on the same prompt (`enc`, `fact` encoded): do they point at the
    same place?"""
    answer = [int(t) for t in graph.logit_tokens].index(enc.target) if enc.target in graph.logit_tokens.tolist() else 0
    infl = position_influence(graph, answer)
    by_pos = (infl["features"] + infl["errors"]).numpy()  # [L, S]
    trace = causal_trace(model, enc, 3.0, components=("mlp",), window=1, n_samples=3, seed=0)["mlp"]  # [L, S]
    groups = {g: p for g, p in position_groups(enc).items() if p}
    names = [g for g in GROUPS if g in groups]
    G = np.stack([by_pos[:, groups[g]].mean(1) for g in names], 1)  # [L, groups], per position of the group
    T = np.stack([trace[:, groups[g]].mean(1) for g in names], 1)
    inside = [g for g in names if g != "last token"]  # where, before the last token, the answer is prepared
    graph_peak = max(inside, key=lambda g: G[:, names.index(g)].sum()) if inside else "last token"
    trace_peak = max(inside, key=lambda g: T[:, names.index(g)].sum()) if inside else "last token"
    corr = float(np.corrcoef(G.flatten(), T.flatten())[0, 1]) if G.std() > 0 and T.std() > 0 else float("nan")
    subject = set(range(*enc.subject))
    token_infl = infl["tokens"].numpy()
    S = by_pos.shape[1]
    positive = np.clip(trace, 0, None)
    graph_last = float(by_pos[:, S - 1].sum() / max(by_pos.sum(), 1e-30))
    trace_last = float(positive[:, S - 1].sum() / max(positive.sum(), 1e-30))
    graph_layer, trace_layer = int(by_pos[:, S - 1].argmax()), int(trace[:, S - 1].argmax())
    return {"prompt": fact.prompt, "target": fact.target, "groups": names, "graph": G.tolist(),
            "trace": T.tolist(), "graph_last_token_share": graph_last, "trace_last_token_share": trace_last,
            "graph_peak_layer": graph_layer, "trace_peak_layer": trace_layer,
            "agree": graph_last > 0.5 and trace_last > 0.5 and abs(graph_layer - trace_layer) <= 1,
            "graph_peak_group": graph_peak, "trace_peak_group": trace_peak, "correlation": corr,
            "subject_token_share": float(token_infl[sorted(subject)].sum() / max(token_infl.sum(), 1e-30))}


def induction_finding(graph: AttributionGraph, answer_id: int, earlier: int) -> dict[str, Any]:
    """Where the influence on the answer (token `answer_id`) starts among the tokens: the token after the
    earlier occurrence (position `earlier`) should lead (it reaches the last position only through
    attention)."""
    ids = graph.logit_tokens.tolist()
    answer = ids.index(answer_id) if answer_id in ids else 0
    tokens = position_influence(graph, answer)["tokens"][:-1]  # the last token's own embedding is not the point
    order = tokens.argsort(descending=True).tolist()
    return {"answer_is_top": ids[0] == answer_id, "answer_prob": float(graph.logit_probs[answer]),
            "earlier_position": earlier, "earlier_rank": order.index(earlier) + 1,
            "n_positions": len(order), "earlier_share": float(tokens[earlier] / tokens.sum().clamp_min(1e-30)),
            "token_influence": tokens.tolist()}
