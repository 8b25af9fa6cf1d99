"""The report's HTML: an overview page, one page per study with a sidebar, and the shared assets.

    index.html              what the report is, the models, every study's headline with a link,
                            and the reading order; one figure at a glance
    <study>.html            one page per analysis: its idea, then each model's findings, figures and
                            captions, key numbers and linked pages (dashboards)
    assets/plotly.min.js    loaded once by every page (never from a network)
    assets/report.css, assets/widgets.js

Pure string building: `render_pages` returns {relative path: text}; `report.write_report` decides
where they go. Everything shown comes from `Section`s (figures, widgets, metrics, headlines).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from workbench.report.assets import read_asset
from workbench.report.plotting import caption_of
from workbench.report.widgets import SECTION_FILES, WIDGETS_JS, Widget

CSS = read_asset("report.css")
"""The report's style sheet (workbench/report/assets/report.css)."""


@dataclass(frozen=True)
class PageSpec:
    """One study's page: which analysis, its title, where it sits in the reading order, its idea."""

    analysis: str
    title: str
    order: int
    intro: str
    key_figure: str = ""

    @property
    def file(self) -> str:
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.analysis)}.html"


def _head(title: str, depth: int = 0) -> str:
    up = "../" * depth
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<link rel='stylesheet' href='{up}assets/report.css'>"
            f"<script src='{up}assets/plotly.min.js'></script><script src='{up}assets/widgets.js'></script>"
            "</head><body>")


def _sidebar(specs: Sequence[PageSpec], here: str, title: str) -> str:
    links = [f"<a href='index.html' class='{'here' if here == 'index.html' else ''}'>Overview</a>"]
    links += [f"<a href='{s.file}' class='{'here' if here == s.file else ''}'>{i}. {html.escape(s.title)}</a>"
              for i, s in enumerate(specs, 1)]
    return (f"<nav class='side'><b>{html.escape(title)}</b>{''.join(links)}"
            "<div class='small'>Works offline: every script is a file in this folder.</div></nav>")


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _anchor(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "--".join(parts)).strip("-").lower()


def render_item(item: Union[go.Figure, Widget], anchor: str, height: int | None = None,
                files: str = "") -> str:
    """A figure or widget, its caption below it; `files` is the folder of the section's own files, for
    widget links that start with SECTION_FILES."""
    if isinstance(item, Widget):
        body, caption = item.html.replace(SECTION_FILES, html.escape(files or ".")), item.caption
    else:
        fig = item if height is None else go.Figure(item).update_layout(height=height)
        body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{anchor}",
                           config={"displaylogo": False, "responsive": True})
        caption = caption_of(item)
    return f"<figure id='{anchor}'>{body}<p class='caption'>{html.escape(caption)}</p></figure>"


def study_page(spec: PageSpec, sections: Sequence[Any], specs: Sequence[PageSpec], title: str) -> str:
    """One study, every model it ran on."""
    parts = [_head(f"{spec.title} · {title}"), _sidebar(specs, spec.file, title), "<main>",
             f"<h1>{html.escape(spec.title)}</h1><p class='intro'>{spec.intro}</p>"]
    if len(sections) > 1:
        parts.append("<p>Models: " + " · ".join(f"<a href='#{_anchor(s.model)}'>{html.escape(s.model)}</a>"
                                                 for s in sections) + "</p>")
    for s in sections:
        parts.append(f"<h2 id='{_anchor(s.model)}'>{html.escape(s.model)}</h2>")
        parts.append("<ul>" + "".join(f"<li>{html.escape(h)}</li>" for h in s.headlines) + "</ul>")
        entries = sorted(p for p in s.files if p.endswith("index.html"))
        if entries:
            links = [f"<a href='{html.escape(s.slug)}/{html.escape(p)}'>{html.escape(p[:-11] or 'pages')}</a>"
                     for p in entries]
            parts.append("<p>Linked pages (offline): " + " · ".join(links) + "</p>")
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>"
                       for k, v in s.metrics.items() if not isinstance(v, (dict, list)))
        parts.append(f"<details><summary>key numbers (computed in {s.seconds:.1f} s; all of them in "
                     f"metrics.json)</summary><table>{rows}</table></details>")
        for name, item in s.figures.items():
            parts.append(f"<h3>{html.escape(name)}</h3>")
            parts.append(render_item(item, _anchor(s.model, name), files=s.slug))
    parts.append("</main></body></html>")
    return "\n".join(parts)


def overview_page(specs: Sequence[PageSpec], by_study: dict[str, list[Any]], models: dict[str, str],
                  title: str) -> str:
    """What the report is, the models, the reading order with each study's headline, one key figure."""
    parts = [_head(title), _sidebar(specs, "index.html", title), "<main>", f"<h1>{html.escape(title)}</h1>",
             "<p class='intro'>This report looks inside small transformers the way the interpretability papers do: "
             "what each attention head attends to, how heads compose into induction circuits, how models store more "
             "features than they have dimensions, what sparse autoencoders find, and where facts are recalled. Read "
             "it in the order below; each page starts with the idea, then shows what was found on each model, and "
             "every figure has a caption saying what to look for.</p>"]
    if models:
        parts.append("<h2>The models</h2><ul>" + "".join(
            f"<li><b>{html.escape(m)}</b>: {html.escape(line)}</li>" for m, line in models.items()) + "</ul>")
    parts.append("<h2>Reading order</h2><ol class='order'>")
    for spec in specs:
        found = [f"<span class='headline'>{html.escape(s.model)}: {html.escape(s.headlines[0])}</span>"
                 for s in by_study[spec.analysis] if s.headlines]
        parts.append(f"<li><a href='{spec.file}'><b>{html.escape(spec.title)}</b></a><br>"
                     f"{_first_sentence(spec.intro)}<br>{'<br>'.join(found)}</li>")
    parts.append("</ol>")
    key = next(((spec, s, s.figures[spec.key_figure]) for spec in specs for s in by_study[spec.analysis]
                if spec.key_figure and spec.key_figure in s.figures), None)
    if key is not None:
        spec, s, item = key
        parts.append(f"<h2>At a glance: {html.escape(spec.title.lower())}, {html.escape(s.model)}</h2>")
        parts.append(render_item(item, "at-a-glance", height=420))
        parts.append(f"<p><a href='{spec.file}#{_anchor(s.model)}'>More on this page →</a></p>")
    parts.append("<h2>Files</h2><p><code>metrics.json</code> holds every number shown here (strict JSON). Each "
                 "figure has a toolbar (top right) to zoom or save it as a PNG.</p>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _first_sentence(text: str) -> str:
    plain = re.sub(r"<[^>]+>", "", text)
    end = plain.find(". ")
    return html.escape(plain if end < 0 else plain[: end + 1])


def render_pages(specs: Sequence[PageSpec], sections: Sequence[Any], title: str) -> dict[str, str]:
    """{relative path: text} for the overview, one page per study, and the assets."""
    by_study = {spec.analysis: [s for s in sections if s.analysis == spec.analysis] for spec in specs}
    models: dict[str, str] = {}
    for s in sections:
        if s.analysis == "model-card" and s.headlines:
            models[s.model] = s.headlines[0]
    pages = {"index.html": overview_page(specs, by_study, models, title),
             "assets/plotly.min.js": get_plotlyjs(), "assets/report.css": CSS, "assets/widgets.js": WIDGETS_JS}
    for spec in specs:
        pages[spec.file] = study_page(spec, by_study[spec.analysis], specs, title)
    return pages


def metrics_json(sections: Sequence[Any]) -> dict[str, Any]:
    """metrics.json's content, by section slug."""
    return {s.slug: {"analysis": s.analysis, "model": s.model, "metrics": s.metrics, "headlines": s.headlines}
            for s in sections}


