"""Feature dashboards as a static site that works offline: an index sortable by density and max
activation, and one page per feature (top contexts, quantile examples, a histogram, logit effects),
rendered from the `FeatureData` that `workbench.sae.features.collect_feature_data` gathers; and one
feature's dashboard as a `Widget` for a notebook (`feature_card`).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Union

import numpy as np

from workbench.artifacts import write_output_folder
from workbench.report.assets import read_asset
from workbench.report.widgets import Widget
from workbench.sae.features import FeatureData

STYLE = read_asset("dashboard.css")
SORT_SCRIPT = read_asset("dashboard.js")
"""The dashboards' style sheet and the index's sorting script (workbench/report/assets/dashboard.css, .js),
inlined into each page so that it works from the disk alone."""


def _context(data: FeatureData, j: int, where: int, width: int = 10) -> str:
    S = data.token_rows.shape[1]
    row, pos = divmod(int(where), S)
    acts = data.acts_lookup[row][:, j]
    peak = max(float(acts.max()), 1e-9)
    spans = []
    for p in range(max(1, pos - width), min(S, pos + 3)):
        a = float(acts[p])
        alpha = min(1.0, max(0.0, a / peak))
        style = f"background:rgba(255,80,0,{alpha:.2f})" + (";outline:1px solid #333" if p == pos else "")
        spans.append(f"<span class='tok' style='{style}' title='{a:.3f}' data-act='{a:.3f}'>"
                     f"{html.escape(data.token_strings[row][p]) or '&nbsp;'}</span>")
    return f"<div class='ctx'><b>{float(acts[pos]):.2f}</b> " + "".join(spans) + "</div>"


def _histogram_svg(values: np.ndarray, bins: int = 30) -> str:
    values = values[np.isfinite(values)]
    if not len(values):
        return "<p>(never fired)</p>"
    counts, edges = np.histogram(values, bins=bins)
    w, h, top = 600, 120, max(int(counts.max()), 1)
    bars = "".join(f"<rect x='{i * w / bins:.1f}' y='{h - c / top * h:.1f}' width='{w / bins - 1:.1f}' "
                   f"height='{c / top * h:.1f}' fill='#4c78a8'><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}</title>"
                   "</rect>" for i, c in enumerate(counts))
    return (f"<svg width='{w}' height='{h + 16}'>{bars}<text x='0' y='{h + 14}' font-size='11'>{edges[0]:.3g}</text>"
            f"<text x='{w - 40}' y='{h + 14}' font-size='11'>{edges[-1]:.3g}</text></svg>")


def _feature_parts(data: FeatureData, j: int) -> dict[str, str]:
    """The HTML of the j-th feature's sections: its histogram, top contexts, quantile examples and logit effects."""
    top = [_context(data, j, w) for w in data.top_where[j] if w >= 0]
    sample = [(v, w) for v, w in zip(data.sample_values[j], data.sample_where[j]) if w >= 0]
    quantiles = ""
    if sample:
        sample.sort()
        groups = np.array_split(np.arange(len(sample)), min(4, len(sample)))
        for g, idx in enumerate(groups):
            lo, hi = sample[idx[0]][0], sample[idx[-1]][0]
            quantiles += f"<h4>quantile {g + 1} of {len(groups)} ({lo:.2f}–{hi:.2f})</h4>"
            quantiles += "".join(_context(data, j, sample[i][1]) for i in idx[-3:])
    logits = ("<table><tr><th>raises</th><th>lowers</th></tr>" + "".join(
        f"<tr><td class='up'>{html.escape(a)} {va:+.3f}</td><td class='down'>{html.escape(b)} {vb:+.3f}</td></tr>"
        for (a, va), (b, vb) in zip(data.logit_up[j], data.logit_down[j])) + "</table>")
    return {"histogram": _histogram_svg(data.sample_values[j]), "top": "".join(top) or "<p>(never fired)</p>",
            "quantiles": quantiles or "<p>(never fired)</p>", "logits": logits,
            "summary": f"density {data.density[j]:.4%} · max activation {data.top_values[j, 0]:.3f}",
            "sample_note": f"(a random sample of up to {data.sample_values.shape[1]} non-zero activations)"}


def feature_page(data: FeatureData, j: int, title: str) -> str:
    fid = int(data.features[j])
    part = _feature_parts(data, j)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)} · feature {fid}</title>"
            f"<style>{STYLE}</style></head><body><p><a href='index.html'>← all features</a></p>"
            f"<h1>Feature {fid}</h1><p>{part['summary']}</p>"
            f"<h2>Activation histogram</h2><p>{part['sample_note']}</p>{part['histogram']}"
            f"<h2>Top activations</h2>{part['top']}"
            f"<h2>Examples across the activation range</h2>{part['quantiles']}"
            f"<h2>Logit effects (W_dec W_U)</h2>{part['logits']}</body></html>")


def feature_card(data: FeatureData, j: int, title: str, caption: str = "") -> Widget:
    """The j-th feature of `data` as one dashboard for a notebook: what a feature page shows, in a box whose
    styles stay inside it; hover a token of a context for its activation."""
    part = _feature_parts(data, j)
    body = (f"<div class='wb-feature'><div class='wb-f-title'>{html.escape(title)}</div>"
            f"<div class='wb-f-meta'>{part['summary']}</div><div class='wb-f-body'>"
            f"<div class='wb-f-sub'>Top activations</div>{part['top']}"
            f"<details><summary class='wb-f-sub'>Examples across the activation range</summary>{part['quantiles']}"
            f"</details><div class='wb-f-sub'>Activation histogram {part['sample_note']}</div>{part['histogram']}"
            f"<div class='wb-f-sub'>Logit effects (W_dec W_U)</div>{part['logits']}</div></div>")
    return Widget(body, caption)


def index_page(data: FeatureData, title: str, selection: str) -> str:
    rows = "".join(
        f"<tr><td><a href='feature_{int(f):05d}.html'>{int(f)}</a></td><td>{data.density[j]:.6f}</td>"
        f"<td>{max(float(data.top_values[j, 0]), 0.0):.4f}</td>"
        f"<td>{html.escape(', '.join(t for t, _ in data.logit_up[j][:5]))}</td></tr>"
        for j, f in enumerate(data.features))
    script = SORT_SCRIPT
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{script}</script></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{_coverage(data, selection)} Click a column to sort.</p>"
            "<table id='f'><thead><tr><th onclick='sortBy(0)'>feature</th><th onclick='sortBy(1)'>density</th>"
            "<th onclick='sortBy(2)'>max activation</th><th onclick='sortBy(3)'>top logits</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></body></html>")


def _coverage(data: FeatureData, selection: str) -> str:
    n = len(data.features)
    if n == data.d_sae:
        return f"All {n} latents of the SAE."
    return f"A sample of {n} of the SAE's {data.d_sae} latents ({selection})."


def render_dashboards(data: FeatureData, title: str = "SAE features", selection: str = "chosen by the caller"
                      ) -> dict[str, str]:
    """{file name: HTML} for the index and every feature page. `selection` says how `data.features` were
    chosen when they are a sample of the SAE's latents (e.g. 'evenly spaced ids'); the index shows it."""
    pages = {"index.html": index_page(data, title, selection)}
    pages.update({f"feature_{int(f):05d}.html": feature_page(data, j, title) for j, f in enumerate(data.features)})
    pages["features.json"] = json.dumps({"features": data.features.tolist(), "density": data.density.tolist(),
                                         "max_activation": data.top_values[:, 0].tolist()})
    return pages


def write_dashboards(data: FeatureData, folder: Union[str, Path], title: str = "SAE features",
                     selection: str = "chosen by the caller") -> Path:
    """Write the site into `folder`: built aside, then moved into place; an existing folder is replaced
    only if the workbench wrote it (see `artifacts.write_output_folder`)."""
    pages = render_dashboards(data, title, selection)

    def build(tmp: Path) -> None:
        for name, text in pages.items():
            (tmp / name).write_text(text)

    return write_output_folder(Path(folder), "dashboard", build)
