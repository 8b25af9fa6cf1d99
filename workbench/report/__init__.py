"""The report layer: the study registry and pipeline (Result → figures → pages), plotting, the
interactive viewers, and the front-end code in `assets/`."""

from workbench.report.pipeline import Analysis, Result, get_analysis, registry, report_all, run_analysis, write_report
from workbench.report.widgets import Widget, attention_viewer, graph_viewer

__all__ = ["Analysis", "Result", "Widget", "attention_viewer", "get_analysis", "graph_viewer", "registry",
           "report_all", "run_analysis", "write_report"]
