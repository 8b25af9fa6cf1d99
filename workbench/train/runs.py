"""What both trainers (language models and SAEs) share about a run in progress: Ctrl-C handled between
steps, the checks that keep a run folder from being mixed up with anything else, and the error a
stopped run raises.

Why Ctrl-C only sets a flag: an exception raised inside a step can land after `optimizer.step()`
and before the step counter moves, and the checkpoint saved then pairs new weights with the old
step number. The loop checks the flag between steps, where the state is always consistent, so a
resumed run is bit-identical to an uninterrupted one wherever the signal lands. A second Ctrl-C
quits at once without saving (the last checkpoint on disk is intact).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from workbench.artifacts import LOCK_FILE
from workbench.errors import ConfigError, InputError, WorkbenchError


class TrainingInterrupted(WorkbenchError):
    """Training stopped on Ctrl-C (or SIGTERM); `folder` is the checkpoint to resume from (None if none)."""

    def __init__(self, step: int, folder: Optional[Path], resume_hint: str, saved: bool = True):
        where = f"checkpoint saved to {folder}" if saved else f"quit without saving; the last checkpoint is {folder}"
        if folder is None:
            where = "no checkpoint was written yet"
        super().__init__(f"Training interrupted at step {step}; {where}. Continue with {resume_hint}.")
        self.step, self.folder, self.saved = step, folder, saved


class StopRequest:
    """A context manager that turns SIGINT and SIGTERM into a flag (`requested`) for the loop to check
    between steps. The second signal raises KeyboardInterrupt at once. Outside the main thread
    (where Python cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, what: str = "training"):
        self.what, self.requested = what, False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nStopping {self.what} after this step to save a checkpoint (press Ctrl-C again to quit "
              "without saving).", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def foreign_entries(folder: Path, own: set[str]) -> list[str]:
    """Entries of `folder` that a workbench run does not write (`own` names those it does)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in own | {LOCK_FILE})


def refuse_foreign(folder: Path, own: set[str], what: str) -> None:
    """An InputError if `folder` holds anything a workbench run would not have written there."""
    foreign = foreign_entries(folder, own)
    if foreign:
        raise InputError(f"{folder} holds files that are not from a workbench {what} "
                         f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}). Nothing was changed; "
                         "choose a new or empty folder for --out.")


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config dicts (`old` from disk)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += config_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [f"{prefix[:-1]} ({old!r} → {new!r})"]


def refuse_changed_config(saved: Any, current: dict[str, Any], folder: Path) -> None:
    """A ConfigError naming each differing field if a resumed run's config is not the one it started with."""
    diff = config_diff(saved, current)
    if diff:
        raise ConfigError(f"--resume: the config differs from the one {folder} was started with: {'; '.join(diff)}. "
                          "Resume with the same settings, or start a new run in another folder.")
