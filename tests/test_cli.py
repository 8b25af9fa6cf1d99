"""The `workbench` command and `python -m analyses.<name>`."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import workbench
from tests.conftest import signal_on_call, tiny_config, tiny_train_config
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
    err = capsys.readouterr().err
    assert "Unknown analysis" in err and "`workbench list` lists them" in err and "workbench info" not in err
    assert main(["info", "no-such-model"]) == 2
    assert "Valid names: attn-only-1l" in capsys.readouterr().err
    assert main(["train", "no-such-preset"]) == 2
    assert "Unknown preset or config file" in capsys.readouterr().err


def test_typos_get_a_did_you_mean(capsys):
    assert main(["info", "attn-only-2"]) == 2
    assert "Did you mean: attn-only-2l" in capsys.readouterr().err
    assert main(["train", "gelu2l"]) == 2
    assert "Did you mean: gelu-2l" in capsys.readouterr().err
    assert main(["run", "induction-head"]) == 2
    assert "Did you mean: induction-heads" in capsys.readouterr().err


def test_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as done:
        main(["list", "--help"])
    assert done.value.code == 0 and "usage: workbench list" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "induction-heads", "--help"])
    assert "(default: attn-only-2l)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("out", [".", "..", "a file"])
def test_run_refuses_an_out_that_would_lose_files(model_dir, tmp_path, monkeypatch, capsys, out):
    sub = tmp_path / "project" / "sub"
    sub.mkdir(parents=True)
    (sub / "notes.txt").write_text("mine")
    (tmp_path / "project" / "more.txt").write_text("mine too")
    monkeypatch.chdir(sub)
    target = "notes.txt" if out == "a file" else out
    assert main(["run", "model-card", "--model", str(model_dir), "--out", target, "--repeat-len", "6"]) == 2
    assert "Refusing" in capsys.readouterr().err
    assert (sub / "notes.txt").read_text() == "mine" and (tmp_path / "project" / "more.txt").read_text() == "mine too"
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["more.txt", "sub"]


def test_ctrl_c_prints_the_exact_command_that_resumes(tmp_path, monkeypatch, capsys):
    from workbench.data.text import Batches

    cfg = tiny_train_config(n_steps=24).to_dict()
    (tmp_path / "my config.json").write_text(json.dumps(cfg))
    signal_on_call(monkeypatch, Batches, "train", 10)
    argv = ["train", str(tmp_path / "my config.json"), "--no-progress", "--seed", "0"]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 130
    err = capsys.readouterr().err
    expected = shlex.join(["workbench", *argv, "--out", "runs/my config", "--resume"])
    assert f"Continue with `{expected}`" in err
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(expected)[1:]) == 0  # and that command does resume it


def test_sae_train_config_with_an_unknown_key_is_an_error(model_dir, tmp_path, capsys):
    (tmp_path / "sae.json").write_text(json.dumps({"n_tokens": 4096, "sae": {"architecture": "topk", "kk": 4}}))
    assert main(["sae", "train", "--model", str(model_dir), "--hook", "blocks.0.hook_resid_post", "--config",
                 str(tmp_path / "sae.json"), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "Unknown SAEConfig field(s) ['kk']" in capsys.readouterr().err
    (tmp_path / "sae.json").write_text(json.dumps({"n_tokens": 4096, "learning_rate": 1e-3}))
    assert main(["sae", "train", "--model", str(model_dir), "--hook", "blocks.0.hook_resid_post", "--config",
                 str(tmp_path / "sae.json"), "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "Unknown SAETrainConfig field(s) ['learning_rate']" in capsys.readouterr().err


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
    pytest.param("superposition", ["--n-features", "6", "--n-hidden", "2", "--sparsities", "0", "0.9", "--n-steps",
                                   "50", "--phase-diagram", "false", "--computation", "false"],
                 marks=pytest.mark.slow),  # trains toy models (about 8 s)
])
def test_analysis_modules_run_as_scripts(model_dir, tmp_path, module, args):
    model = ["--model", str(model_dir)] if module != "superposition" else []  # it trains its own toy models
    proc = subprocess.run([sys.executable, "-m", f"analyses.{module}", *model, "--out", str(tmp_path / "r"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r" / "index.html").exists() and str(tmp_path / "r") in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # the module is not imported twice


def test_settings_help_comes_from_the_config_docstrings(capsys):
    with pytest.raises(SystemExit):
        main(["run", "induction-heads", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--ablation-threshold" in out and "nats per token more than it raises the first copy" in out


def test_list_settings_parse_as_their_element_type(monkeypatch, capsys):
    import workbench.report.pipeline
    from workbench.errors import ConfigError

    seen = []

    def fake_run_analysis(name, model, cfg, device="auto", model_label=None):
        seen.append(cfg)
        raise ConfigError("stop here: the config is all this test needs")

    monkeypatch.setattr(workbench.report.pipeline, "run_analysis", fake_run_analysis)
    assert main(["run", "grokking", "--key-frequencies", "5", "6", "--out", "unused"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert [c.key_frequencies for c in seen] == [(5, 6)]


def test_list_settings_take_the_element_type_from_the_annotation():
    import argparse
    import dataclasses
    from typing import Literal, Optional

    from workbench.config import add_config_args, config_overrides

    settings = dataclasses.make_dataclass("Settings", [
        ("ints", tuple[int, ...], dataclasses.field(default=())),
        ("floats", Optional[tuple[float, ...]], dataclasses.field(default=None)),
        ("names", tuple[Literal["a", "b"], ...], dataclasses.field(default=("a",))),
        ("words", list[str], dataclasses.field(default_factory=list)),
    ], frozen=True)
    parser = argparse.ArgumentParser()
    add_config_args(parser, settings)
    args = parser.parse_args(["--ints", "5", "6", "--floats", "1", "0.5", "--names", "b", "--words", "x", "y"])
    assert config_overrides(args, settings) == {"ints": (5, 6), "floats": (1.0, 0.5), "names": ("b",),
                                                "words": ("x", "y")}
    with pytest.raises(SystemExit):
        parser.parse_args(["--ints", "five"])


def test_wandb_without_a_login_is_an_error_line(tiny_gpt2, tmp_path, monkeypatch, capsys):
    import types

    class UsageError(Exception):
        """What wandb raises from `init` on a machine that never ran `wandb login`."""

    def init(**kwargs):
        raise UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    fake = types.ModuleType("wandb")
    fake.errors = types.SimpleNamespace(UsageError=UsageError)
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert main(["sae", "train", "--model", f"hf:{tiny_gpt2}", "--hook", "blocks.0.hook_resid_post", "--wandb", "proj",
                 "--n-tokens", "64", "--batch-size", "32", "--rows", "8", "--seq-len", "8", "--device", "cpu", "--out",
                 str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the loader's progress bar
    assert err.startswith("error: --wandb") and "wandb login" in err and "api_key not configured" in err
    assert not (tmp_path / "s").exists()
