"""Where a model cannot support something, the analysis refuses with one line that names the
architecture and the missing piece, never a traceback and never a number resting on an edit that
did not take effect."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from workbench import adapter
from workbench.adapter import probe as probing
from workbench.cli import main


def _without(piece: str, why: str):
    """A describe() that reports one failed check, for a model whose checks all pass."""
    real = probing._probe

    def probe(model):
        arch = real(model)
        problems = (*arch.problems, (piece, why))
        return replace(arch, problems=problems, knockout=None if piece == "knockout" else arch.knockout)
    return probe


@pytest.mark.parametrize("analysis,piece,extra", [
    ("fact-recall", "knockout", ["--n-facts", "1", "--noise-samples", "1", "--window", "1"]),
    ("circuits", "fold", ["--seq-len", "6", "--n-sequences", "2", "--n-random", "2"]),
    ("induction-heads", "z edits", ["--seq-len", "6", "--n-sequences", "2", "--prefix-seq-len", "4"]),
])
def test_the_cli_prints_one_line_naming_the_architecture_and_the_missing_piece(
        analysis, piece, extra, family_folders, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(probing, "_probe", _without(piece, "the check failed in this test"))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "return the value of", "subject": "value", "target": " x"}]))
    args = ["run", analysis, "--model", f"hf:{family_folders['opt']}", "--out", str(tmp_path / "out"), *extra]
    if analysis == "fact-recall":
        args += ["--facts-file", str(facts)]
    assert main(args) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]  # (HF prints a loading bar too)
    assert len(errors) == 1 and "Traceback" not in stderr
    assert errors[0].startswith("error: opt (OPTForCausalLM):")
    assert "does not apply: the check failed in this test" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_hook_that_is_registered_but_never_fires_is_a_clear_error(family_folders):
    import workbench
    from workbench.cache.collect import run_collect

    model = workbench.load(f"hf:{family_folders['llama']}", device="cpu")
    assert "hook_pos_embed" in model.hook_dict  # registered ...
    with pytest.raises(adapter.DoesNotApplyError, match="llama .*hook_pos_embed.*never fires"):
        run_collect(model, model.to_tokens("def main"), ["hook_pos_embed"])  # ... but a rotary model never fires it


def test_sae_activations_from_a_hook_that_never_fires_are_a_clear_error(family_folders):
    import workbench
    from workbench.cache.activations import model_activations

    model = workbench.load(f"hf:{family_folders['gemma']}", device="cpu")
    with pytest.raises(adapter.DoesNotApplyError, match="gemma .*hook_pos_embed"):
        model_activations(model, model.to_tokens("def main"), ["hook_pos_embed"])
