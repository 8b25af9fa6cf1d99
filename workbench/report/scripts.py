"""The scripts the viewers need, and how a notebook gets each of them once.

    WIDGETS_JS        workbench/report/assets/widgets.js with widgets.css inside: every viewer
    plotly_js()       plotly.min.js from the installed `plotly` package, in plotly_loader.js's guard
    notebook_html(body, caption, needs)   a viewer as a notebook output: its HTML, a note shown until
                      its script has run, its caption, and the scripts this page does not have yet

A report page loads each script from its `assets/` folder. In a notebook every output lands in one
page (JupyterLab, Notebook 7, VS Code, and the HTML that nbconvert exports), so a script is put into
the output of the first viewer that needs it and left out of the later ones (`PAGE`, this kernel's
record). The scripts make that order-free and repeat-safe: widgets.js builds every viewer root it
finds, whenever it appears (an observer watches the page), so an exported notebook works even when
the output that carries the script sits below the viewers it serves; and each script does nothing
the second time a page runs it.

The output that carries a script can be replaced: running its cell again replaces the output. The
running cell's id, which JupyterLab and Notebook 7 send with each request, tells when that happens,
and the next viewer carries the script again, so a saved or exported notebook keeps it. Without cell
ids (nbclient, some other front ends) a script goes out once per kernel. On Colab, where each output
is a page of its own, every output carries its scripts. `viewer_scripts()` puts them into a cell
by hand (after clearing the output that carried them, say).
"""

from __future__ import annotations

import hashlib
import html
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Optional

from workbench.report.assets import read_asset

_CSS, _JS = read_asset("widgets.css"), read_asset("widgets.js")
WIDGETS_JS = (f"var WB_WIDGETS_CSS = {json.dumps(_CSS)};\n"
              f"var WB_WIDGETS_VERSION = {json.dumps(hashlib.sha1((_CSS + _JS).encode()).hexdigest()[:12])};\n" + _JS)
"""The viewers' script (workbench/report/assets/widgets.js) with their styles (widgets.css) and a version
inside it, so that one <script> makes any page, a report's or a notebook's, show them."""

PLOTLY_MARKER = "/* @plotly.min.js@ */"


@cache
def plotly_js() -> str:
    """plotly.min.js from the installed `plotly` package inside plotly_loader.js (4-5 MB): it defines
    `window.Plotly` unless the page already has it."""
    from plotly.offline import get_plotlyjs

    loader = read_asset("plotly_loader.js")
    if PLOTLY_MARKER not in loader:
        raise RuntimeError(f"plotly_loader.js lacks its marker {PLOTLY_MARKER}")
    return loader.replace(PLOTLY_MARKER, get_plotlyjs())


SCRIPTS = {"widgets": lambda: WIDGETS_JS, "plotly": plotly_js}
"""Every script a viewer may need, by the name `Widget.needs` lists."""


def _script_tag(name: str) -> str:
    if name not in SCRIPTS:
        raise ValueError(f"Unknown script {name!r}; the viewers' scripts are {sorted(SCRIPTS)}")
    # a script's text may hold '</script>' inside a string (plotly.js does): written '<\/script>' it means the same
    text = SCRIPTS[name]().replace("</script", "<\\/script")
    return f"<script data-wb-script='{name}'>{text}</script>"


class PageScripts:
    """This kernel's record of which scripts the notebook page has, and which cell's output carries each."""

    def __init__(self) -> None:
        self._carrier: dict[str, Optional[str]] = {}
        """script name -> the id of the cell whose output carries it (None when the front end sends no ids)."""
        self._shell: Any = None

    def cell_started(self, cell: Optional[str]) -> None:
        """Cell `cell` runs: its old output, and any script in it, is about to be replaced."""
        if cell is not None:
            self._carrier = {name: c for name, c in self._carrier.items() if c != cell}

    def tags(self, needs: Sequence[str], cell: Optional[str], every_output: bool = False) -> str:
        """<script> tags for the scripts in `needs` the page lacks, now carried by cell `cell`'s output;
        all of them when `every_output` (each output a page of its own, as on Colab)."""
        out = []
        for name in needs:
            if every_output or name not in self._carrier:
                out.append(_script_tag(name))
                self._carrier[name] = cell
        return "".join(out)

    def forget(self) -> None:
        """Forget every script sent: the next viewer carries them again."""
        self._carrier.clear()

    def listen(self, shell: Any) -> None:
        """Learn from IPython's pre_run_cell event when a cell runs again (once per shell)."""
        if shell is not self._shell:
            shell.events.register("pre_run_cell", self._pre_run_cell)
            self._shell = shell

    def _pre_run_cell(self, info: Any) -> None:
        self.cell_started(getattr(info, "cell_id", None))  # IPython < 8.? gives no cell id


PAGE = PageScripts()
"""The record of this kernel's notebook page."""


def _shell() -> Any:
    """The running IPython shell, or None outside IPython (never importing IPython for that)."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def _running_cell(shell: Any) -> Optional[str]:
    """The id of the notebook cell being run, which Jupyter front ends send in the request's metadata;
    None without a kernel (a terminal IPython) or when the front end sends none."""
    kernel = getattr(shell, "kernel", None)  # a terminal IPython has no kernel
    if kernel is None:
        return None
    get_parent = getattr(kernel, "get_parent", None)  # ipykernel 6 and later
    return (get_parent().get("metadata") or {}).get("cellId") if get_parent is not None else None


def page_scripts(needs: Sequence[str], force: bool = False) -> str:
    """The <script> tags a notebook output showing a viewer needs, given what this kernel has sent."""
    shell = _shell()
    if shell is not None:
        PAGE.listen(shell)
    return PAGE.tags(needs, _running_cell(shell), every_output=force or "google.colab" in sys.modules)


WAIT = ("This viewer is drawn by a script that has not run in this page. In Jupyter: trust the notebook, or run "
        "this cell again; if the output that carried the script was cleared, display "
        "<code>workbench.report.viewer_scripts()</code> in any cell.")
"""The note a notebook shows in place of a viewer until its script has drawn it (widgets.css hides it)."""


def notebook_html(body: str, caption: str, needs: Sequence[str]) -> str:
    """A viewer's HTML as a notebook output: the viewer, the note shown until it is drawn, the caption and
    the scripts the page lacks (after the viewer, so a page that runs them while it loads has the viewer)."""
    note = f"<div class='wb-wait'>{WAIT}</div>"
    cap = f"<p class='wb-caption'>{html.escape(caption)}</p>" if caption else ""
    return f"<div class='wb-nb'>{body}{note}{cap}</div>{page_scripts(needs)}"


@dataclass(frozen=True)
class ViewerScripts:
    """Every viewer script, as a notebook output (see `viewer_scripts`)."""

    needs: tuple[str, ...] = tuple(SCRIPTS)

    def _repr_html_(self) -> str:
        return page_scripts(self.needs, force=True) + "<small>(the workbench viewers' scripts)</small>"


def viewer_scripts() -> ViewerScripts:
    """The viewers' scripts as a cell's output, for a page that lost them (the output that carried them
    was cleared); running the script again is harmless."""
    return ViewerScripts()
