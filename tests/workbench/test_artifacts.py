"""Artifacts on disk: output folders that never delete what the workbench did not write, training
state without pickle, run locks, logs that survive a kill, and a full disk."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from workbench.artifacts import (
    OUTPUT_MARKER,
    append_log,
    read_log,
    read_state,
    run_lock,
    strict_json,
    write_output_folder,
    write_state,
)
from workbench.errors import CheckpointError, InputError, OutOfSpaceError, RunLockedError

ROOT = Path(__file__).resolve().parents[2]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _build(text: str):
    def build(tmp: Path) -> None:
        (tmp / "index.html").write_text(text)
        (tmp / "figures").mkdir()
        (tmp / "figures" / "a.html").write_text(text)

    return build


def test_an_output_folder_is_built_aside_and_replaces_only_its_own_earlier_version(tmp_path):
    out = tmp_path / "report"
    write_output_folder(out, "report", _build("one"))
    assert (out / "index.html").read_text() == "one" and (out / OUTPUT_MARKER).exists()
    write_output_folder(out, "report", _build("two"))
    assert (out / "index.html").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary or old folders left


def test_an_output_folder_holding_a_users_file_is_never_replaced(tmp_path):
    out = tmp_path / "report"
    write_output_folder(out, "report", _build("one"))
    (out / "my notes.txt").write_text("precious")
    before = _snapshot(out)
    with pytest.raises(InputError, match="my notes.txt"):
        write_output_folder(out, "report", _build("two"))
    assert _snapshot(out) == before


@pytest.mark.parametrize("target", ["foreign folder", "existing file", ".", "..", "home", "checkout", "models"])
def test_dangerous_output_targets_are_refused_and_left_untouched(tmp_path, monkeypatch, target):
    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("keep")
    (tmp_path / "work" / "also.txt").write_text("keep")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dotfile").write_text("keep")
    paths = {"foreign folder": tmp_path / "work", "existing file": work / "keep.txt", ".": Path("."),
             "..": Path(".."), "home": tmp_path / "home", "checkout": ROOT, "models": ROOT / "models"}
    watched = tmp_path if target not in ("checkout", "models") else ROOT / "workbench"
    before = _snapshot(watched)
    with pytest.raises(InputError, match="Refusing"):
        write_output_folder(paths[target], "report", _build("x"))
    assert _snapshot(watched) == before


def test_a_full_disk_removes_the_partial_folder_and_says_how_much_space_is_needed(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "big.bin").write_bytes(b"x" * 300_000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutOfSpaceError, match=r"needs about 0\.3 MB and [\d.,]+ MB are free.*removed"):
        write_output_folder(tmp_path / "report", "report", build)
    assert list(tmp_path.iterdir()) == []


def test_training_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 7, "scale": None, "counts": torch.arange(5),
             "stats": {"n": 3, "sum": 0.1, "nan": float("nan")}}
    write_state(tmp_path, state)
    back = read_state(tmp_path)
    assert back["step"] == 7 and back["scale"] is None and torch.equal(back["counts"], torch.arange(5))
    assert back["stats"]["sum"] == 0.1 and back["stats"]["nan"] != back["stats"]["nan"]
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    fresh.load_state_dict(back["optimizer"])
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k in a["state"]:
        assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for n in a["state"][k])
    with open(tmp_path / "training_state.safetensors", "r+b") as f:  # one flipped byte is caught
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointError, match="training_state.safetensors is missing, truncated or corrupt"):
        read_state(tmp_path)


def test_a_lock_is_exclusive_and_names_its_holder(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released on exit
        pass


def test_logs_are_strict_json_and_survive_a_torn_last_line(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    append_log(log, {"step": 1, "loss": float("nan"), "x": [float("inf"), 1.0]})
    line = log.read_text().strip()
    assert json.loads(line) == {"step": 1, "loss": None, "x": [None, 1.0]} and "NaN" not in line
    with open(log, "a") as f:
        f.write('{"step": 2, "lo')
    assert read_log(log) == [{"step": 1, "loss": None, "x": [None, 1.0]}]
    assert "half-written last line" in capsys.readouterr().err
    log.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match="line 2 is corrupt"):
        read_log(log)
    assert strict_json({"a": (1.0, float("-inf"))}) == {"a": [1.0, None]}


@pytest.fixture
def group_umask():
    """The process umask set to 002 (group-writable files, as on a shared project disk) for the test."""
    old = os.umask(0o002)
    yield 0o002
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_saved_weights_get_the_same_mode_as_their_json(tmp_path, group_umask):
    """safetensors writes 0600 and tempfile makes 0700 folders; what the workbench saves gets what a plain
    open() or mkdir() would (0666 / 0777 less the umask), like the JSON beside it."""
    from safetensors.torch import save_file

    from workbench.artifacts import atomic_write_json, write_checkpoint, write_output_folder
    from workbench.sae import SAEConfig, make_sae, save_sae

    sae_folder = save_sae(make_sae(SAEConfig(d_in=8, d_sae=16, k=4)), tmp_path / "sae")
    files = {p.name: _mode(p) for p in Path(sae_folder).iterdir()}
    assert set(files.values()) == {0o664}, files

    def write(folder: Path) -> None:
        save_file({"w": torch.zeros(3)}, str(folder / "weights.safetensors"))
        atomic_write_json(folder / "config.json", {"step": 1})

    ckpt = write_checkpoint(tmp_path / "run", 1, write)
    assert _mode(ckpt) == 0o775 and _mode(ckpt / "weights.safetensors") == _mode(ckpt / "config.json") == 0o664
    out = write_output_folder(tmp_path / "graph", "attribution graph", write)
    assert _mode(out) == 0o775 and _mode(out / "weights.safetensors") == _mode(out / "config.json") == 0o664
