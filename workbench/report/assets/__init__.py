"""The report's front-end code as real files: widgets.js and widgets.css (the attention and graph
viewers), report.css (the report's pages) and dashboard.css (the SAE feature dashboards), shipped as
package data and read with `importlib.resources`."""

from __future__ import annotations

from importlib import resources


def read_asset(name: str) -> str:
    """The text of one asset file, e.g. read_asset("widgets.js")."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
