"""Report widgets: interactive HTML for what a plotly figure can't show well. Pure: each function takes
arrays and returns a `Widget` (HTML plus a caption); the script they need is `WIDGETS_JS`, which the
report writes once as `assets/widgets.js`.

    attention_viewer(tokens, patterns_LHSS, ...)   the prompt as text; hover or click a token to see
                                                   where the chosen head attends from it, with layer
                                                   and head pickers, every head's strongest key for
                                                   that token, and the head's whole pattern

Patterns travel as bytes (attention weight × 255, lower triangle only, base64), so a 256-token
prompt on a 2-layer, 4-head model is about 350 kB.
"""

from __future__ import annotations

import base64
import html
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
.wb-fill{display:block;height:8px;background:#f0883e}`;
  function start() {
    const s = document.createElement("style");
    s.textContent = style;
    document.head.appendChild(s);
    document.querySelectorAll(".wb-attn").forEach(attentionViewer);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
"""
