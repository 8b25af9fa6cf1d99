"""Grokking: bad input, and the paper's findings measured on the shipped p = 53 model (loaded, not
trained). The Fourier machinery is tested in tests/workbench/compute/test_fourier.py, the task, model
and trainer in tests/workbench/{data,model,train}/test_modular.py."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest

import workbench
from analyses.grokking import GrokkingConfig, compute, figures
from tests.conftest import assert_colorbars_titled, tiny_modular_config
from workbench.artifacts import list_checkpoints, read_config, strict_json
from workbench.errors import ConfigError, InputError
from workbench.model.loading import models_dir
from workbench.report.pipeline import run_analysis, write_report
from workbench.report.plotting import caption_of
from workbench.train.modular import train_modular

SHIPPED = "modular-addition"
tiny = tiny_modular_config


# -- bad input to the analysis ---------------------------------------------------------------------------
def test_a_model_that_is_not_modular_addition_is_a_clear_error(attn_model):
    with pytest.raises(InputError, match="needs a model trained on modular addition.*workbench run grokking"):
        compute(attn_model, GrokkingConfig())
    with pytest.raises(InputError, match="trained on modular addition"):
        run_analysis("grokking", workbench.load("attn-only-1l", device="cpu"))


def test_a_composite_p_model_is_analysed_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="not prime"):
        cfg = tiny(p=9, n_steps=4, n_checkpoints=2)
        out = train_modular(cfg, tmp_path / "run", progress=False)
    with pytest.warns(UserWarning, match="p=9 is not prime"):
        result = compute(workbench.load(out, device="cpu"), GrokkingConfig())
    assert any("not prime" in h for h in result.headlines())


def test_key_frequencies_beyond_p_half_are_an_error(tmp_path):
    out = train_modular(tiny(n_steps=4, n_checkpoints=2), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="exceed p // 2 = 5"):
        compute(workbench.load(out, device="cpu"), GrokkingConfig(key_frequencies=(7,)))
    with pytest.raises(ConfigError, match="GrokkingConfig.key_frequencies"):
        GrokkingConfig(key_frequencies=(0,))


# -- the shipped p = 53 model: what the paper found, measured ----------------------------------------------
@lru_cache(maxsize=None)
def _shipped():
    return compute(workbench.load(SHIPPED, device="cpu"), GrokkingConfig())


def test_the_shipped_model_is_small_and_trained_within_minutes():
    folder = models_dir() / SHIPPED
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10e6
    meta = read_config(folder)
    assert meta["train_seconds"] <= 600 and len(list_checkpoints(folder)) >= 12


def test_test_accuracy_is_at_most_half_early_and_reaches_one_later_and_the_report_marks_when():
    r = _shipped()
    c = r.curves
    marks = r.test_acc_marks()
    half, one = marks["test_acc_above_half_step"], marks["test_acc_one_step"]
    assert half is not None and one is not None and half < one
    assert (c.test_acc[c.steps < half] <= 0.5).all()
    memorised = r.phases["memorisation_end"]
    assert c.train_acc[c.steps == memorised][0] == 1.0 and memorised < half
    assert c.test_acc[c.steps == memorised][0] <= 0.5  # every training pair right, the test set mostly wrong
    assert r.final["test_acc"] == 1.0
    assert r.metrics()["test_acc_one_step"] == one and f"reaches 100% at step {one}" in r.headlines()[0]


def test_a_handful_of_key_frequencies_hold_most_of_the_embeddings_energy():
    r = _shipped()
    assert 3 <= len(r.key_frequencies) <= 7 and r.keys_found
    assert r.key_embed_share >= 0.7
    uniform = len(r.key_frequencies) / (len(r.embed_share) - 1)
    assert r.key_embed_share > 3 * uniform


def test_neurons_and_logits_are_functions_of_the_key_frequencies():
    r = _shipped()
    assert r.neuron_fve >= 0.8
    live = r.neuron_variance > 0.01 * r.neuron_variance.max()
    assert np.isin(r.neuron_frequency[live], r.key_frequencies).mean() >= 0.9
    assert r.key_logit_share >= 0.7
    per_term = r.metrics()["neuron_variance_by_term"]
    assert per_term["a + b"] > per_term["a − b"]  # the MLP computes cos/sin(w(a+b))


def test_restricted_loss_falls_before_test_loss_and_excluded_loss_rises_in_circuit_formation():
    r = _shipped()
    checks = r.progress_checks()
    assert checks["restricted_falls_before_test"] is True
    assert checks["excluded_rises_in_circuit_formation"] is True
    ph = r.phases
    assert ph["memorisation_end"] < ph["circuit_formation_end"] < ph["cleanup_end"]
    g = r.progress
    assert g.gini_embed[-1] > g.gini_embed[0] + 0.2  # the spectrum gets sparse
    assert r.curves.weights_sq[-1] < r.curves.weights_sq.max()  # weight decay cleans up


def test_the_report_has_captioned_titled_figures_and_strict_metrics(tmp_path):
    r = _shipped()
    figs = figures(r)
    assert {"loss and accuracy over training", "progress measures: restricted and excluded loss",
            "embedding spectrum", "logits in cos(w(a+b−c))"} <= set(figs)
    for name, fig in figs.items():
        assert caption_of(fig) and fig.layout.title.text, name
    assert_colorbars_titled(figs)
    assert figs["loss and accuracy over training"].layout.xaxis.type == "log"
    json.dumps(strict_json(r.metrics()), allow_nan=False)
    section = run_analysis("grokking", workbench.load(SHIPPED, device="cpu"),
                           replace(GrokkingConfig(), progress_measures=False))
    path = write_report(tmp_path / "report", [section])
    assert "Grokking" in (path / "grokking.html").read_text()
