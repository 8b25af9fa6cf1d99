// workbench report widgets (no dependencies, no network)
//
// One script serves every viewer on a page: a report page loads it once as assets/widgets.js; a notebook gets it
// inside the output of its first viewer (workbench/report/scripts.py). Each viewer root (.wb-attn, .wb-graph,
// .wb-feature, .wb-plotly) is built once, whenever it appears: when this script runs, when the page finishes
// parsing, and later through a MutationObserver, since a notebook adds outputs after the script ran and an
// exported notebook may carry the script in an output below the viewers it serves. Running the script again (a
// re-run cell, a duplicated output) changes nothing: the copy already installed just looks for new viewers.
(function () {
  "use strict";
  const VERSION = typeof WB_WIDGETS_VERSION === "string" ? WB_WIDGETS_VERSION : "";
  if (window.wbWidgets && window.wbWidgets.version === VERSION) {
    window.wbWidgets.scan();
    return;
  }
  if (window.wbWidgets) window.wbWidgets.stop();  // an older copy (the package was upgraded): this one takes over
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
  function featureCard(root) {  // an SAE feature's dashboard (HTML from workbench/report/dashboards.py)
    const readout = el("div", {class: "wb-f-readout"}, "Hover a token for its activation.");
    root.insertBefore(readout, root.querySelector(".wb-f-body"));
    root.addEventListener("mouseover", (ev) => {
      const tok = ev.target.closest(".tok[data-act]");
      if (!tok || !root.contains(tok)) return;
      root.querySelectorAll(".tok.wb-f-hot").forEach((t) => t.classList.remove("wb-f-hot"));
      tok.classList.add("wb-f-hot");
      readout.textContent = "'" + tok.textContent + "': activation " + tok.dataset.act;
    });
    root.dataset.ready = "1";
  }
  function plotlyFigure(root) {  // a plotly figure whose plotly.js came in a notebook output (see mount)
    const d = JSON.parse(root.querySelector("script.wb-data").textContent);
    const div = el("div", {class: "wb-plotly-plot"});
    root.appendChild(div);
    window.Plotly.newPlot(div, d.figure.data, d.figure.layout, d.config).then(() => { root.dataset.ready = "1"; });
  }
  const KINDS = [[".wb-attn", attentionViewer], [".wb-graph", graphViewer], [".wb-feature", featureCard],
                 [".wb-plotly", plotlyFigure]];
  const SELECTOR = KINDS.map(([sel]) => sel).join(",");
  function mount(root) {
    if (root.dataset.wbMounted) return;
    if (root.matches(".wb-plotly") && typeof window.Plotly === "undefined") return;  // built when plotly.js runs
    root.dataset.wbMounted = "1";
    const [, build] = KINDS.find(([sel]) => root.matches(sel));
    try {
      build(root);
    } catch (err) {
      console.error("workbench viewer:", err);
    }
  }
  function scan(node) {
    const where = node || document;
    if (where.matches && where.matches(SELECTOR)) mount(where);
    where.querySelectorAll(SELECTOR).forEach(mount);
  }
  // widgets.css: `workbench.report.scripts.WIDGETS_JS` defines WB_WIDGETS_CSS ahead of this script
  const style = document.createElement("style");
  style.id = "wb-widgets-css";
  style.textContent = typeof WB_WIDGETS_CSS === "string" ? WB_WIDGETS_CSS : "";
  const old = document.getElementById(style.id);
  if (old) old.remove();
  (document.head || document.documentElement).appendChild(style);
  const observer = new MutationObserver((records) => {
    for (const r of records) r.addedNodes.forEach((n) => { if (n.nodeType === 1) scan(n); });
  });
  function start() {
    scan();
    observer.observe(document.documentElement, {childList: true, subtree: true});
  }
  window.wbWidgets = {version: VERSION, scan: () => scan(),
                      stop: () => { observer.disconnect(); style.remove(); }};
  // While the page is still parsing, only what lies above this script is complete: build that now and the rest
  // once parsing ends (an observer would see a viewer's root before its data).
  if (document.readyState === "loading") {
    scan();
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
