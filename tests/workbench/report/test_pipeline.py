"""The report pipeline: registry, offline pages (an overview and one page per study), strict metrics."""

from __future__ import annotations

import json
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from tests.conftest import assert_colorbars_titled
from workbench.errors import InputError
from workbench.report.pipeline import Analysis, Section, get_analysis, make_config, registry, run_analysis, write_report
from workbench.report.plotting import caption_of, captioned
from workbench.report.widgets import Widget


def _section(name="demo", model="m"):
    fig = captioned(go.Figure(go.Scatter(x=[0, 1], y=[1, 0])), "A line.")
    return Section(name, model, {"a line": fig, "b/line": fig}, {"score": 0.5, "grid": [[1, 2]]}, ["found it"], 0.1)


def test_report_folder_works_offline(tmp_path):
    out = write_report(tmp_path / "r", [_section(), _section(model="n"), _section(name="other")])
    assert (out / "assets" / "plotly.min.js").read_text() == get_plotlyjs()  # plotly.js once, as a file
    pages = {p.name: p.read_text() for p in out.glob("*.html")}
    assert set(pages) == {"index.html", "demo.html", "other.html"}  # an overview and one page per study
    for page in pages.values():
        assert "src='assets/plotly.min.js'" in page and "https://" not in page and "http://" not in page
        assert "href='demo.html'" in page and "href='other.html'" in page  # the sidebar
        assert get_plotlyjs()[:300] not in page
    demo = pages["demo.html"]
    assert demo.count('class="plotly-graph-div"') == 4 and "found it" in demo and "A line." in demo  # captions
    assert "found it" in pages["index.html"]  # every study's headline on the overview
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["demo--m"]["metrics"]["score"] == 0.5


def test_rewriting_a_report_replaces_it_whole(tmp_path):
    write_report(tmp_path / "r", [_section(model="old")])
    out = write_report(tmp_path / "r", [_section(model="new")])
    assert list(json.loads((out / "metrics.json").read_text())) == ["demo--new"]
    assert not list(tmp_path.glob(".r.tmp*"))


def test_registry_and_unknown_analysis():
    assert "model-card" in registry()
    with pytest.raises(InputError, match="Did you mean: model-card"):
        get_analysis("model-crad")
    with pytest.raises(InputError, match="no setting"):
        make_config(get_analysis("model-card"), {"bogus": 1})


def test_model_card_on_a_tiny_model(attn_model):
    cfg = make_config(get_analysis("model-card"), {"repeat_len": 8, "prompt": "ab ab ab"})
    section = run_analysis("model-card", attn_model, cfg)
    assert {"config", "induction scores", "previous-token scores", "attention: your prompt", "attention: prompt 1",
            "attention: a random sequence of 8 tokens, repeated", "logit lens: your prompt"} <= set(section.figures)
    viewer = section.figures["attention: your prompt"]
    assert isinstance(viewer, Widget) and "ab ab ab" not in viewer.html  # tokens travel as JSON, one by one
    assert all(caption_of(f) if not isinstance(f, Widget) else f.caption for f in section.figures.values())
    m = section.metrics
    assert m["n_params"] == attn_model.n_params and 0 <= m["max_induction_score"] <= 1
    assert len(m["induction_LH"]) == 2 and len(m["induction_LH"][0]) == 4
    assert any("parameters" in h for h in section.headlines)
    assert_colorbars_titled(section.figures)


def test_metrics_json_is_strict_json(tmp_path):
    section = Section("demo", "m", {}, {"ok": 1.0, "undefined": float("nan"), "nested": [float("inf")]}, [], 0.1)
    out = write_report(tmp_path / "r", [section])
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert metrics["demo--m"]["metrics"] == {"ok": 1.0, "undefined": None, "nested": [None]}


def test_the_report_names_the_running_analysis_and_counts_the_headlines_it_leaves_out(tmp_path, monkeypatch,
                                                                                      capsys, attn_model):
    import workbench.report.pipeline as report

    def compute(model, cfg):
        return SimpleNamespace(metrics=lambda: {"n": 1}, headlines=lambda: [f"finding {i}" for i in range(7)])

    fake = Analysis("fake-study", "a test study", make_config(get_analysis("model-card")).__class__, compute,
                    lambda r: {}, default_models=("tiny",))
    monkeypatch.setattr(report, "registry", lambda: {"fake-study": fake})
    monkeypatch.setattr("workbench.model.loading.shipped_models", lambda: ["tiny"])
    monkeypatch.setattr("workbench.model.loading.load", lambda name, device="auto": attn_model)
    report.report_all(tmp_path / "r", device="cpu", progress=True)
    captured = capsys.readouterr()
    assert "report: fake-study on tiny" in captured.err  # the progress bar says what is running
    assert "... and 4 more in the report" in captured.out and f"Open {tmp_path / 'r' / 'index.html'}" in captured.out


def test_an_analysis_sets_exactly_one_kind_of_compute():
    def figures(result):
        return {}

    with pytest.raises(InputError, match="exactly one of `compute`"):
        Analysis("both", "", object, compute=lambda m, c: None, compute_toys=lambda d, c: None, figures=figures)
    with pytest.raises(InputError, match="exactly one of `compute`"):
        Analysis("neither", "", object, compute=None, figures=figures)
    toys = Analysis("toys", "", object, compute=None, compute_toys=lambda d, c: None, figures=figures)
    assert toys.uses_model is False


def test_run_analysis_takes_a_loaded_model_not_a_name(attn_model):
    with pytest.raises(InputError, match=r"workbench.load\('attn-only-2l'"):
        run_analysis("model-card", "attn-only-2l")
    with pytest.raises(InputError, match="studies a model: pass one"):
        run_analysis("model-card", None)
    cfg = make_config(get_analysis("model-card"), {"repeat_len": 8, "prompt": "ab ab ab"})
    # built in memory: no folder and no recorded name, so the label is its type
    assert run_analysis("model-card", attn_model, cfg).model == "Transformer"


@pytest.mark.parametrize("rel", ["../escaped.html", "/tmp/absolute.html"])
def test_a_study_file_outside_its_folder_is_refused(tmp_path, rel):
    section = Section("model-card", "m", {}, {}, [], 0.0, {rel: "x"})
    with pytest.raises(InputError, match="outside its folder"):
        write_report(tmp_path / "report", [section])
    assert not (tmp_path / "escaped.html").exists() and not (tmp_path / "report").exists()
