"""Report widgets: interactive HTML for what a plotly figure can't show well. Pure: each function takes
arrays (or a graph as a dict) and returns a `Widget` (HTML plus a caption); the script they need is
`WIDGETS_JS` (workbench/report/assets/widgets.js with widgets.css inside), which the report writes once as
`assets/widgets.js`. A `Widget` is also a notebook output: the cell's value shows it, with its scripts
included once per notebook (see `workbench.report.scripts`).

    attention_viewer(tokens, patterns_LHSS, ...)   the prompt as text; hover or click a token to see
                                                   where the chosen head attends from it, with layer
                                                   and head pickers, every head's strongest key for
                                                   that token, and the head's whole pattern
    graph_viewer(data, ...)                        an attribution graph drawn as tokens × layers:
                                                   node and edge threshold sliders; click a node for
                                                   its activation, influence, dashboard link, top
                                                   examples and strongest inputs and outputs
    figure_widget(fig)                             a plotly figure as a widget, so that a notebook
                                                   shows it offline (plotly.js from the `plotly` package)

Patterns travel as bytes (attention weight × 255, lower triangle only, base64), so a 256-token
prompt on a 2-layer, 4-head model is about 350 kB. Graphs travel as checked JSON (see `graph_viewer`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import operator
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from workbench.report.plotting import caption_of
from workbench.report.scripts import SCRIPTS, WIDGETS_JS, notebook_html

SECTION_FILES = "@section-files@"
"""A link target in a widget's HTML that starts with this means the analysis's own files (its
`Result.files()`); the report replaces it with the folder it writes them to."""


@dataclass(frozen=True)
class Widget:
    """A self-contained piece of a report page and its caption; shown as a notebook cell's value too."""

    html: str = field(repr=False)
    caption: str
    needs: tuple[str, ...] = ("widgets",)
    """The scripts that draw it (names in `workbench.report.scripts.SCRIPTS`)."""

    def __post_init__(self) -> None:
        unknown = [n for n in self.needs if n not in SCRIPTS]
        if unknown:
            raise ValueError(f"Widget.needs names unknown scripts {unknown}; the scripts are {sorted(SCRIPTS)}")

    def _repr_html_(self) -> str:
        """The widget as a notebook output, offline, with the scripts this notebook's page lacks."""
        return notebook_html(self.html.replace(SECTION_FILES, "."), self.caption, self.needs)


def _script_payload(data) -> str:
    """JSON that can sit inside <script type='application/json'>: nothing in it can end the script early."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("<!--", "\\u003c!--")


def _lower_triangle_bytes(patterns_LHSS: np.ndarray) -> str:
    L, H, S, _ = patterns_LHSS.shape
    rows, cols = np.tril_indices(S)
    q = np.clip(np.rint(np.asarray(patterns_LHSS, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    return base64.b64encode(q[:, :, rows, cols].tobytes()).decode()


def attention_viewer(tokens: Sequence[str], patterns_LHSS: np.ndarray, title: str, caption: str,
                     layer_names: Sequence[str] = (), head_names: Sequence[str] = ()) -> Widget:
    """Attention patterns [layers, heads, query, key] of one prompt, explorable token by token.
    `tokens` are display strings (see `workbench.data.tokenizer.readable_tokens`)."""
    patterns_LHSS = np.asarray(patterns_LHSS)
    L, H, S, S2 = patterns_LHSS.shape
    if S != S2 or len(tokens) != S:
        raise ValueError(f"attention_viewer: patterns {patterns_LHSS.shape} do not match {len(tokens)} tokens")
    data = {"tokens": list(tokens), "L": L, "H": H, "S": S, "tril": _lower_triangle_bytes(patterns_LHSS),
            "layers": list(layer_names) or [f"layer {l}" for l in range(L)],
            "heads": list(head_names) or [f"H{h}" for h in range(H)], "title": title}
    uid = f"attn-{uuid.uuid5(uuid.NAMESPACE_OID, title + str(S) + str(L) + str(H)).hex[:10]}"
    payload = _script_payload(data)
    body = (f"<div class='wb-attn' id='{uid}'><div class='wb-attn-title'>{html.escape(title)}</div>"
            f"<script type='application/json' class='wb-data'>{payload}</script>"
            "<noscript>The attention viewer needs JavaScript.</noscript></div>")
    return Widget(body, caption)


_GRAPH_KINDS = ("feature", "error", "embedding", "logit")
_NODE_KEYS = ("id", "kind", "layer", "pos", "label", "activation", "influence", "node_cut")


def _graph_payload(data: dict) -> dict:
    """`data` checked and made plain JSON (ints, finite floats, strings; a missing `href` or `examples`
    becomes null or [])."""
    def fail(msg: str):
        raise ValueError(f"graph_viewer: {msg}")

    def integer(v, what: str) -> int:
        try:
            return operator.index(v)
        except TypeError:
            fail(f"{what} is {v!r}, not an integer")

    def finite(v, what: str) -> float:
        try:
            x = float(v)
        except (TypeError, ValueError):
            fail(f"{what} is {v!r}, not a number")
        if not math.isfinite(x):
            fail(f"{what} is {x}, not a finite number")
        return x

    if not isinstance(data, dict):
        fail(f"data is a {type(data).__name__}, not a dict")
    missing = [k for k in ("tokens", "n_layers", "nodes", "edges") if k not in data]
    if missing:
        fail(f"data lacks {missing}")
    tokens = [str(t) for t in data["tokens"]]
    S, L = len(tokens), integer(data["n_layers"], "n_layers")
    if S == 0 or L < 1:
        fail(f"needs at least one token and one layer (got {S} tokens, {L} layers)")
    layers = {"embedding": (-1, -1), "logit": (L, L), "feature": (0, L - 1), "error": (0, L - 1)}
    nodes, ids = [], set()
    for i, n in enumerate(data["nodes"]):
        if not isinstance(n, dict):
            fail(f"node {i} is a {type(n).__name__}, not a dict")
        missing = [k for k in _NODE_KEYS if k not in n]
        if missing:
            fail(f"node {i} (id {n.get('id')!r}) lacks {missing}")
        nid, kind = integer(n["id"], f"node {i}'s id"), n["kind"]
        if nid in ids:
            fail(f"node id {nid} appears twice")
        ids.add(nid)
        if kind not in _GRAPH_KINDS:
            fail(f"node {nid} has kind {kind!r}, not one of {_GRAPH_KINDS}")
        layer, pos = integer(n["layer"], f"node {nid}'s layer"), integer(n["pos"], f"node {nid}'s pos")
        lo, hi = layers[kind]
        if not lo <= layer <= hi:
            fail(f"node {nid} ({kind}) is at layer {layer}; a {kind} node's layer is {lo}..{hi} (n_layers {L})")
        if not 0 <= pos < S:
            fail(f"node {nid} is at position {pos}, outside the {S} tokens")
        href = n.get("href")
        examples = [[str(text), finite(a, f"node {nid}'s example activation")]
                    for text, a in (n.get("examples") or [])]
        nodes.append({"id": nid, "kind": kind, "layer": layer, "pos": pos, "label": str(n["label"]),
                      "activation": finite(n["activation"], f"node {nid}'s activation"),
                      "influence": finite(n["influence"], f"node {nid}'s influence"),
                      "node_cut": finite(n["node_cut"], f"node {nid}'s node_cut"),
                      "href": None if href is None else str(href), "examples": examples})
    edges = []
    for i, e in enumerate(data["edges"]):
        if len(e) != 4:
            fail(f"edge {i} is {e!r}, not [source_id, target_id, weight, edge_cut]")
        src, dst = integer(e[0], f"edge {i}'s source"), integer(e[1], f"edge {i}'s target")
        for end, nid in (("source", src), ("target", dst)):
            if nid not in ids:
                fail(f"edge {i} ({src} -> {dst}) has {end} node {nid}, which is not in nodes")
        edges.append([src, dst, finite(e[2], f"edge {i}'s weight"), finite(e[3], f"edge {i}'s edge_cut")])
    thresholds = {}
    for key, default in (("node_threshold", 0.8), ("edge_threshold", 0.98)):
        thresholds[key] = finite(data.get(key, default), key)
        if not 0 <= thresholds[key] <= 1:
            fail(f"{key} is {thresholds[key]}, outside the sliders' 0..1")
    return {"tokens": tokens, "n_layers": L, "nodes": nodes, "edges": edges, **thresholds}


def graph_viewer(data: dict, title: str, caption: str) -> Widget:
    """An attribution graph (tokens × layers; nodes, weighted edges and their pruning cuts) with node and
    edge threshold sliders and a panel for the clicked node. Raises ValueError on malformed `data`."""
    payload = _script_payload(_graph_payload(data))
    uid = f"graph-{uuid.uuid5(uuid.NAMESPACE_OID, title + payload).hex[:10]}"
    body = (f"<div class='wb-graph' id='{uid}'><div class='wb-g-title'>{html.escape(title)}</div>"
            f"<script type='application/json' class='wb-data'>{payload}</script>"
            "<noscript>The graph viewer needs JavaScript.</noscript></div>")
    return Widget(body, caption)


def figure_widget(fig: go.Figure, caption: Optional[str] = None) -> Widget:
    """A plotly figure as a `Widget` (its caption from `plotting.captioned` unless given): a notebook shows it
    offline, with plotly.js from the installed `plotly` package, once per notebook."""
    config = {"displaylogo": False, "responsive": True}
    payload = _script_payload('{"figure":' + pio.to_json(fig, validate=False) + ',"config":' + json.dumps(config) + "}")
    body = (f"<div class='wb-plotly'><script type='application/json' class='wb-data'>{payload}</script>"
            "<noscript>This figure needs JavaScript.</noscript></div>")
    return Widget(body, caption_of(fig) if caption is None else caption, needs=("widgets", "plotly"))


__all__ = ["SECTION_FILES", "WIDGETS_JS", "Widget", "attention_viewer", "figure_widget", "graph_viewer"]
