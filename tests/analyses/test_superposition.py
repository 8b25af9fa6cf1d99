"""The superposition study end to end, on settings small enough for a test."""

from __future__ import annotations

import json
import re

import pytest
import torch

from analyses.superposition import SuperpositionConfig, compute, figures
from tests.conftest import assert_colorbars_titled
from workbench.errors import ConfigError
from workbench.report.pipeline import run_analysis, write_report

QUICK = SuperpositionConfig(n_features=(5, 8), n_hidden=(2, 3), sparsities=(0.0, 0.9, 0.99), n_steps=600,
                            phase_grid=3, phase_seeds=2, phase_steps=300, abs_features=6, abs_neurons=3,
                            abs_steps=200, batch_size=256)


@pytest.fixture(scope="module")
def quick():
    return compute(torch.device("cpu"), QUICK)


def test_every_figure_is_drawn(quick):
    figs = figures(quick)
    for name in ("n=5, m=2: WᵀW, b and feature norms", "n=5, m=2: geometry", "n=5, m=2: dimensionality",
                 "n=8, m=3: WᵀW, b and feature norms", "n=8, m=3: dimensionality", "phase diagram",
                 "computation in superposition"):
        assert name in figs, name
    assert "n=8, m=3: geometry" not in figs  # geometry is drawn for m = 2 only
    assert len(figs["n=5, m=2: geometry"].data) == 3 * 5  # an arrow per feature per instance
    assert {t.name for t in figs["n=5, m=2: dimensionality"].data} >= {"feature dimensionality Dᵢ"}
    assert_colorbars_titled(figs)
    titles = [a.text for f in figs.values() for a in f.layout.annotations if a.text and "1−S = " in a.text]
    assert titles and all(len(re.match(r"1−S = ([^:]*)", t).group(1)) <= 5 for t in titles), titles  # not 0.00999999


def test_metrics_and_measures_are_consistent(quick):
    m = quick.metrics()
    assert m["n5_m2_represented"] == quick.sweeps[0].represented().tolist()
    assert len(m["n8_m3_dims_per_feature"]) == 3 and all(d > 0 for d in m["n8_m3_dims_per_feature"])
    assert quick.phase_relu.shape == (3, 3) and set(quick.phase_linear.ravel()) <= {0, 1}  # linear: never both
    assert quick.abs_W1.shape == (3, 3, 6)
    json.dumps(m)  # the report writes it


def test_is_deterministic_for_a_seed():
    cfg = SuperpositionConfig(n_features=(4,), n_hidden=(2,), sparsities=(0.5,), n_steps=50, phase_diagram=False,
                              computation=False, batch_size=64)
    a, b = compute(torch.device("cpu"), cfg), compute(torch.device("cpu"), cfg)
    assert (a.sweeps[0].W == b.sweeps[0].W).all()


def test_runs_in_the_report_pipeline_without_a_model_and_exports_ground_truth(tmp_path, capsys):
    cfg = SuperpositionConfig(n_features=(4,), n_hidden=(2,), sparsities=(0.5, 0.9), n_steps=50,
                              phase_diagram=False, computation=False, batch_size=64, export=str(tmp_path / "gt"))
    section = run_analysis("superposition", None, cfg, device="cpu")
    assert section.model == "toy models"
    assert (tmp_path / "gt" / "instance_001.safetensors").exists() and str(tmp_path / "gt") in capsys.readouterr().out
    assert (write_report(tmp_path / "r", [section]) / "index.html").exists()


@pytest.mark.parametrize("bad,field", [(dict(sparsities=(0.5, 1.0)), "sparsities"),
                                       (dict(n_features=(5, 20), n_hidden=(2,)), "n_features"),
                                       (dict(n_steps=0), "n_steps")])
def test_bad_settings_are_rejected(bad, field):
    with pytest.raises(ConfigError, match=field):
        SuperpositionConfig(**bad)


def test_more_hidden_dimensions_than_features_warns():
    with pytest.warns(UserWarning, match="no superposition"):
        SuperpositionConfig(n_features=(3,), n_hidden=(4,)).sweeps()
