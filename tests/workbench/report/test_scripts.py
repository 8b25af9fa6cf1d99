"""Viewers in a notebook: each script goes into the page once (again when the output that carried it is
replaced), nothing is fetched from a network, and a script cannot be cut short by its own text. The
notebook itself, exported and opened in Chromium, is in tests/test_browser.py."""

from __future__ import annotations

import re

import numpy as np
import pytest

from workbench.report.scripts import PAGE, WIDGETS_JS, PageScripts, notebook_html, plotly_js, viewer_scripts
from workbench.report.widgets import Widget, attention_viewer, figure_widget, graph_viewer

WIDGETS_TAG = "<script data-wb-script='widgets'>"
PLOTLY_TAG = "<script data-wb-script='plotly'>"


@pytest.fixture(autouse=True)
def _fresh_page():
    """Every test starts as a new kernel would, and leaves no record behind."""
    PAGE.forget()
    yield
    PAGE.forget()


def _attention(title: str = "a prompt") -> Widget:
    patterns = np.tril(np.ones((1, 2, 3, 3)))
    return attention_viewer(["a", "b", "c"], patterns / patterns.sum(-1, keepdims=True), title, "caption")


def _figure() -> Widget:
    import plotly.graph_objects as go

    return figure_widget(go.Figure(go.Heatmap(z=[[0.0, 1.0]])), "a heatmap")


def test_the_first_viewer_in_a_kernel_carries_the_script_and_later_ones_do_not():
    first, second = _attention()._repr_html_(), _attention("another")._repr_html_()
    assert first.count(WIDGETS_TAG) == 1 and WIDGETS_JS.replace("</script", "<\\/script") in first
    assert WIDGETS_TAG not in second and "class='wb-attn'" in second
    assert PLOTLY_TAG not in first + second  # the attention viewer does not need plotly.js
    lens = _figure()._repr_html_()
    assert lens.count(PLOTLY_TAG) == 1 and WIDGETS_TAG not in lens
    assert PLOTLY_TAG not in _figure()._repr_html_()


def test_a_viewer_shows_its_caption_and_a_note_until_its_script_has_drawn_it():
    out = _attention()._repr_html_()
    order = [out.index(part) for part in ("class='wb-attn'", "class='wb-wait'", "wb-caption", WIDGETS_TAG)]
    assert order == sorted(order)
    assert "<p class='wb-caption'>caption</p>" in out
    assert ".wb-nb>[data-wb-mounted]~.wb-wait{display:none}" in WIDGETS_JS  # drawn: the note goes


def test_running_the_carrying_cell_again_sends_the_script_again():
    page = PageScripts()
    assert page.tags(["widgets"], "cell-a").count(WIDGETS_TAG) == 1
    assert page.tags(["widgets"], "cell-b") == ""
    page.cell_started("cell-b")  # not the carrier: its output never had the script
    assert page.tags(["widgets"], "cell-b") == ""
    page.cell_started("cell-a")  # the carrier's output is being replaced, script and all
    assert page.tags(["widgets"], "cell-b").count(WIDGETS_TAG) == 1
    page.cell_started("cell-a")
    assert page.tags(["widgets"], "cell-a") == ""  # cell-b carries it now
    page.cell_started(None)  # a front end that sends no cell ids: once per kernel
    assert page.tags(["widgets"], None) == ""


def test_every_output_carries_its_scripts_where_each_output_is_its_own_page():
    page = PageScripts()
    assert all(page.tags(["widgets"], None, every_output=True).count(WIDGETS_TAG) == 1 for _ in range(2))
    assert viewer_scripts()._repr_html_().count(WIDGETS_TAG) == 1
    assert viewer_scripts()._repr_html_().count(PLOTLY_TAG) == 1


def test_ipythons_pre_run_cell_event_tells_the_page_a_cell_runs_again():
    from IPython.core.events import EventManager, available_events
    from IPython.core.interactiveshell import ExecutionInfo

    class Shell:
        def __init__(self):
            self.events = EventManager(self, available_events)

    shell, page = Shell(), PageScripts()
    page.listen(shell)
    page.listen(shell)  # once per shell
    assert page.tags(["widgets"], "cell-a")
    assert not page.tags(["widgets"], "cell-b")
    shell.events.trigger("pre_run_cell", ExecutionInfo("x = 1", False, False, True, cell_id="cell-a"))
    assert page.tags(["widgets"], "cell-b").count(WIDGETS_TAG) == 1


def _without_plotly(text: str) -> str:
    start = text.find(PLOTLY_TAG)
    return text if start < 0 else text[:start] + text[text.index("</script>", start):]


def test_nothing_in_a_viewer_comes_from_a_network():
    graph = {"tokens": ["a"], "n_layers": 1, "edges": [], "nodes": [
        {"id": 0, "kind": "embedding", "layer": -1, "pos": 0, "label": "a", "activation": 0, "influence": 0,
         "node_cut": 0}]}
    pages = [w._repr_html_() for w in (_attention(), graph_viewer(graph, "g", "c"), _figure())]
    html = "".join(_without_plotly(p) for p in pages)
    assert re.findall(r"https?://", html) == ["http://"]  # the SVG namespace, a name, never fetched
    assert "http://www.w3.org/2000/svg" in html
    assert not re.search(r"<(?:link|img|iframe)\b|\bsrc\s*=|@import|url\(", html)
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs() in plotly_js()  # plotly.js is the installed package's own copy


def test_a_script_or_payload_cannot_end_its_script_element_early():
    w = _attention("</script><script>alert(1)</script>")
    out = w._repr_html_()
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", out, flags=re.S)
    assert len(scripts) == 2  # the data and the widgets' script, each whole
    assert "alert(1)</script>" not in out
    both = viewer_scripts()._repr_html_()
    assert both.count("<script") == both.count("</script") == 2  # plotly.js and the widgets' script, each whole


def test_a_widget_names_the_scripts_it_needs():
    with pytest.raises(ValueError, match="unknown scripts"):
        Widget("<div></div>", "c", needs=("d3",))
    assert notebook_html("<div class='x'></div>", "", ["widgets"]).count(WIDGETS_TAG) == 1
    assert "wb-caption" not in notebook_html("<div></div>", "", [])
