"""The workbench's exceptions. Each message says what was wrong and what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class WorkbenchError(Exception):
    """Base class: a problem with the user's input, files or environment (not a bug)."""


class ConfigError(WorkbenchError, ValueError):
    """A config field holds a value that makes no sense."""


class HookNameError(WorkbenchError, KeyError):
    """A hook name that the model does not have."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class InputError(WorkbenchError, ValueError):
    """Tokens or tensors that do not fit the model."""


class CheckpointError(WorkbenchError):
    """A model folder or checkpoint that is missing, truncated or corrupt."""


class OfflineError(WorkbenchError):
    """Something was asked of a hub (Hugging Face) while this machine is offline."""


class OutOfSpaceError(WorkbenchError):
    """The disk filled during a write; the partial output was removed."""


class RunLockedError(WorkbenchError):
    """Another process is writing the same run folder."""


class TrainingDiverged(WorkbenchError):
    """The loss, a gradient or the activations became NaN or inf; the last good checkpoint is kept."""


def check_field(ok: bool, owner: str, field: str, value: object, expected: str) -> None:
    """Raise a ConfigError naming `owner.field` unless `ok`."""
    if not ok:
        raise ConfigError(f"{owner}.{field} must be {expected}, got {value!r}.")


def unknown_name_message(kind: str, name: str, known: Iterable[str], n: int = 5,
                         listed_by: str = "") -> str:
    """'Unknown <kind> <name>. Did you mean: ...?' with the closest known names, and where the full
    list is (`listed_by`, e.g. '`workbench list`')."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if not close:  # fall back to names sharing the last component, e.g. 'hook_pattern'
        tail = name.rsplit(".", 1)[-1]
        close = [k for k in known if k.endswith(tail)][:n]
    if close:
        hint = f" Did you mean: {', '.join(close)}?"
    elif len(known) <= 12:
        hint = f" Valid names: {', '.join(sorted(known))}."
    else:
        hint = ""
    where = f"; {listed_by} lists them" if listed_by else ""
    return f"Unknown {kind} {name!r}.{hint} ({len(known)} valid names{where}.)"
