"""Writing files so that a reader never sees half of one: atomic writes (a temporary name, then
`os.replace`), several files of a folder renamed into place all or none (`staged_files`), the modes a
plain open() would give, and a full disk turned into an OutOfSpaceError that says how much space the
write needs, after removing what it left behind. `workbench.artifacts` builds every artifact on these."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from safetensors import SafetensorError

from workbench.errors import OutOfSpaceError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part. A full
    disk removes the partial file and raises OutOfSpaceError."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        raise_if_out_of_space(err, path, len(data), partial_removed=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write, indented for people to read."""
    atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """`obj` as indented JSON text, for people to read."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(err: BaseException) -> bool:
    """Whether `err` says the disk (or the user's quota) is full: an OSError with ENOSPC or EDQUOT, an
    OutOfSpaceError, or safetensors' SafetensorError, which is no OSError and carries the OS error only
    in its text ("Error while serializing: I/O error: No space left on device (os error 28)")."""
    if isinstance(err, OutOfSpaceError):
        return True
    if isinstance(err, OSError):
        return err.errno in _FULL
    if isinstance(err, SafetensorError):
        text = str(err)
        return any(f"(os error {code})" in text or os.strerror(code) in text for code in _FULL)
    return False


def raise_if_out_of_space(err: BaseException, what: Path, needed_bytes: int = 0, cleaned: Optional[Path] = None,
                          partial_removed: bool = False) -> None:
    """Inside an `except` that has removed this write's partial files: raise OutOfSpaceError (naming
    `what`, the space it needs and `cleaned`, the partial copy removed) if `err` is a full disk, else
    return so that the caller re-raises `err`. `partial_removed`: the failed file is already gone (the
    workbench's helpers and safetensors remove their own), so the write needed more than is free now."""
    if not is_out_of_space(err):
        return
    gone = partial_removed or not isinstance(err, OSError)  # a SafetensorError or an inner OutOfSpaceError
    at_least = _free_bytes(what) + 1 if gone else 0
    raise _space_error(what, max(needed_bytes, at_least), cleaned) from err


def _free_bytes(what: Path) -> int:
    here = next(p for p in (Path(what).absolute(), *Path(what).absolute().parents) if p.exists())
    return shutil.disk_usage(here).free


def folder_bytes(folder: Path) -> int:
    """The size of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first: what `mkdir(parents=True)`
    will create, and `remove_if_empty` takes back after a failed write."""
    folder = Path(folder).absolute()
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove these folders, deepest first, stopping at the first that holds anything."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # not empty: it holds something this write did not make
            return


@contextmanager
def staged_files(folder: Path, needed_bytes: int = 0) -> Iterator[Callable[[str], Path]]:
    """Write several files of `folder` all or none: inside the block, `stage(name)` gives the temporary
    path to write `folder/name` to; when the block ends they are renamed into place in that order. The
    last one is the file that says the folder is complete (config.json): an old copy of it is removed
    before the renames, so a crash between them leaves a folder that reads as incomplete, never one that
    mixes old and new files. If the block fails, every temporary file (and a folder this made) is
    removed and a full disk becomes an OutOfSpaceError (`needed_bytes`: the files' estimated size)."""
    folder = Path(folder)
    created = missing_folders(folder)
    staged: dict[str, Path] = {}

    def stage(name: str) -> Path:
        staged[name] = folder / f".{name}.tmp{os.getpid()}"
        return staged[name]

    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield stage
    except BaseException as err:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        remove_if_empty(created)
        raise_if_out_of_space(err, folder, needed_bytes, partial_removed=True)
        raise
    if len(staged) > 1:
        (folder / list(staged)[-1]).unlink(missing_ok=True)
    for name, tmp in staged.items():
        if tmp.exists():
            open_modes(tmp)
        os.replace(tmp, folder / name)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it, and
    setting it for a moment would race with any thread that creates a file meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_modes(path: Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the mode a plain open() or mkdir() would:
    0666 / 0777 less the umask. safetensors writes its files 0600 and tempfile makes 0700 folders, which
    would leave weights unreadable to whoever can read the JSON beside them."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        for p in (path, *path.rglob("*")):
            if not p.is_symlink():
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync `path` (not atomic: for a temporary name that is renamed into place later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _space_error(what: Path, needed: int, cleaned: Optional[Path]) -> OutOfSpaceError:
    free = _free_bytes(what)
    left = f" The partial copy {cleaned} was removed." if cleaned is not None else ""
    return OutOfSpaceError(f"The disk filled while writing {what}: it needs about {needed / 1e6:,.1f} MB and "
                           f"{free / 1e6:,.1f} MB are free.{left} Free some space (or choose a folder on another "
                           "disk) and run the command again.")
