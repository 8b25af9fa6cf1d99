"""Report widgets: interactive HTML for what a plotly figure can't show well. Pure: each function takes
arrays (or a graph as a dict) and returns a `Widget` (HTML plus a caption); the script they need is
`WIDGETS_JS`, which the report writes once as `assets/widgets.js`.

    attention_viewer(tokens, patterns_LHSS, ...)   the prompt as text; hover or click a token to see
                                                   where the chosen head attends from it, with layer
                                                   and head pickers, every head's strongest key for
                                                   that token, and the head's whole pattern
    graph_viewer(data, ...)                        an attribution graph drawn as tokens × layers:
                                                   node and edge threshold sliders; click a node for
                                                   its activation, influence, dashboard link, top
                                                   examples and strongest inputs and outputs

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
from dataclasses import dataclass

import numpy as np

SECTION_FILES = "@section-files@"
"""A link target in a widget's HTML that starts with this means the analysis's own files (its
`Result.files()`); the report replaces it with the folder it writes them to."""


@dataclass(frozen=True)
class Widget:
    """A self-contained piece of a report page and its caption."""

    html: str
    caption: str


def _lower_triangle_bytes(patterns_LHSS: np.ndarray) -> str:
    L, H, S, _ = patterns_LHSS.shape
    rows, cols = np.tril_indices(S)
    q = np.clip(np.rint(np.asarray(patterns_LHSS, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    return base64.b64encode(q[:, :, rows, cols].tobytes()).decode()


def attention_viewer(tokens: Sequence[str], patterns_LHSS: np.ndarray, title: str, caption: str,
                     layer_names: Sequence[str] = (), head_names: Sequence[str] = ()) -> Widget:
    """Attention patterns [layers, heads, query, key] of one prompt, explorable token by token.
    `tokens` are display strings (see `workbench.tokenizer.readable_tokens`)."""
    patterns_LHSS = np.asarray(patterns_LHSS)
    L, H, S, S2 = patterns_LHSS.shape
    if S != S2 or len(tokens) != S:
        raise ValueError(f"attention_viewer: patterns {patterns_LHSS.shape} do not match {len(tokens)} tokens")
    data = {"tokens": list(tokens), "L": L, "H": H, "S": S, "tril": _lower_triangle_bytes(patterns_LHSS),
            "layers": list(layer_names) or [f"layer {l}" for l in range(L)],
            "heads": list(head_names) or [f"H{h}" for h in range(H)], "title": title}
    uid = f"attn-{uuid.uuid5(uuid.NAMESPACE_OID, title + str(S) + str(L) + str(H)).hex[:10]}"
    payload = json.dumps(data).replace("</", "<\\/")
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
    payload = json.dumps(_graph_payload(data), separators=(",", ":"), allow_nan=False)
    payload = payload.replace("</", "<\\/").replace("<!--", "\\u003c!--")  # nothing can end the script early
    uid = f"graph-{uuid.uuid5(uuid.NAMESPACE_OID, title + payload).hex[:10]}"
    body = (f"<div class='wb-graph' id='{uid}'><div class='wb-g-title'>{html.escape(title)}</div>"
            f"<script type='application/json' class='wb-data'>{payload}</script>"
            "<noscript>The graph viewer needs JavaScript.</noscript></div>")
    return Widget(body, caption)


WIDGETS_JS = r"""
// workbench report widgets (no dependencies, no network)
(function () {
  "use strict";
  function decode(b64) {
    const bin = atob(b64), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function attentionViewer(root) {
    const d = JSON.parse(root.querySelector("script.wb-data").textContent);
    const tri = decode(d.tril), S = d.S, T = S * (S + 1) / 2;
    const w = (l, h, q, k) => (k > q ? 0 : tri[(l * d.H + h) * T + q * (q + 1) / 2 + k] / 255);
    let layer = 0, head = 0, query = S - 1, locked = false;
    const bar = el("div", {class: "wb-controls"});
    const lsel = el("select", {"aria-label": "layer"}), hsel = el("select", {"aria-label": "head"});
    d.layers.forEach((n, i) => lsel.appendChild(el("option", {value: i}, n)));
    d.heads.forEach((n, i) => hsel.appendChild(el("option", {value: i}, n)));
    bar.append("Layer ", lsel, " Head ", hsel,
               el("span", {class: "wb-hint"}, "  Hover a token to see where the head attends from it; click to pin."));
    const readout = el("div", {class: "wb-readout"});
    const toks = el("div", {class: "wb-tokens"});
    const spans = d.tokens.map((t, i) => {
      const s = el("span", {class: "wb-tok", "data-pos": i, title: "position " + i}, t === "" ? "\u00a0" : t);
      s.addEventListener("mouseenter", () => { if (!locked) { query = i; draw(); } });
      s.addEventListener("click", () => { locked = !(locked && query === i); query = i; draw(); });
      toks.appendChild(s);
      return s;
    });
    const heads = el("div", {class: "wb-heads"});
    const canvas = el("canvas", {class: "wb-canvas", width: Math.min(360, Math.max(120, 3 * S)),
                                 height: Math.min(360, Math.max(120, 3 * S))});
    canvas.addEventListener("mousemove", (ev) => {
      if (locked) return;
      const r = canvas.getBoundingClientRect();
      query = Math.min(S - 1, Math.max(0, Math.floor((ev.clientY - r.top) / r.height * S)));
      draw();
    });
    const side = el("div", {class: "wb-side"});
    side.append(el("div", {class: "wb-sub"}, "This head's whole pattern (rows: query, columns: key)"), canvas,
                el("div", {class: "wb-sub"}, "Every head of this layer, from the chosen token"), heads);
    const grid = el("div", {class: "wb-grid"});
    const left = el("div");
    left.append(readout, toks);
    grid.append(left, side);
    root.append(bar, grid);
    lsel.addEventListener("change", () => { layer = +lsel.value; draw(true); });
    hsel.addEventListener("change", () => { head = +hsel.value; draw(true); });
    function top(l, h, q, n) {
      const ks = [];
      for (let k = 0; k <= q; k++) ks.push([w(l, h, q, k), k]);
      return ks.sort((a, b) => b[0] - a[0]).slice(0, n);
    }
    function label(k) { return "'" + d.tokens[k] + "' (" + k + ")"; }
    function drawCanvas() {
      const ctx = canvas.getContext("2d"), c = canvas.width / S;
      const img = ctx.createImageData(canvas.width, canvas.height);
      for (let y = 0; y < canvas.height; y++) {
        const q = Math.floor(y / c);
        for (let x = 0; x < canvas.width; x++) {
          const v = w(layer, head, q, Math.floor(x / c)), i = 4 * (y * canvas.width + x);
          img.data[i] = 255 - 40 * v; img.data[i + 1] = 255 - 200 * v; img.data[i + 2] = 255 - 255 * v;
          img.data[i + 3] = 255;
        }
      }
      ctx.putImageData(img, 0, 0);
      ctx.strokeStyle = "#0969da"; ctx.strokeRect(0, query * c, canvas.width, Math.max(1, c));
    }
    function draw(full) {
      spans.forEach((s, k) => {
        const v = w(layer, head, query, k);
        s.style.background = k <= query ? "rgba(255,80,0," + v.toFixed(3) + ")" : "transparent";
        s.style.color = k > query ? "#8c959f" : "";
        s.classList.toggle("wb-query", k === query);
      });
      const best = top(layer, head, query, 3);
      readout.textContent = d.layers[layer] + ", " + d.heads[head] + ", from " + label(query) +
        (locked ? " [pinned]" : "") + ": " + best.map(([v, k]) => label(k) + " " + v.toFixed(2)).join(", ");
      heads.replaceChildren(...d.heads.map((name, h) => {
        const [v, k] = top(layer, h, query, 1)[0];
        const row = el("div", {class: "wb-head" + (h === head ? " wb-chosen" : "")});
        const fill = el("span", {class: "wb-fill"});
        fill.style.width = (100 * v).toFixed(0) + "%";
        row.append(el("b", {}, name + " "), el("span", {class: "wb-bar"}), " " + label(k) + " " + v.toFixed(2));
        row.querySelector(".wb-bar").appendChild(fill);
        row.addEventListener("click", () => { head = h; hsel.value = h; draw(true); });
        return row;
      }));
      drawCanvas();
    }
    draw(true);
    root.dataset.ready = "1";
  }
  const SVGNS = "http://www.w3.org/2000/svg";
  function sv(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function num(v) {
    const a = Math.abs(v);
    return a !== 0 && (a < 0.001 || a >= 1e4) ? v.toExponential(2) : String(+v.toFixed(3));
  }
  function short(t, n) { return t.length > n ? t.slice(0, n - 1) + "\u2026" : t; }
  function graphViewer(root) {
    const d = JSON.parse(root.querySelector("script.wb-data").textContent);
    const L = d.n_layers, S = d.tokens.length, nodes = d.nodes, N = nodes.length, byId = new Map();
    nodes.forEach((n, i) => byId.set(n.id, i));
    const edges = d.edges.map(([s, t, w, c]) => ({s: byId.get(s), t: byId.get(t), w: w, c: c}));
    const into = nodes.map(() => []), outof = nodes.map(() => []);
    edges.forEach((e, k) => { outof[e.s].push(k); into[e.t].push(k); });
    const mag = (k) => Math.abs(edges[k].w);
    const edgeOrder = edges.map((_, k) => k).sort((a, b) => mag(a) - mag(b));  // strongest drawn last, on top
    const nodeOrder = nodes.map((_, i) => i).sort((a, b) => nodes[a].layer - nodes[b].layer ||
      nodes[a].pos - nodes[b].pos || Math.abs(nodes[b].influence) - Math.abs(nodes[a].influence) || a - b);
    const always = (n) => n.kind === "embedding" || n.kind === "logit";
    const layerName = (l) => (l < 0 ? "embedding" : l === L ? "logits" : "layer " + l);
    // layout: a band per layer (logits on top); the nodes of one (layer, position) cell sit in a small grid,
    // at most PER (PERLOGIT) a row, the band as tall as its busiest cell needs; columns as wide as their
    // widest grid row or token label. The drawing scales to the panel's width, within MINSCALE..MAXSCALE.
    const TOP = 78, LEFT = 46, BAND = 44, MINCOL = 30, CH = 6.7, PAD = 12, SP = 14, SPLOGIT = 18;
    const PER = 8, PERLOGIT = 12, RS = 14, RSLOGIT = 30, MINSCALE = 0.75, MAXSCALE = 1.4;
    let nodeThr = d.node_threshold, edgeThr = d.edge_threshold, selected = -1, selG = null;
    let svg = null, hotG = null, gOf = new Map(), top = 0;
    const shown = new Uint8Array(N), px = new Float64Array(N), py = new Float64Array(N);
    const visible = (e) => e.c <= edgeThr && shown[e.s] && shown[e.t];
    const width = (w) => 0.5 + 5.5 * Math.abs(w) / (top || 1);
    const bar = el("div", {class: "wb-g-controls"});
    function slider(name, value, set) {
      const input = el("input", {type: "range", min: 0, max: 1, step: 0.01, "aria-label": name});
      input.value = value;
      const out = el("span", {class: "wb-g-value"}, value.toFixed(2));
      input.addEventListener("input", () => {
        set(+input.value);
        out.textContent = (+input.value).toFixed(2);
        draw();
      });
      const lab = el("label", {class: "wb-g-range"});
      lab.append(name + " ", input, " ", out);
      return lab;
    }
    const count = el("span", {class: "wb-g-count"});
    bar.append(slider("node threshold", nodeThr, (v) => { nodeThr = v; }),
               slider("edge threshold", edgeThr, (v) => { edgeThr = v; }), count,
               el("span", {class: "wb-g-hint"}, "Click a node for its details; hover for a summary."));
    const plot = el("div", {class: "wb-g-plot"}), side = el("div", {class: "wb-g-side"});
    const layout = el("div", {class: "wb-g-layout"});
    layout.append(plot, side);
    root.append(bar, layout);
    function tip(n) {
      return n.label + "\n" + n.kind + ", " + layerName(n.layer) + ", position " + n.pos + " '" + d.tokens[n.pos] +
        "'\nactivation " + num(n.activation) + ", influence " + num(n.influence);
    }
    function draw() {
      for (let i = 0; i < N; i++) shown[i] = always(nodes[i]) || nodes[i].node_cut <= nodeThr ? 1 : 0;
      const slot = new Int32Array(N), cells = new Map(), most = new Array(L + 2).fill(0);
      for (const i of nodeOrder) {  // a cell's nodes in order of influence, strongest first
        if (!shown[i]) continue;
        const n = nodes[i], key = (n.layer + 1) * S + n.pos, c = cells.get(key) || 0;
        slot[i] = c;
        cells.set(key, c + 1);
        most[n.layer + 1] = Math.max(most[n.layer + 1], c + 1);
      }
      const isLogit = (b) => b === L + 1, sp = (b) => (isLogit(b) ? SPLOGIT : SP);
      const rowsOf = most.map((m, b) => Math.max(1, Math.ceil(m / (isLogit(b) ? PERLOGIT : PER))));
      const need = new Array(S).fill(0);
      cells.forEach((c, key) => {
        const b = Math.floor(key / S), p = key % S;
        need[p] = Math.max(need[p], Math.ceil(c / rowsOf[b]) * sp(b) + PAD);
      });
      const colX = [], colW = [];
      let x = LEFT;
      for (let p = 0; p < S; p++) {
        colX.push(x);
        colW.push(Math.max(MINCOL, need[p], Math.ceil(CH * short(d.tokens[p], 9).length) + 8));
        x += colW[p];
      }
      const bandTop = new Array(L + 2), bandH = new Array(L + 2);
      let y = TOP;
      for (let b = L + 1; b >= 0; b--) {
        bandTop[b] = y;
        bandH[b] = BAND + (rowsOf[b] - 1) * (isLogit(b) ? RSLOGIT : RS);
        y += bandH[b];
      }
      const mid = (b) => bandTop[b] + bandH[b] / 2;
      let right = x + 16;
      for (let i = 0; i < N; i++) {
        if (!shown[i]) continue;
        const n = nodes[i], b = n.layer + 1, c = cells.get(b * S + n.pos), step = sp(b);
        const cap = Math.min(c, isLogit(b) ? PERLOGIT : PER,  // a row may use the column's spare width
                             Math.max(Math.ceil(c / rowsOf[b]), Math.floor((colW[n.pos] - PAD) / step)));
        const rows = Math.ceil(c / cap), per = Math.ceil(c / rows);  // balanced rows
        const r = Math.floor(slot[i] / per), inRow = r < rows - 1 ? per : c - r * per;
        px[i] = colX[n.pos] + colW[n.pos] / 2 + (slot[i] - r * per - (inRow - 1) / 2) * step;
        py[i] = mid(b) + (r - (rows - 1) / 2) * (isLogit(b) ? RSLOGIT : RS);
        if (n.kind === "logit") right = Math.max(right, px[i] + 16 + 0.65 * 6.1 * short(n.label, 14).length);
      }
      const W = Math.ceil(right), yEnd = y, H = yEnd + 26;
      svg = sv("svg", {class: "wb-g-svg", width: "100%", viewBox: "0 0 " + W + " " + H,
                       preserveAspectRatio: "xMinYMin meet"});
      svg.style.minWidth = Math.round(MINSCALE * W) + "px";
      svg.style.maxWidth = Math.round(MAXSCALE * W) + "px";
      const axes = sv("g", {class: "wb-g-axes"});
      for (let b = 0; b <= L + 1; b++) {
        const l = b - 1;
        if (b % 2) {
          axes.append(sv("rect", {class: "wb-g-band", x: LEFT, y: bandTop[b], width: x - LEFT, height: bandH[b]}));
        }
        axes.append(sv("text", {x: LEFT - 8, y: mid(b) + 4, "text-anchor": "end"},
                       l < 0 ? "emb" : l === L ? "logit" : "L" + l));
      }
      for (let p = 0; p <= S; p++) {
        const cx = p < S ? colX[p] : x;
        axes.append(sv("line", {x1: cx, x2: cx, y1: TOP, y2: yEnd}));
        if (p === S) continue;
        const t = sv("text", {x: colX[p] + colW[p] / 2, y: yEnd + 16, "text-anchor": "middle"},
                     short(d.tokens[p], 9));
        t.append(sv("title", {}, "position " + p + ": '" + d.tokens[p] + "'"));
        axes.append(t);
      }
      // edges batched into one path per sign and width step (24 steps): a few elements, not thousands
      const NB = 24, batches = new Map(), eg = sv("g", {class: "wb-g-edges"});
      let nEdges = 0, nNodes = 0;
      top = 0;
      for (const e of edges) if (visible(e)) top = Math.max(top, Math.abs(e.w));
      for (const k of edgeOrder) {
        const e = edges[k];
        if (!visible(e)) continue;
        const key = 2 * Math.round(NB * Math.abs(e.w) / (top || 1)) + (e.w < 0 ? 1 : 0);
        if (!batches.has(key)) batches.set(key, []);
        batches.get(key).push("M" + px[e.s].toFixed(1) + "," + py[e.s].toFixed(1) +
                              "L" + px[e.t].toFixed(1) + "," + py[e.t].toFixed(1));
        nEdges++;
      }
      [...batches.keys()].sort((a, b) => a - b).forEach((key) => eg.appendChild(sv("path", {
        d: batches.get(key).join(""), class: "wb-g-edge " + (key % 2 ? "wb-g-minus" : "wb-g-plus"),
        "stroke-width": (0.5 + 5.5 * (key >> 1) / NB).toFixed(2)})));
      hotG = sv("g", {class: "wb-g-edges"});
      const ng = sv("g", {class: "wb-g-nodes"});
      gOf = new Map();
      for (let i = 0; i < N; i++) {
        if (!shown[i]) continue;
        const n = nodes[i];
        const g = sv("g", {class: "wb-g-node wb-g-" + n.kind, "data-node-id": n.id, "data-kind": n.kind,
                           transform: "translate(" + px[i].toFixed(1) + "," + py[i].toFixed(1) + ")"});
        if (n.kind === "feature") g.append(sv("circle", {r: 5}));
        else if (n.kind === "error") g.append(sv("rect", {x: -4.5, y: -4.5, width: 9, height: 9}));
        else if (n.kind === "embedding") g.append(sv("rect", {x: -7, y: -5, width: 14, height: 10, rx: 2}));
        else {
          g.append(sv("path", {d: "M0,-7L7,0L0,7L-7,0Z"}),
                   sv("text", {class: "wb-g-ltext", x: 9, y: -5, transform: "rotate(-50)"}, short(n.label, 14)));
        }
        g.append(sv("title", {}, tip(n)));
        ng.appendChild(g);
        gOf.set(i, g);
        nNodes++;
      }
      svg.append(axes, eg, hotG, ng);
      svg.addEventListener("click", (ev) => {
        const g = ev.target.closest("[data-node-id]");
        const i = g ? byId.get(+g.getAttribute("data-node-id")) : -1;
        select(i === selected ? -1 : i);
      });
      plot.replaceChildren(svg);
      count.textContent = nNodes + " nodes, " + nEdges + " edges shown";
      selG = null;
      highlight();
      panel();
    }
    function highlight() {  // the selected node and its visible edges, drawn again on top
      if (selG) selG.classList.remove("wb-g-sel");
      selG = selected >= 0 ? gOf.get(selected) || null : null;
      svg.classList.toggle("wb-g-focus", selected >= 0);
      hotG.replaceChildren();
      if (selected < 0) return;
      if (selG) selG.classList.add("wb-g-sel");
      into[selected].concat(outof[selected]).sort((a, b) => mag(a) - mag(b)).forEach((k) => {
        const e = edges[k];
        if (!visible(e)) return;
        hotG.appendChild(sv("line", {x1: px[e.s], y1: py[e.s], x2: px[e.t], y2: py[e.t],
                                     class: "wb-g-edge wb-g-hot " + (e.w >= 0 ? "wb-g-plus" : "wb-g-minus"),
                                     "stroke-width": width(e.w).toFixed(2)}));
      });
    }
    function edgeList(title, ks, end) {
      const box = el("div", {class: "wb-g-list"});
      box.append(el("div", {class: "wb-g-sub"}, title + (ks.length ? "" : ": none")));
      ks.slice().sort((a, b) => mag(b) - mag(a)).slice(0, 5).forEach((k) => {
        const e = edges[k], other = e[end];
        const row = el("div", {class: "wb-g-item", title: tip(nodes[other])});
        row.append(el("span", {class: e.w >= 0 ? "wb-g-wplus" : "wb-g-wminus"}, (e.w >= 0 ? "+" : "") + num(e.w)),
                   " " + nodes[other].label + (shown[other] ? "" : " (hidden)"));
        row.addEventListener("click", () => select(other));
        box.append(row);
      });
      return box;
    }
    function panel() {
      if (selected < 0) {
        side.replaceChildren(el("div", {class: "wb-g-hint"}, "Click a node to see its details."));
        return;
      }
      const n = nodes[selected];
      const parts = [el("div", {class: "wb-g-label"}, n.label),
        el("div", {class: "wb-g-meta"}, n.kind + ", " + layerName(n.layer) + ", position " + n.pos +
           " '" + d.tokens[n.pos] + "'"),
        el("div", {class: "wb-g-meta"}, "activation " + num(n.activation) + ", influence " + num(n.influence))];
      if (!shown[selected]) parts.push(el("div", {class: "wb-g-hint"}, "Hidden at this node threshold."));
      if (n.href && !/^\s*javascript:/i.test(n.href)) {
        parts.push(el("a", {class: "wb-g-link", href: n.href}, "Open this feature's dashboard"));
      }
      if (n.examples.length) {
        const ol = el("ol", {class: "wb-g-examples"});
        n.examples.forEach(([text, a]) => {
          const li = el("li", {}, text);
          li.append(el("span", {class: "wb-g-act"}, "  " + num(a)));
          ol.append(li);
        });
        parts.push(el("div", {class: "wb-g-sub"}, "Top activating examples"), ol);
      }
      parts.push(edgeList("Strongest inputs", into[selected], "s"),
                 edgeList("Strongest outputs", outof[selected], "t"));
      side.replaceChildren(...parts);
    }
    function select(i) {
      selected = i;
      highlight();
      panel();
    }
    draw();
    root.dataset.ready = "1";
  }
  const style = `
.wb-attn{border:1px solid #d0d7de;border-radius:6px;padding:10px;margin:6px 0}
.wb-attn-title{font-weight:600;margin-bottom:4px}.wb-hint{color:#57606a;font-size:0.85em}
.wb-grid{display:grid;grid-template-columns:minmax(0,1fr) 380px;gap:14px;margin-top:8px}
.wb-tokens{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;max-height:420px;overflow-y:auto}
.wb-tok{display:inline-block;padding:0 1px;margin:1px;border-radius:3px;cursor:pointer;white-space:pre}
.wb-query{outline:2px solid #0969da}
.wb-readout{font-size:0.9em;margin-bottom:6px;min-height:2.6em}
.wb-canvas{border:1px solid #d0d7de;width:360px;height:360px;image-rendering:pixelated}
.wb-sub{font-size:0.8em;color:#57606a;margin:4px 0}
.wb-head{font-size:12px;font-family:ui-monospace,monospace;cursor:pointer;white-space:nowrap;overflow:hidden}
.wb-chosen{background:#ddf4ff}.wb-bar{display:inline-block;width:60px;height:8px;background:#eee;vertical-align:middle}
.wb-fill{display:block;height:8px;background:#f0883e}
.wb-graph{border:1px solid #d0d7de;border-radius:6px;padding:10px;margin:6px 0}
.wb-g-title{font-weight:600;margin-bottom:4px}.wb-g-hint{color:#57606a;font-size:0.85em}
.wb-g-controls{display:flex;flex-wrap:wrap;gap:6px 18px;align-items:center;font-size:0.9em}
.wb-g-range input{vertical-align:middle;width:150px}.wb-g-value{font-family:ui-monospace,monospace}
.wb-g-count{color:#57606a}
.wb-g-layout{display:grid;grid-template-columns:minmax(0,1fr) 320px;gap:14px;margin-top:8px}
.wb-g-plot{overflow:auto;max-height:640px;border:1px solid #eaeef2;border-radius:4px;align-self:start}
.wb-g-svg{display:block;height:auto;margin:0 auto;font-family:ui-monospace,monospace;font-size:11px}
.wb-g-axes line{stroke:#eaeef2}.wb-g-band{fill:#f6f8fa}.wb-g-axes text{fill:#57606a;white-space:pre}
.wb-g-edges{pointer-events:none}.wb-g-edge{fill:none;stroke-opacity:0.45;stroke-linecap:round}
.wb-g-plus{stroke:#0969da}.wb-g-minus{stroke:#cf222e}
.wb-g-focus .wb-g-edge{stroke-opacity:0.07}.wb-g-focus .wb-g-edge.wb-g-hot{stroke-opacity:0.95}
.wb-g-node{cursor:pointer}.wb-g-node>:first-child{stroke:#fff;stroke-width:1}
.wb-g-feature>circle{fill:#f0883e}.wb-g-error>rect{fill:#8c959f}
.wb-g-embedding>rect{fill:#2da44e}.wb-g-logit>path{fill:#8250df}
.wb-g-node:hover>:first-child{stroke:#24292f;stroke-width:1.5}
.wb-g-node.wb-g-sel>:first-child{stroke:#0969da;stroke-width:3}
.wb-g-ltext{fill:#24292f;font-size:10px;white-space:pre}
.wb-g-side{font-size:0.9em;max-height:640px;overflow-y:auto;overflow-wrap:anywhere}
.wb-g-label{font-weight:600;margin-bottom:2px}.wb-g-meta{color:#57606a}.wb-g-link{display:block;margin:4px 0}
.wb-g-sub{font-size:0.85em;color:#57606a;margin:8px 0 2px}
.wb-g-examples{padding-left:2.6em;margin:0;font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap}
.wb-g-act,.wb-g-wplus,.wb-g-wminus{font-family:ui-monospace,monospace}
.wb-g-wplus{color:#0969da}.wb-g-wminus{color:#cf222e}
.wb-g-item{cursor:pointer;padding:1px 3px;border-radius:3px}.wb-g-item:hover{background:#ddf4ff}`;
  function start() {
    const s = document.createElement("style");
    s.textContent = style;
    document.head.appendChild(s);
    document.querySelectorAll(".wb-attn").forEach(attentionViewer);
    document.querySelectorAll(".wb-graph").forEach(graphViewer);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
"""
