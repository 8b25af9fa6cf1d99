"""The report's viewers in one line each, for notebooks. Each takes a model (a workbench `Transformer` or a
TransformerLens `TransformerBridge`), runs what it needs through the adapter, cache and compute layers,
and returns a `Widget`: as a cell's value it shows itself, offline, its script included once per
notebook (see `workbench.report.scripts`).

    show_attention(model, "The cat sat on the mat. The cat sat")   every head's pattern, token by token
    show_logit_lens(model, "The cat sat on the mat. The cat sat")  what the model would predict after each layer
    show_feature(model, sae, 12)                                   one SAE latent's dashboard
    show_graph(graph)                                              an attribution graph
    show_patching(result)                                          a patching result (and an estimate's check)
    show_circuit(circuit)                                          a discovered circuit on the model's layers
    show_probes(result)                                            a probe sweep: accuracy and selectivity
    show_steering(result)                                          a steering sweep beside its random control

A prompt is text (read with the model's `to_tokens`, so a BOS comes first where the model adds one) or
token ids ([S] or [1, S]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from workbench.adapter.provenance import model_label
from workbench.adapter.tokens import token_strings
from workbench.cache.collect import require_attention, run_collect
from workbench.cache.rows import held_out_text
from workbench.compute.attribution_graph.files import viewer_data
from workbench.compute.attribution_graph.graph import AttributionGraph
from workbench.compute.lens import logit_lens
from workbench.compute.patching.discovery import Circuit, FaithfulnessCurve
from workbench.compute.patching.result import PatchingResult
from workbench.compute.probes import ProbeSweep
from workbench.compute.steering import SteeringResult
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.report.dashboards import feature_card
from workbench.report.plotting import (
    circuit_figure,
    faithfulness_figure,
    logit_lens_figure,
    patching_figure,
    probe_sweep_figure,
    steering_figure,
)
from workbench.report.widgets import Widget, attention_viewer, figure_widget, graph_viewer
from workbench.sae.features import collect_feature_data
from workbench.sae.modules import SAE

Prompt = Union[str, torch.Tensor, Sequence[int]]
"""Text, or the token ids of one prompt ([S] or [1, S])."""


def prompt_tokens(model: HookedModel, prompt: Prompt) -> torch.Tensor:
    """[1, S] token ids of one prompt on the model's device: text through the model's `to_tokens`, ids as given.
    An error for a batch, an empty prompt, text on a model without a tokenizer, or more than n_ctx tokens."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InputError(f"{model_label(model)} has no tokenizer, so it cannot read text; pass token ids.")
        tokens = model.to_tokens(prompt, truncate=False)  # too long is an error below, not a silent cut
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long)
        tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
        raise InputError(f"A viewer shows one prompt: text or token ids of shape [S] or [1, S], got shape "
                         f"{tuple(tokens.shape)}.")
    n_ctx = int(model.cfg.n_ctx)
    if tokens.shape[1] > n_ctx:
        raise InputError(f"The prompt is {tokens.shape[1]} tokens long; {model_label(model)} reads at most {n_ctx}.")
    return tokens.to(next(model.parameters()).device)


def _layers(model: HookedModel, layer: Union[None, int, Sequence[int]]) -> list[int]:
    L = int(model.cfg.n_layers)
    layers = list(range(L)) if layer is None else [layer] if isinstance(layer, int) else list(layer)
    bad = [l for l in layers if not isinstance(l, (int, np.integer)) or not 0 <= l < L]
    if bad or not layers:
        raise InputError(f"layer {layer!r}: the model has layers 0–{L - 1}; give one of them, a list, or None for all.")
    return [int(l) for l in layers]


@torch.no_grad()
def show_attention(model: HookedModel, prompt: Prompt, layer: Union[None, int, Sequence[int]] = None,
                   title: Optional[str] = None) -> Widget:
    """The attention viewer on one prompt: hover a token to see where the chosen head attends from it; the
    layer and head pickers cover `layer` (an index, a list, or None for every layer)."""
    require_attention(model)
    tokens = prompt_tokens(model, prompt)
    layers = _layers(model, layer)
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    _, acts = run_collect(model, tokens, keep=names, stop_early=True)
    patterns_LHSS = np.stack([acts[n][0].float().cpu().numpy() for n in names])
    strings = token_strings(model, tokens[0])
    return attention_viewer(strings, patterns_LHSS, title or f"{model_label(model)}: attention ({len(strings)} tokens)",
                            "Hover a token (click to pin it) to shade the earlier tokens by how much the chosen head "
                            "attends to them from there; the strip lists every head's strongest key.",
                            layer_names=[f"layer {l}" for l in layers])


def show_logit_lens(model: HookedModel, prompt: Prompt, title: Optional[str] = None) -> Widget:
    """The logit lens of one prompt: what the residual stream predicts after each layer, at each position
    (`workbench.compute.lens.logit_lens`, which refuses a model whose final norm it cannot reproduce)."""
    tokens = prompt_tokens(model, prompt)
    lens = logit_lens(model, tokens, k=1)
    top = [token_strings(model, row.tolist()) for row in lens.top_ids_RSK[..., 0]]
    fig = logit_lens_figure(lens, token_strings(model, tokens[0]), top,
                            title or f"{model_label(model)}: logit lens (cell: the top prediction for the next token)")
    return figure_widget(fig)


def show_feature(model: HookedModel, sae: SAE, feature: int, tokens: Optional[torch.Tensor] = None,
                 n_rows: int = 128, seq_len: int = 64) -> Widget:
    """One latent's dashboard (top contexts, examples across its range, histogram, logit effects) over the
    token rows `tokens` [rows, S], by default `n_rows` rows of `seq_len` tokens of held-out text
    (`workbench.cache.rows.held_out_text`). Position 0 of each row is never counted (a BOS)."""
    d_sae = int(sae.d_sae)
    if not isinstance(feature, (int, np.integer)) or not 0 <= feature < d_sae:
        raise InputError(f"feature {feature!r}: the SAE has latents 0–{d_sae - 1}.")
    where = "the given token rows"
    if tokens is None:
        tokens, where = held_out_text(model, n_rows, seq_len)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise InputError(f"tokens must be rows of shape [rows, S] with S ≥ 2, got {tuple(tokens.shape)}.")
    data = collect_feature_data(model, sae, tokens, features=[int(feature)], progress=False)
    return feature_card(data, 0, f"Feature {int(feature)} of {d_sae} at {sae.cfg.hook_name}",
                        f"Over {tokens.shape[0]} rows of {tokens.shape[1]} tokens of {where}.")


def show_graph(graph: Union[AttributionGraph, dict], max_nodes: int = 80, title: Optional[str] = None) -> Widget:
    """An attribution graph in the graph viewer: the `max_nodes` most influential features and errors (with
    every token and logit), node and edge threshold sliders, and the clicked node's details. `graph` may
    also be `viewer_data`'s payload (a dict)."""
    if isinstance(graph, AttributionGraph):
        data, name = viewer_data(graph, max_nodes=max_nodes), "".join(graph.token_strs)
    elif isinstance(graph, dict):
        data, name = graph, "".join(str(t) for t in graph.get("tokens", ()))
    else:
        raise InputError(f"show_graph takes an AttributionGraph (build_graph) or its viewer_data, not a "
                         f"{type(graph).__name__}.")
    return graph_viewer(data, title or f"attribution graph: {name!r}",
                        "Nodes are tokens (bottom), transcoder features and error terms (by layer) and logits (top); "
                        "edges are direct effects. Click a node for its strongest inputs and outputs; the sliders "
                        "re-prune.")


def show_patching(result: PatchingResult) -> Widget:
    """A patching result (`activation_patch`, `attribution_patch`) as a figure: heatmap by its axes,
    and for an estimate, the scatter of its check against exact patching."""
    if not isinstance(result, PatchingResult):
        raise InputError(f"show_patching takes a PatchingResult, not a {type(result).__name__}.")
    return figure_widget(patching_figure(result))


def show_steering(result: SteeringResult) -> Widget:
    """A steering sweep (`steering_sweep`) as a figure: the target metric's change and the loss cost on
    ordinary text against α, beside random directions of the same norm."""
    if not isinstance(result, SteeringResult):
        raise InputError(f"show_steering takes a SteeringResult (steering_sweep), not a {type(result).__name__}.")
    return figure_widget(steering_figure(result))


def show_probes(result: ProbeSweep) -> Widget:
    """A probe sweep (`fit_probes`) as a figure: held-out score and selectivity by site and position."""
    if not isinstance(result, ProbeSweep):
        raise InputError(f"show_probes takes a ProbeSweep (fit_probes), not a {type(result).__name__}.")
    return figure_widget(probe_sweep_figure(result))


def show_circuit(circuit: Circuit, max_edges: int = 60) -> Widget:
    """A discovered circuit (`discover_circuit`, `acdc`) drawn on the model's layers."""
    if not isinstance(circuit, Circuit):
        raise InputError(f"show_circuit takes a Circuit, not a {type(circuit).__name__}.")
    return figure_widget(circuit_figure(circuit, max_edges))


def show_faithfulness(curves: Union[FaithfulnessCurve, dict[str, FaithfulnessCurve]]) -> Widget:
    """Faithfulness curves (`faithfulness`): one, or several by name."""
    curves = {"ranking": curves} if isinstance(curves, FaithfulnessCurve) else curves
    if not curves or not all(isinstance(c, FaithfulnessCurve) for c in curves.values()):
        raise InputError("show_faithfulness takes a FaithfulnessCurve or a dict of them by name.")
    return figure_widget(faithfulness_figure(curves))
