"""Run the notebooks and store their outputs, each plotly figure as a static PNG, so that someone browsing
the repository sees every figure (GitHub does not run plotly's JavaScript) while the files stay small.

    python notebooks/render_outputs.py                 # every notebook
    python notebooks/render_outputs.py superposition   # some of them

Figures are drawn by Debian's `chromium` through Playwright (the same pair as the report's browser
test; set $CHROMIUM to use another executable). A figure keeps only its PNG (its interactive JSON
is dropped: re-run the notebook for that); progress-bar widgets keep their text. `pytest` checks
that every stored notebook has its figures and stays small (tests/test_notebooks.py).
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from plotly.offline import get_plotlyjs

HERE = Path(__file__).resolve().parent
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"
WIDTH = 860
MAX_TEXT = 4000
"""Characters of text output kept per output (the rest is cut with a note)."""


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        sys.exit("render_outputs needs a Chromium executable: apt-get install chromium, or set $CHROMIUM.")
    return path


class FigureRenderer:
    """Draws plotly figure JSON to PNG bytes in one headless Chromium page, offline."""

    def __init__(self, folder: Path):
        from playwright.sync_api import sync_playwright

        (folder / "plotly.min.js").write_text(get_plotlyjs())
        page = folder / "figure.html"
        page.write_text("<!doctype html><html><head><meta charset='utf-8'><script src='plotly.min.js'></script>"
                        "</head><body style='margin:0;background:white'><div id='fig'></div></body></html>")
        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(executable_path=_chromium(), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        self._page = self._browser.new_page(viewport={"width": WIDTH, "height": 600}, device_scale_factor=1)
        self._page.goto(page.as_uri())

    def png(self, figure: dict) -> bytes:
        layout = {"height": 450, **figure.get("layout", {}), "width": WIDTH}  # no height: plotly's default
        self._page.evaluate("([data, layout]) => Plotly.newPlot('fig', data, layout, {staticPlot: true})",
                            [figure.get("data", []), layout])
        return self._page.locator("#fig").screenshot(type="png")

    def close(self) -> None:
        self._browser.close()
        self._pw.stop()


def _text(value) -> str:
    text = "".join(value) if isinstance(value, list) else str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"\n… ({len(text) - MAX_TEXT:,} more characters cut)"


def slim(nb: nbformat.NotebookNode, renderer: FigureRenderer) -> int:
    """Replace figures by PNGs and widgets by their text, in place; returns the number of figures."""
    n = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            data = out.get("data")
            if out.get("output_type") == "stream":
                out["text"] = _text(out["text"])
            if not data:
                continue
            if PLOTLY in data:
                png = renderer.png(data[PLOTLY])
                out["data"] = {"image/png": base64.b64encode(png).decode(), "text/plain": "<plotly figure>"}
                out["metadata"] = {}
                n += 1
            elif WIDGET in data:
                out["data"] = {"text/plain": _text(data.get("text/plain", ""))}
            elif "text/html" in data and "text/plain" in data and len(str(data["text/html"])) > MAX_TEXT:
                out["data"] = {"text/plain": _text(data["text/plain"])}
            elif "text/plain" in data:
                data["text/plain"] = _text(data["text/plain"])
    nb.metadata.pop("widgets", None)
    return n


def render(path: Path, renderer: FigureRenderer) -> None:
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as work:  # a notebook may write files: never into the repository
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": work}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    if errors:
        sys.exit(f"{path.name} raised {errors[0].get('ename')}: {errors[0].get('evalue')}; nothing was written.")
    figures = slim(nb, renderer)
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)
    print(f"Wrote {path} ({figures} figures as PNG, {path.stat().st_size / 1e3:,.0f} kB)")


def main(names: list[str]) -> None:
    paths = [HERE / f"{n.removesuffix('.ipynb')}.ipynb" for n in names] or sorted(HERE.glob("*.ipynb"))
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        sys.exit(f"No notebook {missing} in {HERE}; notebooks: {', '.join(p.stem for p in HERE.glob('*.ipynb'))}")
    with tempfile.TemporaryDirectory() as folder:
        renderer = FigureRenderer(Path(folder))
        try:
            for path in paths:
                render(path, renderer)
        finally:
            renderer.close()


if __name__ == "__main__":
    main(sys.argv[1:])
