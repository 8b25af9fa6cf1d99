"""Artifacts on disk. Every artifact is a folder: `config.json` (with a `kind` and a format version)
beside `model.safetensors`. File names live here and nowhere else.

A model folder:            A training run folder (also a model folder, for its final weights):
    config.json                config.json, model.safetensors, tokenizer.json
    model.safetensors          log.jsonl
    tokenizer.json             checkpoints/step_000000/ ... each a model folder,
                                   + training_state.pt (optimizer state) where kept

`config.json` records the SHA-256 of the weights, so a truncated or corrupt file is caught on
load instead of producing a silently wrong model. Writes are atomic: files go through a
temporary name and `os.replace`; checkpoint folders are built under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workbench.errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "training_state.pt"
LOG_FILE = "log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
FORMAT_VERSION = 1

Loader = Callable[[Path, dict[str, Any], torch.device], Any]
_LOADERS: dict[str, Loader] = {}


def register_kind(kind: str) -> Callable[[Loader], Loader]:
    """Register the loader of artifacts whose config.json says `"kind": kind`."""

    def deco(fn: Loader) -> Loader:
        _LOADERS[kind] = fn
        return fn

    return deco


# -- atomic writes --------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write, indented for people to read."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- model folders --------------------------------------------------------------------------------
def write_model_folder(folder: Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                       tokenizer_json: str | None = None) -> None:
    """Write weights, tokenizer and config.json (last, with the weights' checksum) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    digest = sha256_file(tmp)
    os.replace(tmp, folder / WEIGHTS_FILE)
    if tokenizer_json is not None:
        atomic_write_bytes(folder / TOKENIZER_FILE, tokenizer_json.encode())
    atomic_write_json(folder / CONFIG_FILE, {"kind": kind, "format_version": FORMAT_VERSION,
                                             **meta, "weights_sha256": digest})


def read_config(folder: Path) -> dict[str, Any]:
    """Read and check a folder's config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"No model folder at {folder}.")
    path = folder / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}; it is not a workbench model folder "
                              "(or its write was interrupted). Pick another checkpoint or re-train.")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}). Restore it or use an earlier checkpoint.") from err
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}; this workbench reads version "
                              f"{FORMAT_VERSION}. Upgrade the workbench or re-save the model.")
    return meta


def read_weights(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load model.safetensors after checking it against the checksum in config.json."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.exists():
        raise CheckpointError(f"{folder} has no {WEIGHTS_FILE}. Re-train, or load an earlier checkpoint "
                              f"from {Path(folder) / CHECKPOINTS_DIR}.")
    expected = meta.get("weights_sha256")
    if expected is not None and sha256_file(path) != expected:
        raise CheckpointError(f"{path} is truncated or corrupt: its checksum does not match config.json. "
                              f"Load an earlier checkpoint from {Path(folder) / CHECKPOINTS_DIR} or re-train.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} could not be read ({err}); it is truncated or corrupt.") from err


def load_folder(folder: Path, device: torch.device) -> Any:
    """Load any registered artifact kind from its folder."""
    meta = read_config(folder)
    kind = meta.get("kind")
    if kind not in _LOADERS:
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE} has kind {kind!r}; known kinds: "
                              f"{sorted(_LOADERS)}.")
    return _LOADERS[kind](Path(folder), meta, device)


# -- checkpoints ----------------------------------------------------------------------------------
def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """`run_dir/checkpoints/step_000123`."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) for each complete checkpoint (it has a config.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and (p / CONFIG_FILE).exists():
            try:
                found.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return sorted(found)


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Build a checkpoint folder with `write(tmp_folder)`, then rename it into place atomically."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():  # re-saving the same step (an interrupt right at a checkpoint step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
