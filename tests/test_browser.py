"""The report in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright), every
network request blocked, on a report freshly written by `workbench report`.

Screenshots of every top-level page go to `screenshots/` beside the report, in the test's temp
folder; a failure names that folder. Slow (it writes the whole report first): run with `-m slow`
(`.ci/run` does)."""

from __future__ import annotations

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
    from workbench.report import report_all

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
        [...document.querySelectorAll('.wb-attn')].every(w => w.dataset.ready === '1')""", timeout=60_000)


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

    from workbench.widgets import WIDGETS_JS, attention_viewer

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
