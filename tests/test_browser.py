"""The report in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright), every
network request blocked, on a report freshly written by `workbench report`, and on a notebook that
shows each viewer, executed and exported to HTML by nbconvert.

Screenshots of every top-level page go to `screenshots/` beside the report, in the test's temp
folder; a failure names that folder. Slow (it writes the whole report first): run with `-m slow`
(`.ci/run` does)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FIRST_FIGURE_BUDGET_S = 2.0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from workbench.report.pipeline import report_all

    return report_all(tmp_path_factory.mktemp("browser") / "report", device="cpu", progress=False)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _open(browser, url: str):
    """A page with every non-file request aborted and console errors collected."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors, blocked = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    def route(r):
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url)
    return page, errors, blocked


def _rendered(page) -> None:
    """Wait until every plotly container has drawn its plot and every widget is ready."""
    page.wait_for_function("""() => [...document.querySelectorAll('.plotly-graph-div')]
        .every(d => d.querySelector('.main-svg')) &&
        [...document.querySelectorAll('.wb-attn, .wb-graph')].every(w => w.dataset.ready === '1')""", timeout=60_000)


def test_every_page_renders_offline_with_no_console_error(report, browser):
    shots = report.parent / "screenshots"
    shots.mkdir(exist_ok=True)
    pages = sorted(report.rglob("*.html"))
    assert len(pages) >= 7
    problems = []
    for path in pages:
        page, errors, blocked = _open(browser, path.as_uri())
        try:
            _rendered(page)
            n = page.locator(".plotly-graph-div").count()
            if path.parent == report:
                page.screenshot(path=str(shots / f"{path.stem}.png"), full_page=True)
                assert path.name == "index.html" or n > 0, f"{path.name} shows no figure"
                links = page.eval_on_selector_all("nav.side a", "as => as.map(a => a.getAttribute('href'))")
                missing = [h for h in links if not (report / h.split("#")[0]).exists()]
                assert not missing, f"{path.name}: sidebar links to missing pages {missing}"
            if errors or blocked:
                problems.append(f"{path.relative_to(report)}: console errors {errors[:3]}, network {blocked[:3]}")
        except Exception as err:  # keep going: one report of every page that failed
            problems.append(f"{path.relative_to(report)}: {err}")
        finally:
            page.close()
    assert not problems, f"screenshots in {shots}:\n" + "\n".join(problems)


def test_hovering_a_token_changes_what_the_attention_viewer_shows(report, browser):
    viewer_pages = [p for p in sorted(report.glob("*.html")) if "wb-attn" in p.read_text()]
    assert viewer_pages, "no page has an attention viewer"
    page, errors, _ = _open(browser, viewer_pages[0].as_uri())
    _rendered(page)
    viewer = page.locator(".wb-attn").first
    before = viewer.locator(".wb-readout").inner_text()
    viewer.locator(".wb-tok[data-pos='3']").hover()
    after = viewer.locator(".wb-readout").inner_text()
    assert before != after and "(3)" in after
    viewer.locator("select[aria-label='head']").select_option("1")
    assert viewer.locator(".wb-readout").inner_text() != after
    page.screenshot(path=str(report.parent / "screenshots" / "attention-viewer.png"))
    assert not errors
    page.close()


def test_the_overview_shows_its_first_figure_within_two_seconds(report, browser, capsys):
    times = []
    for _ in range(3):
        page = browser.new_page()
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
        start = time.perf_counter()
        page.goto((report / "index.html").as_uri(), wait_until="commit")
        page.wait_for_selector(".plotly-graph-div .main-svg", timeout=30_000)
        times.append(time.perf_counter() - start)
        page.close()
    best = min(times)
    with capsys.disabled():
        print(f"\noverview: first figure rendered in {best:.2f} s (best of 3: {', '.join(f'{t:.2f}' for t in times)})")
    assert best < FIRST_FIGURE_BUDGET_S


def test_the_report_fits_its_size_budget(report):
    sizes = {p: p.stat().st_size for p in report.rglob("*") if p.is_file()}
    total = sum(sizes.values())
    biggest = max((s, p) for p, s in sizes.items() if p.suffix == ".html")
    assert total <= 23e6, f"the report is {total / 1e6:.1f} MB"
    assert biggest[0] <= 5e6, f"{biggest[1].name} is {biggest[0] / 1e6:.1f} MB"


def test_the_attention_viewer_stays_responsive_on_a_256_token_prompt(browser, tmp_path, capsys):
    """256 tokens, 4 layers of 8 heads (more than any shipped model): each hover redraws the tokens,
    the readout, the head strip and the pattern canvas within a frame or two."""
    import numpy as np

    from workbench.report.widgets import WIDGETS_JS, attention_viewer

    S, rng = 256, np.random.default_rng(0)
    scores = rng.normal(size=(4, 8, S, S)) + np.triu(np.full((S, S), -np.inf), 1)
    patterns = np.exp(scores - scores.max(-1, keepdims=True))
    widget = attention_viewer([f"tok{i}" for i in range(S)], patterns / patterns.sum(-1, keepdims=True),
                              "a 256-token prompt", "caption")
    (tmp_path / "widgets.js").write_text(WIDGETS_JS)
    page_file = tmp_path / "viewer.html"
    page_file.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{widget.html}"
                         "<script src='widgets.js'></script></body></html>")
    page, errors, _ = _open(browser, page_file.as_uri())
    _rendered(page)
    ms = page.evaluate("""() => {
        const toks = [...document.querySelectorAll('.wb-tok')], times = [];
        for (let i = 0; i < toks.length; i += 8) {
            const t0 = performance.now();
            toks[i].dispatchEvent(new MouseEvent('mouseenter'));
            document.body.getBoundingClientRect();  // include the layout the redraw causes
            times.push(performance.now() - t0);
        }
        return times.sort((a, b) => a - b);
    }""")
    page.locator(".wb-tok[data-pos='200']").hover()
    readout = page.locator(".wb-readout").inner_text()
    page.close()
    median, worst = ms[len(ms) // 2], ms[-1]
    with capsys.disabled():
        print(f"\nattention viewer, 256 tokens, 4×8 heads: a hover redraws in {median:.1f} ms (median of {len(ms)}), "
              f"{worst:.1f} ms at worst; {len(widget.html) / 1e6:.1f} MB of HTML")
    assert "(200)" in readout and not errors
    assert median < 50 and worst < 200


def _synthetic_graph(rng, L: int = 3, S: int = 6, n_features: int = 25, n_edges: int = 150) -> dict:
    """Embeddings at every position, random features and error nodes, three logits, random forward edges."""
    nodes = [{"id": p, "kind": "embedding", "layer": -1, "pos": p, "label": f"tok{p}", "node_cut": 0.0}
             for p in range(S)]
    for i in range(n_features):
        nodes.append({"id": len(nodes), "kind": "feature", "layer": int(rng.integers(L)), "pos": int(rng.integers(S)),
                      "label": f"feature {i} </script><!--<script>", "href": f"features/{i}.html",
                      "examples": [[f"example {j} of <b>{i}</b>", float(rng.random())] for j in range(3)]})
    nodes += [{"id": len(nodes) + l, "kind": "error", "layer": l, "pos": S - 1, "label": f"error L{l}"}
              for l in range(L)]
    nodes += [{"id": len(nodes) + k, "kind": "logit", "layer": L, "pos": S - 1, "label": f"' out{k}' (p=0.{k})",
               "node_cut": 0.0} for k in range(3)]
    for n in nodes:
        n.setdefault("node_cut", float(rng.uniform(0.01, 1)))
        n.update(activation=float(rng.normal()), influence=float(rng.random()))
        n.setdefault("href", None)
        n.setdefault("examples", [])
    edges = []
    while len(edges) < n_edges:
        a, b = rng.integers(len(nodes), size=2)
        if nodes[a]["layer"] < nodes[b]["layer"] and nodes[a]["pos"] <= nodes[b]["pos"]:
            edges.append([int(a), int(b), float(rng.normal()), float(rng.random())])
    return {"tokens": ["The", " cat", " sat", " on", " the", " mat"][:S], "n_layers": L, "nodes": nodes,
            "edges": edges, "node_threshold": 0.8, "edge_threshold": 0.98}


def test_the_graph_viewer_filters_and_explains_nodes(browser, tmp_path):
    """A 37-node graph: it draws what the thresholds keep, a click on a feature fills the side panel, and a
    node threshold of 0 leaves only the embeddings and logits."""
    import numpy as np

    from workbench.report.widgets import WIDGETS_JS, graph_viewer

    graph = _synthetic_graph(np.random.default_rng(0))
    (tmp_path / "widgets.js").write_text(WIDGETS_JS)
    page_file = tmp_path / "graph.html"
    page_file.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>"
                         f"{graph_viewer(graph, 'a synthetic graph', 'caption').html}"
                         "<script src='widgets.js'></script></body></html>")
    page, errors, _ = _open(browser, page_file.as_uri())
    _rendered(page)
    viewer = page.locator(".wb-graph")
    assert viewer.get_attribute("data-ready") == "1"
    shown = {n["id"] for n in graph["nodes"] if n["kind"] in ("embedding", "logit") or n["node_cut"] <= 0.8}
    edges = [e for e in graph["edges"] if e[3] <= 0.98 and e[0] in shown and e[1] in shown]
    drawn = viewer.locator("svg [data-node-id]").evaluate_all("gs => gs.map(g => +g.dataset.nodeId)")
    assert sorted(drawn) == sorted(shown) and 9 < len(shown) < len(graph["nodes"]) and edges
    assert viewer.locator(".wb-g-count").inner_text() == f"{len(shown)} nodes, {len(edges)} edges shown"

    feature = viewer.locator("svg [data-kind='feature']").first
    node = graph["nodes"][int(feature.get_attribute("data-node-id"))]
    feature.click()
    side = viewer.locator(".wb-g-side")
    assert node["label"] in side.inner_text() and "wb-g-sel" in feature.get_attribute("class")
    assert viewer.locator("svg .wb-g-hot").count() == sum(node["id"] in e[:2] for e in edges)
    assert side.locator("a.wb-g-link").get_attribute("href") == node["href"]
    assert side.locator(".wb-g-examples li").count() == 3
    items = side.locator(".wb-g-item")
    if items.count():
        items.first.click()
        assert viewer.locator(".wb-g-label").inner_text() != node["label"]

    viewer.locator("input[aria-label='node threshold']").fill("0")
    kinds = viewer.locator("svg [data-node-id]").evaluate_all("gs => gs.map(g => g.dataset.kind)")
    assert sorted(kinds) == ["embedding"] * 6 + ["logit"] * 3
    assert viewer.locator(".wb-g-count").inner_text().startswith("9 nodes, ")
    page.screenshot(path=str(tmp_path / "graph-viewer.png"))
    assert not errors
    page.close()


VIEWERS_NOTEBOOK = [
    """import torch
import workbench
from workbench.cache.rows import special_ids, text_batch
from workbench.compute.attribution_graph import build_graph
from workbench.model.loading import models_dir
from workbench.report import show_attention, show_feature, show_graph, show_logit_lens
from workbench.sae import SAEConfig, make_sae
from workbench.sae.transcoders import load_transcoders

model = workbench.load("gelu-2l", device="cpu")
prompt = "The cat sat on the mat. The cat sat on the"
""",
    "show_attention(model, prompt)",
    "show_logit_lens(model, prompt)",
    """sae = make_sae(SAEConfig(d_in=model.cfg.d_model, d_sae=64, architecture="relu",
                         hook_name="blocks.0.hook_resid_post"), seed=0)
rows = text_batch(model, 32, 32)  # text with no progress bar (an ipywidget) on the way
show_feature(model, sae, 5, tokens=rows)""",
    """tc = load_transcoders(models_dir() / "gelu-2l" / "transcoders")
bos, _ = special_ids(model)
graph = build_graph(model, tc, torch.tensor([[bos] + model.tokenizer.encode("QEjaXVzCQEjaXVz")]), progress=False)
show_graph(graph, max_nodes=40)""",
    "show_attention(model, 'def f(x): return f(x)', layer=0)",
]


VIEWER_ROOTS = ".wb-attn, .wb-graph, .wb-feature, .wb-plotly"


@pytest.fixture(scope="module")
def exported_notebook(tmp_path_factory) -> tuple[str, set[str]]:
    """(the HTML nbconvert exports, the CDN addresses its own template asks for) of a notebook that shows each
    viewer. The cell whose output carries the widgets' script is moved to the end, as if run out of order, so
    that the script comes after the viewers it draws."""
    import nbformat
    from nbclient import NotebookClient

    nbconvert = pytest.importorskip("nbconvert")
    folder = tmp_path_factory.mktemp("notebook")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in VIEWERS_NOTEBOOK])
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0]["evalue"]
    assert "data-wb-script='widgets'" in nb.cells[1].outputs[0]["data"]["text/html"]
    nb.cells.append(nb.cells.pop(1))
    exporter = nbconvert.HTMLExporter()
    body, _ = exporter.from_notebook_node(nb)  # nbconvert writes the outputs' attributes in double quotes
    return body, {exporter.require_js_url, exporter.mathjax_url}


def _viewers_ready(page) -> None:
    page.wait_for_function(f"""() => {{
        const roots = [...document.querySelectorAll('{VIEWER_ROOTS}')];
        return roots.length === 5 && roots.every(r => r.dataset.ready === '1'); }}""", timeout=60_000)


def _unexpected(errors: list[str]) -> list[str]:
    """Console errors other than a blocked request's (which `_open` also records as blocked)."""
    return [e for e in errors if "Failed to load resource" not in e]


def test_a_notebooks_viewers_render_offline_once_exported_to_html(exported_notebook, browser, tmp_path):
    """The exported notebook with the network blocked: one copy of each script (the first viewer carries it,
    here from the end of the page), every viewer drawn, each answering a hover."""
    body, cdn = exported_notebook
    assert body.count('data-wb-script="widgets"') == 1 and body.count('data-wb-script="plotly"') == 1
    assert body.index('data-wb-script="widgets"') > body.index('class="wb-graph"')
    (tmp_path / "viewers.html").write_text(body)

    page, errors, blocked = _open(browser, (tmp_path / "viewers.html").as_uri())
    _viewers_ready(page)
    shown = page.locator(".wb-wait").evaluate_all("ws => ws.filter(w => getComputedStyle(w).display !== 'none')")
    assert not shown, "a viewer's 'script has not run' note is still showing"

    attention = page.locator(".wb-attn").first
    before = attention.locator(".wb-readout").inner_text()
    attention.locator(".wb-tok[data-pos='3']").hover()
    after = attention.locator(".wb-readout").inner_text()
    assert after != before and "(3)" in after

    page.locator(".wb-plotly .nsewdrag").first.hover()
    page.wait_for_selector(".wb-plotly .hoverlayer .hovertext", timeout=10_000)
    assert "predicts" in page.locator(".wb-plotly .hoverlayer .hovertext").first.text_content()

    feature = page.locator(".wb-feature")
    token = feature.locator(".ctx .tok[data-act]").nth(2)
    token.hover()
    assert feature.locator(".wb-f-readout").inner_text() == f"'{token.text_content()}': activation " + \
        token.get_attribute("data-act")

    node = page.locator(".wb-graph svg [data-kind='feature']").first
    stroke = "g => getComputedStyle(g.firstElementChild).strokeWidth"
    idle = node.evaluate(stroke)
    node.hover()
    assert node.evaluate(stroke) != idle  # the node under the pointer is outlined
    node.click()
    assert page.locator(".wb-graph .wb-g-label").inner_text()
    page.screenshot(path=str(tmp_path / "notebook-viewers.png"), full_page=True)
    page.close()
    # nbconvert's page asks a CDN for require.js and MathJax; nothing the viewers put in it fetches anything
    assert {url.split("?")[0] for url in blocked} <= {url.split("?")[0] for url in cdn}, blocked
    assert not _unexpected(errors), errors


def test_a_page_that_runs_each_script_twice_builds_each_viewer_once(exported_notebook, browser, tmp_path):
    """A re-run cell or a duplicated output puts a script into the page again: harmless."""
    body, _ = exported_notebook
    scripts = re.findall(r'<script data-wb-script="\w+">.*?</script>', body, flags=re.S)
    assert len(scripts) == 2
    (tmp_path / "twice.html").write_text(body.replace("</main>", "".join(scripts) + "</main>"))
    page, errors, _ = _open(browser, (tmp_path / "twice.html").as_uri())
    _viewers_ready(page)
    assert page.locator(".wb-attn .wb-controls").count() == 2 and page.locator(".wb-g-controls").count() == 1
    assert page.locator(".wb-f-readout").count() == 1 and page.locator(".wb-plotly .main-svg").count() >= 1
    assert page.locator("style#wb-widgets-css").count() == 1
    assert not _unexpected(errors), errors
    page.close()


def test_a_viewer_whose_script_never_ran_says_so(exported_notebook, browser, tmp_path):
    """As in a notebook Jupyter does not trust: no script runs, and each viewer shows its note instead."""
    body, _ = exported_notebook
    for script in re.findall(r'<script data-wb-script="\w+">.*?</script>', body, flags=re.S):
        body = body.replace(script, "")
    (tmp_path / "none.html").write_text(body)
    page, _, _ = _open(browser, (tmp_path / "none.html").as_uri())
    page.wait_for_load_state()
    notes = page.locator(".wb-wait")
    assert notes.count() == 5 and all(notes.nth(i).is_visible() for i in range(5))
    assert page.locator(f"{VIEWER_ROOTS}").evaluate_all("rs => rs.filter(r => r.dataset.wbMounted)") == []
    page.close()
