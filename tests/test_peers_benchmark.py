"""benchmarks/peers.py, the parts that need no venv: arguments, the venv folder rules, the summary."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("peers_benchmark", ROOT / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = peers  # its dataclasses look their module up there
_spec.loader.exec_module(peers)


class FakeRun:
    """Stands in for subprocess.run: records each command, 'creates' the venv's python, and fails the
    commands whose last word is in `fail`."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, cmd, check=False, text=True, capture_output=False):
        self.calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            python = peers.venv_python(Path(cmd[3]))
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")
        code = 1 if cmd[-1] in self.fail else 0
        return subprocess.CompletedProcess(cmd, code, stdout="Some library prints this\n2.13.0+cpu 3.9.0\n",
                                           stderr="boom" if code else "")


def test_arguments_and_their_defaults():
    args = peers.parse_args([])
    assert args.rounds == 5 and args.steps is None and args.only == ["tl3", "saelens", "sparsify"]
    assert args.venvs == Path("~/.cache/workbench-peers").expanduser()
    args = peers.parse_args(["--rounds", "2", "--only", "sparsify, tl3,sparsify", "--venvs", "/x/y", "--steps", "1"])
    assert (args.rounds, args.only, args.venvs, args.steps) == (2, ["sparsify", "tl3"], Path("/x/y"), 1)


@pytest.mark.parametrize("argv", [["--only", "tl2"], ["--only", ","], ["--rounds", "0"], ["--steps", "0"],
                                  ["--dead-fraction", "1"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        peers.parse_args(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("marker", [None, "not json", json.dumps({"created_by": "someone else"})])
def test_a_folder_it_did_not_create_is_left_alone(tmp_path, marker):
    folder = tmp_path / "tl3"
    folder.mkdir()
    (folder / "precious.txt").write_text("mine")
    if marker is not None:
        (folder / peers.MARKER).write_text(marker)
    run = FakeRun()
    with pytest.raises(peers.SetupError, match="not created by benchmarks/peers.py"):
        peers.ensure_venv(peers.PEERS["tl3"], tmp_path, run=run)
    assert run.calls == [] and sorted(p.name for p in folder.iterdir()) == sorted(
        ["precious.txt"] + ([peers.MARKER] if marker is not None else []))
    assert (folder / "precious.txt").read_text() == "mine"


def test_a_venv_is_made_once_torch_first_then_reused(tmp_path, capsys):
    run = FakeRun()
    python = peers.ensure_venv(peers.PEERS["tl3"], tmp_path, run=run)
    assert python == peers.venv_python(tmp_path / "tl3")
    assert [c[1:3] for c in run.calls[:1]] == [["-m", "venv"]]
    assert run.calls[1][-1] == "torch==2.13.0" and run.calls[2][-1] == "transformer-lens==3.9.0"
    assert "-c" in run.calls[2]  # the peer's install keeps torch at the pinned version
    assert (tmp_path / "tl3" / "constraints.txt").read_text().strip() == "torch==2.13.0"
    marker = json.loads((tmp_path / "tl3" / peers.MARKER).read_text())
    assert marker["installed"] and marker["versions"] == "2.13.0+cpu 3.9.0"
    assert "installing transformer-lens==3.9.0 into" in capsys.readouterr().out
    again = FakeRun()
    assert peers.ensure_venv(peers.PEERS["tl3"], tmp_path, run=again) == python and again.calls == []


def test_a_failed_install_names_the_venv_and_the_command_and_can_be_resumed(tmp_path):
    with pytest.raises(peers.SetupError) as err:
        peers.ensure_venv(peers.PEERS["saelens"], tmp_path, run=FakeRun(fail={"sae-lens==6.54.12"}))
    message = str(err.value)
    assert "[saelens]" in message and str(tmp_path / "saelens") in message
    assert "pip install" in message and "sae-lens==6.54.12" in message
    assert not json.loads((tmp_path / "saelens" / peers.MARKER).read_text())["installed"]
    run = FakeRun()  # the folder is its own now: the next run completes it without making it again
    peers.ensure_venv(peers.PEERS["saelens"], tmp_path, run=run)
    assert [c[-1] for c in run.calls[:2]] == ["torch==2.13.0", "sae-lens==6.54.12"]


def test_ratios_are_taken_per_round_then_summarised():
    assert peers.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    s = peers.ratio_spread([10.0, 30.0, 20.0, 40.0], [10.0, 10.0, 10.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 4.0, 4)
    with pytest.raises(ValueError):
        peers.ratio_spread([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        peers.spread([])
    assert peers.describe(s) == "2.50x (spread 1.00-4.00 over 4 rounds)"


def test_summaries_of_a_training_and_a_cache_workload():
    train = peers.PEERS["sparsify"].workloads[0]
    rounds = [{"workbench": {"tok_s": 200.0}, "sparsify": {"tok_s": 100.0}},
              {"workbench": {"tok_s": 300.0}, "sparsify": {"tok_s": 100.0}}]
    figures = peers.summarize(train, "sparsify", rounds)
    assert figures["ratio_workbench_vs_sparsify"]["median"] == 2.5
    assert figures["tok_s_sparsify"]["max"] == 100.0
    cache = next(w for w in peers.PEERS["tl3"].workloads if w.kind == "cache")
    rounds = [{"workbench": {"plain_tok_s": 100.0, "cached_tok_s": 80.0},
               "tl3": {"plain_tok_s": 50.0, "cached_tok_s": 20.0}}]
    figures = peers.summarize(cache, "tl3", rounds)
    assert figures["ratio_workbench_cached_over_plain_time"]["median"] == 1.25
    assert figures["ratio_tl3_cached_over_plain_time"]["median"] == 2.5
    assert figures["ratio_workbench_vs_tl3_cached"]["median"] == 4.0
    lines = peers.report_lines(cache, "tl3", figures)
    assert lines[0] == "tl3 / run_with_cache_all_hooks:" and any("4.00x" in line for line in lines)


def test_every_workload_has_its_worker():
    for peer in peers.PEERS.values():
        for workload in peer.workloads:
            assert (peers.WORKERS / workload.worker).exists(), workload


@pytest.mark.parametrize("below", ["", "sub"])
def test_venvs_that_is_a_file_is_an_error_line_and_exit_code_2(tmp_path, below, capsys):
    not_a_folder = tmp_path / "venvs.txt"
    not_a_folder.write_text("mine")
    venvs = not_a_folder / below if below else not_a_folder
    with pytest.raises(SystemExit) as exit_:
        peers.main(["--venvs", str(venvs), "--setup-only"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: --venvs" in err and f"{not_a_folder} is a file" in err and "Traceback" not in err
    assert not_a_folder.read_text() == "mine"


def test_the_generate_workloads_hold_the_shipped_weights(monkeypatch):
    """TL3's generate and the workbench's run on the same weights: the shipped folder, read by the worker
    itself (the TL3 side cannot import the workbench), with W_pos tiled for the long-prompt workload."""
    import torch

    import workbench

    assert set(peers.GENERATE_WORKLOADS) <= set(peers.PEERS["tl3"].workloads)
    monkeypatch.syspath_prepend(str(peers.WORKERS))
    worker = importlib.import_module("worker_tl_generate")
    shipped = workbench.load("attn-only-2l", device="cpu").state_dict()
    model = worker.build("workbench", "attn-only-2l", None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in shipped.items())
    cfg, weights = worker.load_weights("attn-only-2l", n_ctx=640)
    W_pos = weights["pos_embed.W_pos"]
    assert cfg["n_ctx"] == 640 and W_pos.shape[0] == 640
    assert torch.equal(W_pos[:128], shipped["pos_embed.W_pos"]) and torch.equal(W_pos[512:], W_pos[:128])


@pytest.mark.slow
def test_the_generate_worker_prints_its_figures():
    workload = next(w for w in peers.GENERATE_WORKLOADS if "--n-ctx" in w.args)
    done = subprocess.run([sys.executable, str(peers.WORKERS / workload.worker), "--side", "workbench", *workload.args,
                           "--steps", "1", "--warmup", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["n_ctx"] == 640 and record["prompt"] == 512 and record["tok_s"] > 0
