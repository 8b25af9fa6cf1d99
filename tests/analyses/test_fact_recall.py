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

