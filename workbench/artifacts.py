"""Artifacts on disk. Every artifact is a folder: `config.json` (with a `kind` and a format version)
beside `model.safetensors`. File names live here and nowhere else.

A model folder:            A training run folder (also a model folder, for its final weights):
    config.json                config.json, model.safetensors, tokenizer.json
    model.safetensors          log.jsonl, .lock (held while a process writes the run)
    tokenizer.json             checkpoints/step_000000/ ... each a model folder,
                                   + training_state.safetensors/.json (optimizer state) where kept

`config.json` records the SHA-256 of the weights, so a truncated or corrupt file is caught on
load instead of producing a silently wrong model. Writes are atomic: files go through a
temporary name and `os.replace`; checkpoint folders are built under a temporary name and renamed
(the write primitives, and full-disk errors, are in `workbench.disk`).

Nothing here unpickles: training state is safetensors plus JSON, so a crafted file can at worst
fail to load. Output folders (reports, dashboards) carry a marker listing the files the workbench
wrote, and only such a folder is ever replaced; a folder holding anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workbench.disk import (  # the write primitives every artifact is built on; re-exported for other writers
    atomic_write_bytes,
    atomic_write_json,
    folder_bytes,
    is_out_of_space,
    json_bytes,
    missing_folders,
    open_modes,
    raise_if_out_of_space,
    remove_if_empty,
    staged_files,
    write_file,
)
from workbench.errors import CheckpointError, InputError, OutOfSpaceError, RunLockedError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "training_state.safetensors"
"""Optimizer and trainer state: the tensors; `STATE_META_FILE` holds the rest and the tensors' checksum."""
STATE_META_FILE = "training_state.json"
LEGACY_STATE_FILE = "training_state.pt"
"""Pickled state written by workbench versions before 0.2; never loaded (see `read_state`)."""
LOG_FILE = "log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"
OUTPUT_MARKER = ".workbench-output.json"
"""In every report or dashboard folder: what wrote it and the files it holds."""
SAE_CFG_FILE, SAE_WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
"""An SAE or per-layer transcoder folder, in SAELens's layout."""
SAE_TRAINING_WEIGHTS_FILE = "training_weights.safetensors"
"""An SAE checkpoint's weights before the activation scale is folded in."""
TRANSCODERS_MANIFEST = "transcoders.json"
"""A transcoder set: its kind, model, hooks and the folder of each layer."""
STORE_MANIFEST = "manifest.json"
"""An activation store: its hooks, width and shards."""
GRAPH_FILE, GRAPH_META_FILE = "graph.safetensors", "graph.json"
"""An attribution graph: its tensors, and its prompt and metadata."""
CIRCUIT_TRACER_CONFIG_FILE = "config.yaml"
"""circuit-tracer's transcoder-set config (beside its layer_<l>.safetensors)."""
FORMAT_VERSION = 1

Loader = Callable[[Path, dict[str, Any], torch.device], Any]
_LOADERS: dict[str, Loader] = {}


def register_kind(kind: str) -> Callable[[Loader], Loader]:
    """Register the loader of artifacts whose config.json says `"kind": kind`."""

    def deco(fn: Loader) -> Loader:
        _LOADERS[kind] = fn
        return fn

    return deco


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


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
    """Write weights, tokenizer and config.json (last, with the weights' checksum) into `folder`, all
    or none (`staged_files`): a full disk leaves the folder as it was and raises OutOfSpaceError."""
    with staged_files(Path(folder), _tensor_bytes(tensors)) as stage:
        weights = stage(WEIGHTS_FILE)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights))
        digest = sha256_file(weights)
        if tokenizer_json is not None:
            write_file(stage(TOKENIZER_FILE), tokenizer_json.encode())
        write_file(stage(CONFIG_FILE), json_bytes({"kind": kind, "format_version": FORMAT_VERSION,
                                                     **meta, "weights_sha256": digest}))


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


def write_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], needed_bytes: int = 0) -> Path:
    """Build a checkpoint folder with `write(tmp_folder)`, then rename it into place atomically. A full
    disk removes the partial folder and raises OutOfSpaceError (`needed_bytes` estimates the size)."""
    final = checkpoint_dir(run_dir, step)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp", dir=final.parent))
    except OSError as err:
        raise_if_out_of_space(err, final, needed_bytes)
        raise
    try:
        write(tmp)
    except BaseException as err:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_out_of_space(err, final, max(needed_bytes, written), tmp)
        raise
    open_modes(tmp)
    if final.exists():  # the same step saved again: swap, so a complete checkpoint is always there
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old", dir=final.parent))
        os.replace(final, old / "ckpt")
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


# -- training state: safetensors + JSON, never pickle ----------------------------------------------
def _encode_state(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON-able tree of `obj` whose tensors are moved into `tensors` (keyed by their path)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous().cpu()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode_state(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode_state(k, tensors, f"{path}/key{i}"), _encode_state(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"training state holds a {type(obj).__name__} at {path}, which is not saved")


def _decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_decode_state(k, tensors): _decode_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode_state(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _decode_state(v, tensors) for k, v in obj.items()}
    return obj


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Save a trainer's state (optimizer state dicts, counters, RNG state) as safetensors plus JSON."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode_state(state, tensors, "state")
    with staged_files(Path(folder), _tensor_bytes(tensors)) as stage:  # both files or neither
        tmp = stage(STATE_FILE)
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
        write_file(stage(STATE_META_FILE), json_bytes({"format_version": FORMAT_VERSION, "tensors_sha256": digest,
                                                         "state": tree}))


def has_state(folder: Path) -> bool:
    """Whether a checkpoint folder holds training state (both files)."""
    return (folder / STATE_FILE).exists() and (folder / STATE_META_FILE).exists()


def remove_state(folder: Path) -> None:
    """Drop a checkpoint's training state (the weights stay)."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    (folder / STATE_META_FILE).unlink(missing_ok=True)


def read_state(folder: Path) -> dict[str, Any]:
    """Load what `write_state` saved, checking the checksum; tensors stay on the CPU."""
    folder = Path(folder)
    if (folder / LEGACY_STATE_FILE).exists() and not has_state(folder):
        raise CheckpointError(f"{folder / LEGACY_STATE_FILE} is a pickle from an older workbench. Pickles can run "
                              "code, so it is not loaded. Resume is not possible from this checkpoint; start a new "
                              "run in another folder (its weights in model.safetensors load as usual).")
    meta_path, tensor_path = folder / STATE_META_FILE, folder / STATE_FILE
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise ValueError("no 'state' object")
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path} is missing or corrupt ({err}). Resume from an earlier checkpoint: "
                              f"move {folder} out of {folder.parent}, then run the command again.") from err
    if not tensor_path.exists() or sha256_file(tensor_path) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensor_path} is missing, truncated or corrupt (its checksum does not match "
                              f"{STATE_META_FILE}). Resume from an earlier checkpoint: move {folder} out of "
                              f"{folder.parent}, then run the command again.")
    try:
        tensors = load_file(str(tensor_path))
        return _decode_state(meta["state"], tensors)
    except (SafetensorError, OSError, KeyError, TypeError) as err:
        raise CheckpointError(f"{tensor_path} could not be read ({err}).") from err


# -- logs -----------------------------------------------------------------------------------------
def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log. A half-written last line (a kill during a write) is dropped with a
    note on stderr; a corrupt line elsewhere is a CheckpointError naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a log record")
        except ValueError as err:
            if i == len(lines) - 1:
                print(f"Note: dropped the half-written last line of {path} (line {i + 1}).", file=sys.stderr)
                break
            raise CheckpointError(f"{path} line {i + 1} is corrupt ({err}). Delete that line (or the "
                                  "file; it only holds the curves) and run the command again.") from err
        records.append(record)
    return records


def truncate_log(path: Path, last_step: int) -> None:
    """Keep the records up to `last_step`, so a resumed run's log equals an uninterrupted run's."""
    if path.exists():
        keep = [r for r in read_log(path) if r["step"] <= last_step]
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in keep).encode())


def append_log(path: Path, record: dict[str, Any]) -> None:
    """One strict-JSON line (a non-finite number is written as null). A full disk takes back the part
    of the line that was written and raises OutOfSpaceError."""
    line = (json.dumps(strict_json(record), allow_nan=False) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # unbuffered: a failed write shows here
    except OSError as err:
        raise_if_out_of_space(err, path, len(line))
        raise
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            done = 0
            while done < len(line):
                done += os.write(fd, line[done:])
        except OSError as err:
            os.ftruncate(fd, start)
            raise_if_out_of_space(err, path, len(line))
            raise
    finally:
        os.close(fd)


def strict_json(obj: Any) -> Any:
    """`obj` with every NaN or ±inf float replaced by None, so `json.dumps(..., allow_nan=False)` works."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


# -- run folders: one writer at a time -------------------------------------------------------------
@contextmanager
def run_lock(folder: Path, what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on `folder/.lock` while a process writes the run. The kernel releases it
    when the process ends, however it ends, so a `kill -9` leaves no stale lock. A second writer gets a
    RunLockedError naming the process that holds it.

    When the disk fills before the run has saved anything (its folder, made here, holds no file but the
    lock and the log), those two are removed, so the same command can simply be run again."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no locking; runs must not share a folder there
        yield
        return
    folder = Path(folder)
    created = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        remove_if_empty(created)
        raise_if_out_of_space(err, folder / LOCK_FILE)
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise RunLockedError(f"{folder} is being written by {holder}. Two {what}s in one folder would mix "
                                 "their logs and checkpoints: wait for it to finish, stop it, or choose another "
                                 "--out.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} ({' '.join(sys.argv[:6])[:150]})".encode())
        yield
    except BaseException as err:
        if created and is_out_of_space(err):
            _remove_unsaved_run(folder)
            if not isinstance(err, OutOfSpaceError):
                raise_if_out_of_space(err, folder / LOCK_FILE)
        raise
    finally:
        os.close(fd)  # closing releases the lock


def _remove_unsaved_run(folder: Path) -> None:
    """Remove the lock and the log of a run that saved nothing: its folder holds no other file (the
    empty folders stay; a new run goes into them)."""
    files = [p for p in folder.rglob("*") if not p.is_dir()]
    if all(p.parent == folder and p.name in (LOCK_FILE, LOG_FILE) for p in files):
        for p in files:
            p.unlink(missing_ok=True)


# -- output folders (reports, dashboards): never delete what the workbench did not write ---------------
def _protected(target: Path) -> Optional[str]:
    """Why `target` may not be an output folder, or None."""
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if target == Path(target.anchor):
        return "it is the root of the file system"
    if target == home:
        return "it is your home folder"
    if target == cwd or target in cwd.parents:
        return "it is the current folder or one of its parents"
    if target == checkout or target in checkout.parents:
        return "it holds the workbench's own checkout"
    models = Path(os.environ.get("WORKBENCH_MODELS", checkout / "models")).resolve()
    if target == models or target in models.parents or models in target.parents:
        return "it is, holds, or is inside the models folder"
    return None


def _listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def check_output_folder(out: Path, kind: str) -> Path:
    """The absolute target for an output folder `out`, or an InputError saying why it can't be used."""
    target = Path(out).expanduser().absolute()
    resolved = target.resolve()
    why = _protected(resolved)
    if why:
        raise InputError(f"Refusing to write a {kind} into {out}: {why}. Choose a new folder, e.g. "
                         f"--out reports/my-{kind}.")
    if target.exists() and not target.is_dir():
        raise InputError(f"Refusing to write a {kind} into {out}: it is an existing file, not a folder. Choose a "
                         "new folder name.")
    if target.is_dir() and any(target.iterdir()):
        marker = target / OUTPUT_MARKER
        try:
            written = set(json.loads(marker.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"Refusing to write a {kind} into {out}: the folder is not empty and was not written by "
                             "the workbench (it has no "
                             f"{OUTPUT_MARKER}). Nothing was changed; choose a new or empty folder.") from None
        foreign = sorted(_listing(target) - written - {OUTPUT_MARKER})
        if foreign:
            raise InputError(f"Refusing to replace the {kind} in {out}: it holds files the workbench did not write "
                             f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}). Move them out, or "
                             "choose a new folder.")
    return target


def write_output_folder(out: Path, kind: str, build: Callable[[Path], None], needed_bytes: int = 0) -> Path:
    """Build an output folder with `build(tmp)` in a fresh temporary folder beside `out`, then move it
    into place. An existing `out` is replaced only when the workbench wrote it and nothing was added;
    see `check_output_folder`. A full disk removes the partial folder and says how much space it needs
    (`needed_bytes`, where the caller can estimate it; else at least what was written or is free)."""
    target = check_output_folder(out, kind)
    created = missing_folders(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    except OSError as err:
        remove_if_empty(created)
        raise_if_out_of_space(err, target, needed_bytes)
        raise
    try:
        build(tmp)
        atomic_write_json(tmp / OUTPUT_MARKER, {"kind": f"workbench {kind}", "files": sorted(_listing(tmp))})
    except BaseException as err:
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(created)
        raise_if_out_of_space(err, target, max(needed_bytes, written), tmp)
        raise
    open_modes(tmp)
    if target.is_dir() and any(target.iterdir()):  # a workbench output (checked above): swap, then drop the old
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)  # over an empty folder, or none
    return target
