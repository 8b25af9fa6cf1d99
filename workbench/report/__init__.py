"""The report layer: the study registry and pipeline (Result → figures → pages), plotting, the
interactive viewers, the front-end code in `assets/`, and the viewers in one line for notebooks
(`show_attention`, `show_logit_lens`, `show_feature`, `show_graph`, `show_patching`, `show_circuit`,
`show_faithfulness`, `show_probes`, `show_steering`)."""

from workbench.report.pipeline import Analysis, Result, get_analysis, registry, report_all, run_analysis, write_report
from workbench.report.scripts import viewer_scripts
from workbench.report.show import (
    show_attention,
    show_circuit,
    show_faithfulness,
    show_feature,
    show_graph,
    show_logit_lens,
    show_patching,
    show_probes,
    show_steering,
)
from workbench.report.widgets import Widget, attention_viewer, figure_widget, graph_viewer

__all__ = ["Analysis", "Result", "Widget", "attention_viewer", "figure_widget", "get_analysis", "graph_viewer",
           "registry", "report_all", "run_analysis", "show_attention", "show_circuit", "show_faithfulness",
           "show_feature", "show_graph", "show_logit_lens", "show_patching", "show_probes", "show_steering",
           "viewer_scripts", "write_report"]
