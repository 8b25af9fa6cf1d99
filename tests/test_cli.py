"""The `workbench` command and `python -m analyses.<name>`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import workbench
from tests.conftest import tiny_config
from workbench.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_dir(tmp_path):
    workbench.save_model(workbench.Transformer(tiny_config()), tmp_path / "tiny")
    return tmp_path / "tiny"


def test_info_lists_hooks_with_shapes(model_dir, capsys):
    assert main(["info", str(model_dir), "--seq-len", "5"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.attn.hook_pattern" in out and "[1, 4, 5, 5]" in out


def test_run_writes_a_report(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "report"
    assert main(["run", "model-card", "--model", str(model_dir), "--out", str(out_dir), "--repeat-len", "6"]) == 0
    assert (out_dir / "index.html").exists() and str(out_dir) in capsys.readouterr().out
    assert json.loads((out_dir / "metrics.json").read_text())


def test_errors_are_messages_not_tracebacks(capsys):
    assert main(["run", "no-such-analysis"]) == 2
    assert "Unknown analysis" in capsys.readouterr().err
    assert main(["info", "no-such-model"]) == 2
    assert "Presets" in capsys.readouterr().err
    assert main(["train", "no-such-preset"]) == 2
    assert "No preset" in capsys.readouterr().err


def test_list_shows_presets_and_analyses(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "attn-only-2l" in out and "model-card" in out


def test_train_command_trains_a_config_file(tmp_path):
    cfg = {"model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 16},
           "data": {"synthetic_fraction": 1.0}, "batch_size": 4, "n_steps": 4, "warmup_steps": 1,
           "n_checkpoints": 2}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert workbench.load(tmp_path / "run", device="cpu").meta["step"] == 4
    assert main(["train", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2


@pytest.mark.parametrize("module,args", [
    ("model_card", ["--repeat-len", "6"]),
    ("induction_heads", ["--seq-len", "8", "--prefix-seq-len", "5", "--n-sequences", "4"]),
    ("circuits", ["--seq-len", "8", "--n-sequences", "4", "--text-len", "16", "--induction-head", "L1H2"]),
    ("superposition", ["--n-features", "6", "--n-hidden", "2", "--sparsities", "0", "0.9", "--n-steps", "50",
                       "--phase-diagram", "false", "--computation", "false"]),
])
def test_analysis_modules_run_as_scripts(model_dir, tmp_path, module, args):
    model = ["--model", str(model_dir)] if module != "superposition" else []  # it trains its own toy models
    proc = subprocess.run([sys.executable, "-m", f"analyses.{module}", *model, "--out", str(tmp_path / "r"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "index.html").exists() and str(tmp_path / "r") in proc.stdout


def test_settings_help_comes_from_the_config_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["run", "induction-heads", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--ablation-threshold" in out and "nats per token more than it raises the first-half loss" in out
