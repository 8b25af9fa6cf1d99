"""The report pipeline: model -> compute(model, config) -> frozen Result -> figures(result) -> report.

Analyses are found through the `workbench.analyses` entry-point group (pyproject.toml lists the
studies in `analyses/`; another installed package can add its own), plus any registered at run
time with `register(Analysis(...))`. The engine never imports the `analyses` package itself, so
data flows one way: analyses depend on the engine, not the reverse. `run_analysis` runs one;
`write_report` writes a folder that opens offline in a browser (see `workbench.report.pages`):

    index.html       the overview: the models, every study's headline, the reading order
    <study>.html     one page per analysis, with a sidebar; every figure has a caption
    assets/          plotly.min.js and the widgets' script, loaded from here by every page
    metrics.json     the numbers, by section (strict JSON)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench.artifacts import check_output_folder, strict_json, write_output_folder
from workbench.errors import InputError, unknown_name_message
from workbench.model.hooked import HookedModel
from workbench.report.pages import PageSpec, metrics_json, render_pages
from workbench.report.widgets import Widget


class Result(Protocol):
    """What every analysis's frozen result offers the report layer."""

    def metrics(self) -> dict[str, Any]:
        """Key numbers, JSON-serialisable."""

    def headlines(self) -> list[str]:
        """A few one-line findings for people."""


@dataclass(frozen=True)
class Analysis:
    """A registered analysis."""

    name: str
    """Command-line name, e.g. 'model-card'."""
    description: str
    """One line for `workbench run --help`."""
    config_cls: type
    """Frozen dataclass of its settings; every field has a default."""
    compute: Optional[Callable[[HookedModel, Any], Result]]
    """(model, config) -> Result: a study of a model. None for a study that trains its own toy models,
    which sets `compute_toys` instead."""
    figures: Callable[[Any], dict[str, Union[go.Figure, Widget]]]
    """Result -> named figures (pure), each with a caption (`workbench.report.plotting.captioned`), or widgets."""
    default_models: tuple[str, ...] = ()
    """Shipped models `workbench report` runs it on."""
    compute_toys: Optional[Callable[[torch.device, Any], Result]] = None
    """(device, config) -> Result, for a study that trains its own toy models instead of reading one
    (`workbench report` runs it once)."""
    title: str = ""
    """The title of its report page, e.g. 'Induction heads' (default: the name)."""
    order: int = 100
    """Its place in the report's reading order (lower first)."""
    intro: str = ""
    """The idea, in a few sentences of HTML, with the papers it follows: the start of its page."""
    key_figure: str = ""
    """The figure the overview page shows at a glance, if this study is the first to name one."""

    def __post_init__(self) -> None:
        if (self.compute is None) == (self.compute_toys is None):
            raise InputError(f"The analysis {self.name!r} must set exactly one of `compute` (a study of a model) "
                             "and `compute_toys` (a study that trains its own toy models).")

    @property
    def uses_model(self) -> bool:
        """Whether it studies a model it is given (else it trains its own toys)."""
        return self.compute is not None

    @property
    def page(self) -> PageSpec:
        return PageSpec(self.name, self.title or self.name, self.order, self.intro, self.key_figure)


ENTRY_POINT_GROUP = "workbench.analyses"
_REGISTRY: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    """Add an analysis at run time (e.g. one defined in a notebook); installed ones come from entry points."""
    _REGISTRY[analysis.name] = analysis
    return analysis


def registry() -> dict[str, Analysis]:
    """Every analysis: those installed under the `workbench.analyses` entry points, then run-time ones."""
    from importlib.metadata import entry_points

    found: dict[str, Analysis] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        analysis = ep.load()
        if not isinstance(analysis, Analysis):
            raise InputError(f"The entry point {ep.name} = {ep.value!r} ({ENTRY_POINT_GROUP}) is not a "
                             "workbench.report.pipeline.Analysis.")
        found[analysis.name] = analysis
    if not found:
        raise InputError(f"No analyses are installed (entry-point group {ENTRY_POINT_GROUP!r} is empty); "
                         "install the workbench with `pip install -e .` from its checkout.")
    return {**found, **_REGISTRY}


def get_analysis(name: str) -> Analysis:
    """The analysis called `name`, or an error listing the known ones."""
    known = registry()
    if name not in known:
        raise InputError(unknown_name_message("analysis", name, known, listed_by="`workbench list`"))
    return known[name]


def make_config(analysis: Analysis, overrides: Optional[dict[str, Any]] = None) -> Any:
    """The analysis's config with `overrides` applied (unknown keys are an error)."""
    base = analysis.config_cls()
    valid = {f.name for f in fields(base)}
    unknown = sorted(set(overrides or {}) - valid)
    if unknown:
        raise InputError(f"{analysis.name} has no setting(s) {unknown}; settings: {sorted(valid)}.")
    return replace(base, **(overrides or {}))


@dataclass(frozen=True)
class Section:
    """One analysis run on one model, ready to write."""

    analysis: str
    model: str
    figures: dict[str, Union[go.Figure, Widget]]
    metrics: dict[str, Any]
    headlines: list[str]
    seconds: float
    files: dict[str, Union[str, bytes]] = field(default_factory=dict)
    """Extra files for the study's folder (text, or bytes such as safetensors)."""
    """Extra pages (relative path -> text) written under <report>/<slug>/, e.g. feature dashboards;
    an `index.html` among them is linked from the report."""

    @property
    def slug(self) -> str:
        """File-name-safe id."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.analysis}--{self.model}")


def run_analysis(name: str, model: Optional[HookedModel] = None, config: Any = None, device: str = "auto",
                 model_label: Optional[str] = None) -> Section:
    """Run analysis `name` on a loaded `model` (`workbench.load(...)`), or, for a study that trains its own
    toy models, on `device` with no model."""
    from workbench.adapter.provenance import model_label as label_of
    from workbench.model.loading import resolve_device

    analysis = get_analysis(name)
    if isinstance(model, (str, Path)):
        raise InputError(f"run_analysis takes a loaded model, not {str(model)!r}: pass "
                         f"workbench.load({str(model)!r}, device=...) (the command line, `workbench run`, loads it).")
    cfg = config if config is not None else analysis.config_cls()
    start = time.perf_counter()
    if analysis.compute_toys is not None:
        result = analysis.compute_toys(resolve_device(device), cfg)
        label = model_label or "toy models"
    elif model is None:
        raise InputError(f"The {name} analysis studies a model: pass one, e.g. workbench.load"
                         f"({(analysis.default_models or ('attn-only-2l',))[0]!r}).")
    else:
        result = analysis.compute(model, cfg)
        label = model_label or label_of(model)
    files = result.files() if hasattr(result, "files") else {}
    return Section(name, label, analysis.figures(result), result.metrics(), result.headlines(),
                   time.perf_counter() - start, files)


def default_report_dir() -> Path:
    """./reports/<timestamp> in the current folder."""
    return Path.cwd() / "reports" / time.strftime("%Y%m%d-%H%M%S")


def _specs(sections: list[Section]) -> list[PageSpec]:
    """The pages of these sections, in reading order (an unregistered analysis goes last)."""
    try:
        known = registry()
    except InputError:  # nothing installed: pages from the sections alone
        known = {}
    names = list(dict.fromkeys(s.analysis for s in sections))
    specs = [known[n].page if n in known else PageSpec(n, n, 1000, "") for n in names]
    return sorted(specs, key=lambda p: (p.order, names.index(p.analysis)))


def write_report(out: Union[str, Path], sections: list[Section], title: str = "workbench report") -> Path:
    """Write the overview, one page per study, assets/ and metrics.json (strict JSON: NaN and inf become
    null) into `out`.

    The report is built in a fresh temporary folder beside `out` and moved into place. An existing
    `out` is replaced only if the workbench wrote it and nothing was added to it; `.`, `..`, the
    home folder, the checkout and the models folder are refused (`artifacts.check_output_folder`)."""
    check_output_folder(Path(out), "report")  # fail before any work
    pages = render_pages(_specs(sections), sections, title)
    metrics = json.dumps(strict_json(metrics_json(sections)), indent=2, allow_nan=False) + "\n"

    def build(tmp: Path) -> None:
        for rel, text in pages.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        (tmp / "metrics.json").write_text(metrics)
        for s in sections:
            for rel, data in s.files.items():
                if Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise InputError(f"The {s.analysis} study gave a file path {rel!r} outside its folder of the "
                                     "report; a study's files() must name paths inside it.")
                path = tmp / s.slug / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(data, bytes):
                    path.write_bytes(data)
                else:
                    path.write_text(data)

    return write_output_folder(Path(out), "report", build)


def report_all(out: Optional[Union[str, Path]] = None, device: str = "auto", progress: bool = True,
               settings: Optional[dict[str, dict[str, Any]]] = None) -> Path:
    """Run every registered analysis on its default shipped models and write one report. `settings` maps
    an analysis name to overrides of its config, e.g. {"model-card": {"prompt": "..."}}."""
    from workbench.model.loading import load, shipped_models

    available = set(shipped_models())
    jobs = [(a, m) for a in registry().values() for m in a.default_models if m in available]
    if not jobs:
        raise InputError("No shipped models found to report on; train them with `workbench train <preset>`.")
    jobs += [(a, None) for a in registry().values() if not a.uses_model]
    jobs.sort(key=lambda job: job[0].order)  # run in reading order
    out = Path(out) if out is not None else default_report_dir()
    check_output_folder(out, "report")  # refuse a bad --out before minutes of work, not after
    sections, models = [], {}
    bar = tqdm(jobs, desc="report", disable=not progress, unit="analysis", dynamic_ncols=True)
    for analysis, model_name in bar:
        bar.set_description(f"report: {analysis.name} on {model_name or 'toy models'}")
        if model_name is not None and model_name not in models:
            models[model_name] = load(model_name, device=device)
        cfg = make_config(analysis, (settings or {}).get(analysis.name))
        sections.append(run_analysis(analysis.name, models.get(model_name), cfg, device=device,
                                     model_label=model_name))
    bar.close()
    path = write_report(out, sections, title="workbench report: shipped models")
    print(f"Wrote report to {path}/index.html ({len(sections)} sections, metrics.json, figures/)")
    for s in sections:
        for line in s.headlines[:3]:
            print(f"  [{s.analysis} · {s.model}] {line}")
        if len(s.headlines) > 3:
            print(f"  [{s.analysis} · {s.model}] ... and {len(s.headlines) - 3} more in the report")
    print(f"Open {path / 'index.html'}")
    return path
