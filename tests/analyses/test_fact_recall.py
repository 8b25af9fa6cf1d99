"""The fact-recall study on a TransformerBridge with a facts file, and its bad-input errors."""

from __future__ import annotations

import json

import pytest

import workbench
from analyses.fact_recall import FactRecallConfig, compute, figures
from workbench.errors import InputError


@pytest.fixture
def facts_file(tmp_path):
    rows = [{"prompt": "def main(): return the", "subject": "main", "target": " value"},
            {"prompt": "return the value of", "subject": "value", "target": " x"},
            {"prompt": "def main(): return the value of", "subject": "main", "target": " x"},
            {"prompt": "the value of", "subject": "the value", "target": " x"}]
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(rows))
    return path


def test_runs_on_a_transformer_bridge_with_a_facts_file(tiny_gpt2, facts_file):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    r = compute(bridge, FactRecallConfig(facts_file=str(facts_file), n_facts=4, noise_samples=1, window=1,
                                         probe_subject_fraction=0.5))
    assert r.n_traced >= 1 and set(r.traces) == {"resid", "mlp", "attn"}
    assert r.traces["resid"]["last token"].shape == (2,)
    figs = figures(r)
    for name in ("causal trace: residual stream", "linear probes", "attention knockout", "direct logit attribution"):
        assert name in figs


def test_a_model_without_facts_needs_a_file(attn_model):
    with pytest.raises(InputError, match="facts-file"):
        compute(attn_model, FactRecallConfig())



@pytest.fixture(scope="module")
def shipped():
    return compute(workbench.load("facts", device="cpu"), FactRecallConfig(n_facts=30, noise_samples=2))


@pytest.mark.slow  # runs the study on the shipped facts model (about 15 s, shared by the next two)
def test_the_facts_model_knows_its_facts_and_their_paraphrases(shipped):
    assert shipped.recall["train"] >= 0.95
    assert shipped.recall["held-out phrasing"] >= 0.80
    assert workbench.load("facts", device="cpu").meta["train_seconds"] <= 600


@pytest.mark.slow  # the shipped facts model's study
def test_residual_trace_shows_an_early_site_at_the_subject_and_a_late_site_at_the_last_token(shipped):
    resid, L = shipped.traces["resid"], shipped.n_layers
    early = resid["last subject token"]
    assert int(early.argmax()) < L / 2 and early[-1] < early.max() / 2  # peaks early, falls off later
    late = resid["last token"]
    assert late[-1] >= 0.9 * shipped.total_effect()
    for relation_group in ("first subsequent token", "further tokens"):
        if resid[relation_group] is not None:
            assert resid[relation_group].max() < 0.05  # the relation's own tokens carry next to nothing
    assert set(shipped.mlp_peak()) == {"position", "layer", "effect"}


@pytest.mark.slow  # the shipped facts model's study
def test_probes_are_scored_on_held_out_subjects_against_a_random_model(shipped):
    model, control = shipped.probes["model"], shipped.probes["control"]
    assert model["last token"].max() > control["last token"].max() + 0.3
