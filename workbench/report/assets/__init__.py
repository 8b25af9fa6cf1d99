"""The report's front-end code as real files: widgets.js and widgets.css (the attention and graph
viewers, the SAE feature card and plotly figures in notebooks), report.css (the report's pages),
dashboard.css and dashboard.js (the SAE feature dashboards) and plotly_loader.js (plotly.js in a
notebook, once per page), shipped as package data and read with `importlib.resources`."""

from __future__ import annotations

from importlib import resources


def read_asset(name: str) -> str:
    """The text of one asset file, e.g. read_asset("widgets.js")."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
