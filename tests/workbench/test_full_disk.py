"""A full disk, for real: each command writes onto a 120 KB tmpfs and ends in one `error:` line saying
the disk filled and how much space it needs, with no traceback, nothing half-written left behind and
nothing it did not write removed. (safetensors reports a full disk as a SafetensorError, not an
OSError, which a faked `raise OSError(ENOSPC)` never shows.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import workbench
from tests.conftest import tiny_config
from workbench import cli
from workbench.artifacts import append_log, atomic_write_json, write_model_folder
from workbench.cli import main
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.errors import OutOfSpaceError

SIZE = "120k"
MESSAGE = re.compile(r"^error: The disk filled while writing .+: it needs about [\d.,]+ MB and [\d.,]+ MB are free\. "
                     r".*Free some space")


@pytest.fixture
def small_disk(tmp_path):
    """A 120 KB tmpfs (mounting needs root, or CAP_SYS_ADMIN) holding one file the workbench did not write."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command: a full-disk test needs a real small file system")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a {SIZE} tmpfs here ({done.stderr.strip() or done.returncode}; it needs root or "
                    "CAP_SYS_ADMIN): a full-disk test needs a real small file system")
    try:
        (disk / "keep.txt").write_text("a file the workbench did not write")
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (not the folders) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if not p.is_dir()}


def _fails_with_a_full_disk(argv: list[str], disk: Path, capsys) -> str:
    """Run `workbench argv`: exit 2, one `error:` line about the full disk, the files on the disk as they were
    (a run's empty folders may stay)."""
    before = _files(disk)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and MESSAGE.search(lines[0]), err[-2000:]
    assert _files(disk) == before  # nothing half-written is left, and nothing else was removed
    return lines[0]


@pytest.fixture
def model_dir(tmp_path):
    model = workbench.Transformer(tiny_config(d_mlp=64), tokenizer=TextCodec(byte_tokenizer()))
    workbench.save_model(model, tmp_path / "tiny")
    return tmp_path / "tiny"


TEXT = ["--rows", "48", "--seq-len", "24", "--device", "cpu", "--no-progress"]


def test_sae_cache_onto_a_full_disk_is_a_clear_error(model_dir, small_disk, capsys):
    # 2,000 tokens × 32 floats: one 256 KB shard
    line = _fails_with_a_full_disk(["sae", "cache", "--model", str(model_dir), "--hook", "blocks.0.hook_resid_post",
                                    "--n-tokens", "1000", "--out", str(small_disk / "store"), *TEXT], small_disk,
                                   capsys)
    assert str(small_disk / "store") in line


@pytest.mark.parametrize("n_checkpoints", [pytest.param(3, id="at-a-checkpoint"),
                                           pytest.param(0, id="at-the-final-save")])
def test_sae_train_onto_a_full_disk_is_a_clear_error(model_dir, small_disk, tmp_path, capsys, n_checkpoints):
    # d_sae 1024 × d_in 32: 256 KB of weights (checkpoints hold 3×: weights and Adam's moments)
    (tmp_path / "sae.json").write_text(json.dumps({"n_checkpoints": n_checkpoints}))
    _fails_with_a_full_disk(["sae", "train", "--model", str(model_dir), "--hook", "blocks.0.hook_resid_post",
                             "--d-sae", "1024", "--k", "4", "--n-tokens", "512", "--batch-size", "64",
                             "--config", str(tmp_path / "sae.json"), "--out", str(small_disk / "sae"), *TEXT],
                            small_disk, capsys)


def test_train_onto_a_full_disk_is_a_clear_error(small_disk, tmp_path, capsys):
    cfg = {"model": {"n_layers": 1, "d_model": 64, "n_heads": 2, "d_head": 32, "n_ctx": 16},  # ≈ 300 KB of weights
           "data": {"synthetic_fraction": 1.0}, "batch_size": 4, "n_steps": 4, "warmup_steps": 1, "n_checkpoints": 2}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    _fails_with_a_full_disk(["train", str(tmp_path / "c.json"), "--out", str(small_disk / "run"), "--no-progress",
                             "--device", "cpu"], small_disk, capsys)


def test_transcoder_export_onto_a_full_disk_is_a_clear_error(small_disk, tmp_path, capsys):
    from workbench.sae.transcoders import as_transcoders, make_transcoders

    model = workbench.Transformer(tiny_config(d_mlp=64))
    tc = as_transcoders(make_transcoders(model, 256, "jumprelu", skip=True), 2, "tiny")  # 2 × 70 KB
    tc.save(tmp_path / "tc")
    _fails_with_a_full_disk(["transcoder", "export", "--transcoders", str(tmp_path / "tc"), "--out",
                             str(small_disk / "ct")], small_disk, capsys)


def _fill(disk: Path) -> None:
    """Fill `disk` up to its last few bytes."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 512)
        except OSError:
            pass


def test_the_write_helpers_leave_nothing_half_written_on_a_full_disk(small_disk):
    (small_disk / "log.jsonl").write_text('{"step": 0}\n')
    _fill(small_disk)
    before = _files(small_disk)
    with pytest.raises(OutOfSpaceError, match="log.jsonl"):
        for step in range(1, 2000):  # the log's last page has room for a few lines
            append_log(small_disk / "log.jsonl", {"step": step, "loss": 1.0, "note": "x" * 200})
    lines = (small_disk / "log.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] == i for i, line in enumerate(lines))  # whole lines only
    with pytest.raises(OutOfSpaceError, match="config.json"):
        atomic_write_json(small_disk / "config.json", {"x": "y" * 100_000})
    with pytest.raises(OutOfSpaceError, match="model"):
        write_model_folder(small_disk / "model", "workbench.Transformer", {"w": torch.zeros(50_000)}, {})
    after = _files(small_disk)
    assert {k: v for k, v in after.items() if k != "log.jsonl"} == {k: v for k, v in before.items()
                                                                      if k != "log.jsonl"}
    assert not [name for name in os.listdir(small_disk) if ".tmp" in name]


def test_a_full_disk_reported_anywhere_else_is_an_error_line_and_other_write_errors_are_not_hidden(monkeypatch,
                                                                                                   capsys):
    """The console script's last line of defence: a full disk raised by code with no handler of its own (a
    SafetensorError says so only in its text) is one `error:` line; any other error stays a traceback."""
    from safetensors import SafetensorError

    def fails(text: str):
        def command(argv: list[str]) -> int:
            raise SafetensorError(f"Error while serializing: I/O error: {text}")
        return command

    monkeypatch.setitem(cli.COMMANDS, "info", fails("No space left on device (os error 28)"))
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The disk filled") and "Free some space" in err
    monkeypatch.setitem(cli.COMMANDS, "info", fails("Permission denied (os error 13)"))
    with pytest.raises(SafetensorError, match="Permission denied"):
        main(["info"])
