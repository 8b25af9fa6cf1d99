"""Every analysis on every family, with small settings: each either completes with finite,
strictly-JSON metrics whose shapes match the model, or raises the documented DoesNotApplyError.
The README's "Model families" table is this matrix; the last test checks that they agree.

Two families (qwen2: grouped-query attention with q/k/v biases; gptj: parallel blocks, rotary, no
attention biases, and the recomputed-z knockout) run in the fast suite; the rest are marked slow.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from analyses.circuit_tracing import CircuitTracingConfig
from analyses.circuits import CircuitsConfig
from analyses.fact_recall import FactRecallConfig
from analyses.induction_heads import InductionConfig
from analyses.model_card import ModelCardConfig
from analyses.sae import SAEAnalysisConfig
from analyses.superposition import SuperpositionConfig
from tests.hf_families import FAMILIES
from workbench.adapter import DoesNotApplyError
from workbench.report.pipeline import run_analysis
from workbench.report.plotting import caption_of
from workbench.report.widgets import Widget

FAST = ("qwen2", "gptj")
ANALYSES = ("model-card", "induction-heads", "circuits", "sae", "fact-recall", "circuit-tracing")
FACTS = [{"prompt": "def main(): return the", "subject": "main", "target": " value"},
         {"prompt": "return the value of", "subject": "value", "target": " x"},
         {"prompt": "def main(): return the value of", "subject": "main", "target": " x"},
         {"prompt": "the value of", "subject": "the value", "target": " x"}]
OUTCOMES: dict[tuple[str, str], str] = {}  # (family, analysis) -> "✓" or the does-not-apply message


def small_config(analysis: str, tmp_path: Path):
    if analysis == "model-card":
        return ModelCardConfig(repeat_len=8, n_repeats=2)
    if analysis == "induction-heads":
        return InductionConfig(seq_len=8, n_sequences=2, prefix_seq_len=5, prefix_copies=2)
    if analysis == "circuits":
        return CircuitsConfig(seq_len=8, n_sequences=2, n_random=4, text_rows=2, text_len=16, max_rows=64,
                              plot_tokens=20)
    if analysis == "sae":
        return SAEAnalysisConfig(saes=("topk:4",), dashboard="topk:4", n_tokens=2048, batch_size=256, train_rows=8,
                                 eval_rows=4, seq_len=32, ground_truth=False, dashboard_features=4, expansion=2)
    if analysis == "circuit-tracing":
        return CircuitTracingConfig(prompts=("def main(): return the value of",), n_tokens=2 * 2048, sae_tokens=2048,
                                    eval_rows=4, d_tc=32, k=4, viewer_nodes=20, ablate=1)
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(FACTS))
    return FactRecallConfig(facts_file=str(path), n_facts=2, noise_samples=1, window=2, probe_subject_fraction=0.5)


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


def check_shapes(analysis: str, m: dict, L: int, H: int, D: int) -> None:
    """The metrics have the model's shape."""
    if analysis in ("model-card", "induction-heads"):
        assert np.array(m["induction_LH"]).shape == (L, H)
    if analysis == "circuits":
        assert np.array(m["OV_copying_LH"]).shape == (L, H)
        assert np.array(m["K_composition"], dtype=float).shape == (L, H, L, H)
    if analysis == "sae":
        assert m["d_in"] == D
    if analysis == "circuit-tracing":
        assert len(m["transcoders"]["layers"]) == L and m["graphs"][0]["identity_max_relative_error"] < 1e-3
    if analysis == "fact-recall":
        assert len(m["traces"]["resid"]["last token"]) == L and len(m["probes"]["model"]["last token"]) == L


def _cells():
    for family in FAMILIES:
        for analysis in ANALYSES:
            marks = () if family in FAST else (pytest.mark.slow,)
            yield pytest.param(family, analysis, marks=marks, id=f"{family}-{analysis}")


def run_cell(family_name: str, analysis: str, folder: Path, tmp_path: Path) -> str:
    """Run one cell, check it, and return "✓" or the does-not-apply message (kept in OUTCOMES)."""
    import workbench

    if (family_name, analysis) in OUTCOMES:
        return OUTCOMES[family_name, analysis]
    model = workbench.load(f"hf:{folder}", device="cpu")
    try:
        section = run_analysis(analysis, model, small_config(analysis, tmp_path))
    except DoesNotApplyError as err:
        assert str(err).startswith(family_name) and "does not apply" in str(err)
        OUTCOMES[family_name, analysis] = str(err)
        return str(err)
    text = json.dumps(section.metrics, allow_nan=False)  # strict JSON: no NaN, no Infinity
    assert all(np.isfinite(x) for x in _numbers(json.loads(text)))
    check_shapes(analysis, section.metrics, model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model)
    assert section.figures and section.headlines
    uncaptioned = [n for n, f in section.figures.items() if not (f.caption if isinstance(f, Widget) else caption_of(f))]
    assert not uncaptioned, f"figures without a caption: {uncaptioned}"
    OUTCOMES[family_name, analysis] = "✓"
    return "✓"


@pytest.mark.parametrize("family_name,analysis", list(_cells()))
def test_analysis_runs_or_does_not_apply(family_name, analysis, family_folders, tmp_path):
    outcome = run_cell(family_name, analysis, family_folders[family_name], tmp_path)
    assert outcome == "✓" or "does not apply" in outcome


def test_superposition_needs_no_model():
    """The superposition study trains its own toy models: the same on every family (model-free)."""
    cfg = SuperpositionConfig(n_features=(5,), n_hidden=(2,), sparsities=(0.0, 0.9), n_steps=50, batch_size=64,
                              phase_diagram=False, computation=False)
    section = run_analysis("superposition", None, cfg, device="cpu")
    json.dumps(section.metrics, allow_nan=False)
    assert all(caption_of(f) for f in section.figures.values())
    OUTCOMES["*", "superposition"] = "✓"


@pytest.mark.slow
def test_the_readme_table_is_the_measured_matrix(family_folders, tmp_path):
    """The README's "Model families" table says what this matrix measured, cell by cell (cells not
    run yet in this session are run here)."""
    for family in FAMILIES:
        for analysis in ANALYSES:
            run_cell(family, analysis, family_folders[family], tmp_path)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Model families", 1)[1]
    header, rows = None, {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| architecture"):
            header = cells
        elif header and not line.startswith("|"):
            break  # the end of the table
        elif header and line.startswith("| `"):
            rows[re.sub(r"[`]", "", cells[0]).split()[0]] = dict(zip(header, cells))
    assert set(rows) == set(FAMILIES)
    for family in FAMILIES:
        for analysis in ANALYSES:
            measured = OUTCOMES[family, analysis]
            cell = rows[family][analysis]
            assert cell == "✓" if measured == "✓" else cell.startswith("does not apply"), (family, analysis, cell)
        assert rows[family]["superposition"].startswith("✓")
