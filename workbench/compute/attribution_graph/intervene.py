"""Interventions: features of a graph scaled in the real model, the logit change set beside the graph's
predictions (`intervene`); and the check that a graph was built on a given model
(`check_graph_model`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from workbench.adapter import DoesNotApplyError, describe, uncap_logits
from workbench.cache.collect import run_collect
from workbench.compute.attribution_graph.graph import AttributionGraph
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.sae.transcoders import Transcoders, output_hook, per_token


@torch.no_grad()
def intervene(model: HookedModel, transcoders: Transcoders, graph: AttributionGraph, nodes: Sequence[int],
              scale: float = 0.0) -> dict[str, Any]:
    """Scale the activations of feature `nodes` by `scale` (0: ablate) in the real model, by adding
    (scale − 1)·a·(decoder) to the MLP outputs they write, and compare the change of every logit node
    with two predictions of the graph: its direct edges only, and the change carried through the
    graph's features (linearised: an active feature's activation moves with its pre-activation).
    The edit is checked to reach the MLP outputs; if it does not, nothing is reported."""
    check_graph_model(graph, model)
    nodes = [int(n) for n in nodes]
    bad = [n for n in nodes if not 0 <= n < graph.n_features]
    if bad:
        raise InputError(f"Nodes {bad[:5]} are not feature nodes (features are 0–{graph.n_features - 1}).")
    L, S, d = graph.n_layers, graph.n_pos, transcoders.d_model
    device = next(model.parameters()).device
    tokens = torch.tensor([graph.tokens], device=device)
    delta = torch.zeros(L, S, d, device=device)
    for n in nodes:
        l0, p, f = (int(v) for v in graph.features[n])
        dec = transcoders.decoder(l0)[f]  # [n_out, d]
        delta[l0:l0 + dec.shape[0], p] += (scale - 1) * float(graph.activations[n]) * dec.float()
    seen: dict[int, torch.Tensor] = {}

    def add(act, hook, l):
        return act + delta[l].reshape(act.shape).to(act.dtype)

    def check(act, hook, l):
        seen[l] = per_token(act.detach().float(), 1, S)
        return act

    _, clean = run_collect(model, tokens, [output_hook(l) for l in range(L)])
    hooks = [(output_hook(l), lambda a, hook, l=l: add(a, hook, l)) for l in range(L)]
    hooks += [(output_hook(l), lambda a, hook, l=l: check(a, hook, l)) for l in range(L)]
    logits = uncap_logits(model, model.run_with_hooks(tokens, fwd_hooks=hooks))[0, -1].float()
    first = min(int(graph.features[n, 0]) for n in nodes) if nodes else 0
    took = float((seen[first][0] - per_token(clean[output_hook(first)], 1, S)[0].float() - delta[first]).abs().max()) \
        if nodes else 0.0
    if took > 1e-4 * max(1.0, float(delta[first].abs().max())):
        raise DoesNotApplyError(f"{describe(model).label}: a feature intervention does not apply: the edit at "
                                f"{output_hook(first)} did not take effect, so its logit change cannot be reported.")
    clean_logits = uncap_logits(model, model(tokens))[0, -1].float()
    ids = graph.logit_tokens.to(device)
    actual = (logits - clean_logits)[ids].cpu()

    A = graph.adjacency
    nf = graph.n_features
    a = graph.activations.clamp_min(1e-12)
    d_src = torch.zeros(nf)
    d_src[nodes] = (scale - 1) * graph.activations[nodes]
    logit_rows = A[graph.n_nodes - graph.n_logits:, :nf] / a  # per unit of each feature's activation
    direct = logit_rows @ d_src
    M = A[:nf, :nf] / a  # feature -> feature, per unit
    change = d_src.clone()
    clamped = torch.zeros(nf, dtype=torch.bool)
    clamped[nodes] = True
    for _ in range(L):
        change = torch.where(clamped, d_src, M @ change)
    through = logit_rows @ change
    return {"nodes": nodes, "scale": scale, "logit_tokens": graph.logit_tokens.tolist(),
            "actual": actual.tolist(), "predicted_direct": direct.tolist(), "predicted_graph": through.tolist()}


def check_graph_model(graph: AttributionGraph, model: HookedModel) -> None:
    """A clear error when `graph` was not built on `model` (its logits on the prompt must match)."""
    n_layers, vocab = int(model.cfg.n_layers), int(model.cfg.d_vocab)
    ids = [*graph.tokens, *graph.logit_tokens.tolist()]
    if graph.n_layers != n_layers or (ids and max(ids) >= vocab):
        raise InputError(f"This graph was built on a model with {graph.n_layers} layers ({graph.model_name!r}); this "
                         f"model has {n_layers} layers and a vocabulary of {vocab}. Load it with the model it was "
                         "built on, or build a new graph.")
    with torch.no_grad():
        logits = uncap_logits(model, model(torch.tensor([graph.tokens], device=next(model.parameters()).device)))
        logits = logits[0, -1].float().cpu()
    saved = torch.tensor(graph.meta.get("logits_clean", []))
    now = logits[graph.logit_tokens]
    if saved.shape != now.shape or float((saved - now).abs().max()) > 1e-3 * max(1.0, float(saved.abs().max())):
        raise InputError(f"This graph does not match this model: its logits on the graph's prompt differ from the ones "
                         f"saved with the graph (built on {graph.model_name!r}). Load it with the model it was built "
                         "on, or build a new graph.")
