"""The processes of one torchrun job run one command: a rank started with other settings (another
--hook, --d-sae or --seed) stops every rank with an `error:` line naming the setting, before anything
is trained or written; `transcoder train`, which trains in one process, refuses to run under torchrun.

Each test starts two real ranks of `python -m workbench`, joined by the env:// rendezvous that torchrun
sets up (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so each rank can be given its own command line,
as on two nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import workbench
from tests.conftest import tiny_config
from workbench.data.tokenizer import TextCodec, byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(argvs: list[list[str]]) -> list[tuple[int, str]]:
    """(exit code, stderr) of `python -m workbench argvs[r]` run as rank r of 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-m", "workbench", *argv], cwd=ROOT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r, argv in enumerate(argvs)]
    try:
        return [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=150)]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _every_rank_stops(results: list[tuple[int, str]], *needles: str) -> None:
    for rank, (code, err) in enumerate(results):
        assert code == 2, f"rank {rank} exited {code}:\n{err[-3000:]}"
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and all(n in lines[0] for n in needles), err[-3000:]


@pytest.fixture
def model_dir(tmp_path):
    model = workbench.Transformer(tiny_config(d_mlp=64), tokenizer=TextCodec(byte_tokenizer()))
    workbench.save_model(model, tmp_path / "tiny")
    return tmp_path / "tiny"


def _sae_train(model_dir: Path, out: Path, *more: str) -> list[str]:
    return ["sae", "train", "--model", str(model_dir), "--n-tokens", "512", "--batch-size", "64", "--k", "4",
            "--rows", "48", "--seq-len", "24", "--device", "cpu", "--no-progress", "--out", str(out), *more]


@pytest.mark.parametrize("setting,values", [("--hook", ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")),
                                            pytest.param("--d-sae", ("64", "128"), marks=pytest.mark.slow)])
def test_sae_train_ranks_with_different_settings_all_stop_and_write_nothing(model_dir, tmp_path, setting, values):
    out = tmp_path / "sae"
    hooks = [["--hook", "blocks.0.hook_resid_post"]] * 2 if setting != "--hook" else [[], []]
    results = _two_ranks([_sae_train(model_dir, out, *hook, setting, value) for hook, value in zip(hooks, values)])
    _every_rank_stops(results, setting, values[0], values[1], "rank 0", "rank 1")
    assert not out.exists()


TINY_RUN = {"model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 16},
            "data": {"synthetic_fraction": 1.0}, "batch_size": 4, "n_steps": 4, "warmup_steps": 1, "n_checkpoints": 2}


@pytest.mark.slow
def test_train_ranks_with_different_settings_all_stop_and_write_nothing(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(TINY_RUN))
    out = tmp_path / "run"
    results = _two_ranks([["train", str(tmp_path / "c.json"), "--out", str(out), "--no-progress", "--device", "cpu",
                           "--seed", seed] for seed in ("1", "2")])
    _every_rank_stops(results, "--seed")
    assert not out.exists()


def test_transcoder_train_refuses_to_run_under_torchrun(model_dir, tmp_path):
    out = tmp_path / "tc"
    argv = ["transcoder", "train", "--model", str(model_dir), "--d-tc", "64", "--k", "4", "--n-tokens", "512",
            "--batch-size", "64", "--rows", "48", "--device", "cpu", "--no-progress", "--out", str(out)]
    _every_rank_stops(_two_ranks([argv, argv]), "one process")
    assert not out.exists()


@pytest.mark.slow
def test_ranks_that_differ_only_in_device_or_progress_bar_train_together(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(TINY_RUN))
    out = tmp_path / "run"
    results = _two_ranks([["train", str(tmp_path / "c.json"), "--out", str(out), "--seed", "1", *mine]
                          for mine in (["--no-progress", "--device", "cpu"], ["--device=cpu"])])
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert workbench.load(out, device="cpu").meta["step"] == 4
