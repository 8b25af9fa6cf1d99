"""The life of a training run, from an empty folder to a finished model: what the language-model and
modular-arithmetic trainers share (`Run`), and what every trainer, the SAE's too, shares about a run
folder (Ctrl-C between steps, the checks that keep a run folder from being mixed up with anything
else, the error a stopped run raises).

    hint = resume_hint(resume_command, "train", run_dir)
    with claim_folder(run_dir, resume, hint, dist):           # fresh-folder checks, then the lock
        mode, resume_from = start_point(run_dir, cfg, resume, name, dist)  # 'start', 'continue' or 'finish'
        run = MyRun(run_dir, name, hint, model, make_optimizer(model, cfg), dist=dist)
        run.restore(resume_from)                              # weights, optimizer state, step, log
        run.train_loop(cfg.n_steps)                           # the trainer's at_step() and take_step()
        check_final_weights(run_dir, name, model, "lr")       # NaN or inf: nothing is saved
        save_final(run_dir, model, meta, drop_states=True)    # the model at the top; no state left

A run folder holds `log.jsonl`, atomic checkpoint folders (safetensors + JSON, the newest with the
optimizer state) and, once finished, the final model at its top. A checkpoint is written only when
the weights pass the trainer's check (`Run.weights_problem`); a non-finite loss or gradient stops
training before the optimizer step, naming the last good checkpoint.

Why Ctrl-C only sets a flag: an exception raised inside a step can land after `optimizer.step()`
and before the step counter moves, and the checkpoint saved then pairs new weights with the old
step number. The loop checks the flag between steps, where the state is always consistent, so a
resumed run is bit-identical to an uninterrupted one wherever the signal lands. A second Ctrl-C
quits at once without saving (the last checkpoint on disk is intact).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch

from workbench.artifacts import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LEGACY_STATE_FILE,
    LOCK_FILE,
    LOG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    has_state,
    list_checkpoints,
    read_config,
    read_state,
    read_weights,
    remove_state,
    run_lock,
    truncate_log,
    write_checkpoint,
    write_state,
)
from workbench.errors import CheckpointError, ConfigError, InputError, TrainingDiverged, WorkbenchError
from workbench.model.loading import save_model
from workbench.train.distributed import Dist
from workbench.train.optim import finite_weights


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


# -- the run folder ------------------------------------------------------------------------------------
RUN_FILES = {LOG_FILE, CHECKPOINTS_DIR, CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE}
"""What a model-training run writes at the top of its folder."""


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


def resume_hint(resume_command: Optional[str], function: str, run_dir: Path) -> str:
    """How the messages tell a user to resume: the exact command they typed, or the Python call."""
    return f"`{resume_command}`" if resume_command else f"{function}(..., out={str(run_dir)!r}, resume=True)"


def check_fresh_folder(run_dir: Path, resume_hint: str) -> None:
    """A new run goes into a new or empty folder; anything else is refused, saying what is there."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise InputError(f"--out {run_dir} is a file, not a folder; choose a folder name.")
    found = list_checkpoints(run_dir)
    if found or (run_dir / LOG_FILE).exists():
        last = f" (last checkpoint: step {found[-1][0]})" if found else ""
        raise InputError(f"{run_dir} already holds a training run{last}. Continue it with {resume_hint}, or choose "
                         "another --out; nothing was overwritten.")
    if (run_dir / CONFIG_FILE).exists() or (run_dir / WEIGHTS_FILE).exists():
        raise InputError(f"{run_dir} already holds a model ({CONFIG_FILE}/{WEIGHTS_FILE}) that is not an unfinished "
                         "run. Nothing was overwritten; choose another --out.")
    refuse_foreign(run_dir, RUN_FILES, "training run")


@contextlib.contextmanager
def claim_folder(run_dir: Path, resume: bool, hint: str, dist: Optional[Dist] = None) -> Iterator[None]:
    """The run folder, locked for this run (by rank 0; the other ranks wait at a barrier). A new run
    checks that the folder is fresh before taking the lock, and again once it holds it: another process
    may have started there in between."""
    dist = dist or Dist()
    if not resume and dist.is_main:
        check_fresh_folder(run_dir, hint)
    with run_lock(run_dir, "training run") if dist.is_main else contextlib.nullcontext():
        if not resume and dist.is_main:
            check_fresh_folder(run_dir, hint)
        dist.barrier()
        yield


def resume_point(run_dir: Path, cfg: Any) -> tuple[str, Optional[Path]]:
    """Where a resumed run picks up (`cfg`: a config with `to_dict()` and `n_steps`). ('start', None):
    nothing to resume yet; ('finish', ckpt): only the final save is missing; ('continue', ckpt): the
    newest checkpoint with optimizer state. A config that differs from the saved one is refused."""
    found = list_checkpoints(run_dir)
    if not found:
        return "start", None
    saved = read_config(found[-1][1]).get("train")
    if isinstance(saved, dict):  # compiling or not is how a run executes, not which run it is
        saved = {k: v for k, v in saved.items() if k != "compile"}
    refuse_changed_config(saved, {k: v for k, v in cfg.to_dict().items() if k != "compile"}, run_dir)
    last_step, last = found[-1]
    if last_step >= cfg.n_steps:
        done = (run_dir / CONFIG_FILE).exists() and (run_dir / WEIGHTS_FILE).exists()
        if done and read_config(run_dir).get("step") == cfg.n_steps:
            raise InputError(f"--resume: the run in {run_dir} is already complete ({cfg.n_steps} steps). Train a "
                             "longer config into a new folder to go further.")
        return "finish", last
    for _, folder in reversed(found):
        if has_state(folder) or (folder / LEGACY_STATE_FILE).exists():  # read_state refuses a legacy pickle
            return "continue", folder
    raise CheckpointError(f"--resume: no checkpoint under {run_dir / CHECKPOINTS_DIR} has optimizer state (it was "
                          f"removed), so the run cannot continue exactly. Its weights are intact (e.g. {last}); to "
                          "train further, start a new run with another --out.")


def start_point(run_dir: Path, cfg: Any, resume: bool, name: str,
                dist: Optional[Dist] = None) -> tuple[str, Optional[Path]]:
    """`resume_point` when resuming, else ('start', None). Every rank has found its checkpoint before
    rank 0 writes another."""
    dist = dist or Dist()
    mode, resume_from = resume_point(run_dir, cfg) if resume else ("start", None)
    dist.barrier()
    if resume and mode == "start" and dist.is_main:
        print(f"Nothing to resume in {run_dir} yet; starting {name} from step 0.")
    return mode, resume_from


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """The weights of the checkpoint (or model) folder into `model`."""
    model.load_state_dict(read_weights(folder, read_config(folder)))


def load_for_finish(model: torch.nn.Module, run_dir: Path, folder: Path, n_steps: int, main: bool = True) -> None:
    """A run killed after its last checkpoint and before the final save: that checkpoint's weights,
    for the final save that is all that is left to do."""
    load_weights(model, folder)
    if main:
        print(f"The run in {run_dir} reached step {n_steps}; writing its final model from {folder}.")


def check_final_weights(run_dir: Path, name: str, model: torch.nn.Module, lr_name: str) -> None:
    """A TrainingDiverged if the final weights are NaN or inf (nothing is saved then)."""
    if not finite_weights(model):
        raise TrainingDiverged(f"The final weights of {name} are NaN or inf; nothing was saved at the top of "
                               f"{run_dir}. Lower {lr_name} and train into a new --out.")


def save_final(run_dir: Path, model: torch.nn.Module, meta: dict[str, Any], drop_states: bool) -> None:
    """The final model at the top of the run folder (its weights checked by `check_final_weights`); then
    the checkpoints' optimizer state goes if `drop_states` (a finished run has nothing to resume)."""
    save_model(model, run_dir, meta)
    if drop_states:
        for _, folder in list_checkpoints(run_dir):
            remove_state(folder)


# -- a run in progress -----------------------------------------------------------------------------------
class Run:
    """A run in progress: its folder, model, optimizer and step, the newest checkpoint on disk, and the
    loop every trainer runs (`train_loop`). A trainer subclasses it with what happens at a step
    (`at_step`: evaluations, logs, checkpoints due there) and one optimizer step (`take_step`), and says
    what a checkpoint's config.json holds (`checkpoint_meta`) and how to tell blown-up weights
    (`weights_problem`).

    Under torchrun every rank runs the loop; rank 0 alone writes the log and checkpoints, and the
    others wait for it at barriers."""

    def __init__(self, run_dir: Path, name: str, hint: str, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, *, dist: Optional[Dist] = None, keep_all_states: bool = False):
        self.run_dir, self.name, self.hint = run_dir, name, hint
        self.model, self.optimizer = model, optimizer
        self.dist = dist or Dist()
        self.keep_all_states = keep_all_states
        """Keep the optimizer state in every checkpoint (else only in the newest: all that resume needs)."""
        self.step = 0
        self.saved_at = -1
        """The step of the newest checkpoint on disk (-1: none yet)."""
        self.last_good: Optional[Path] = None
        """The newest checkpoint on disk whose weights passed the check (None: none yet)."""
        self.bar: Any = None
        """The trainer's progress bar (tqdm), closed when the loop ends or stops."""

    # -- what a trainer says ---------------------------------------------------------------------------
    def at_step(self) -> None:
        """What is due at `self.step` before the next optimizer step: evaluations, logs, a checkpoint."""
        raise NotImplementedError

    def take_step(self) -> None:
        """One optimizer step; `self.step` moves on by one."""
        raise NotImplementedError

    def checkpoint_meta(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The config.json of a checkpoint at `self.step`, with `extra` (evaluations, 'interrupted')."""
        raise NotImplementedError

    def weights_problem(self) -> Optional[str]:
        """Why the weights may not be kept as a good checkpoint, or None."""
        return None if finite_weights(self.model) else "the weights became NaN or inf"

    def diverged_context(self) -> str:
        """What the divergence error adds after the step number (e.g. the learning rate there)."""
        return ""

    def diverged_advice(self) -> str:
        """What the divergence error tells the user to change."""
        raise NotImplementedError

    # -- the lifecycle -----------------------------------------------------------------------------------
    def restore(self, resume_from: Optional[Path]) -> None:
        """Continue from the checkpoint `resume_from` (weights, optimizer state, step; the log cut back
        to that step), or start afresh (no log) when it is None."""
        main = self.dist.is_main
        if resume_from is not None:
            load_weights(self.model, resume_from)
            state = read_state(resume_from)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            if main:
                truncate_log(self.run_dir / LOG_FILE, self.step)
                print(f"Resuming {self.name} from step {self.step} ({resume_from})")
            self.saved_at, self.last_good = self.step, resume_from
        elif main:
            (self.run_dir / LOG_FILE).unlink(missing_ok=True)
        self.dist.barrier()

    def train_loop(self, n_steps: int) -> None:
        """Step until `n_steps`: at each step what is due there (`at_step`), then a stop if one was asked
        for (on any rank), then one optimizer step (`take_step`)."""
        try:
            with StopRequest(f"training {self.name}") as stop:
                while True:
                    self.at_step()
                    if self.step >= n_steps:
                        break
                    if self.dist.any_(stop.requested):
                        self.stop()
                    self.take_step()
        except KeyboardInterrupt:  # a second Ctrl-C: quit now; the newest checkpoint on disk is consistent
            self.close_bar()
            raise TrainingInterrupted(self.saved_at, self.last_good, self.hint, saved=False) from None
        self.close_bar()

    def check_weights(self) -> None:
        """A TrainingDiverged if the weights may not be kept as a good checkpoint."""
        problem = self.weights_problem()
        if problem:
            raise self.diverged(problem)

    def save(self, extra: dict[str, Any]) -> Path:
        """A checkpoint with optimizer state at `self.step` (older ones lose theirs unless keep_all_states)."""
        meta = self.checkpoint_meta(extra)

        def write(folder: Path) -> None:
            save_model(self.model, folder, meta)
            write_state(folder, {"optimizer": self.optimizer.state_dict(), "step": self.step})

        size = 3 * sum(p.numel() * p.element_size() for p in self.model.parameters())  # weights + Adam moments
        folder = write_checkpoint(self.run_dir, self.step, write, needed_bytes=size)
        if not self.keep_all_states:
            for step, old in list_checkpoints(self.run_dir):
                if step != self.step:
                    remove_state(old)
        return folder

    def stop(self) -> NoReturn:
        """Ctrl-C was pressed: a checkpoint at this step (unless there is one), then TrainingInterrupted."""
        if self.saved_at != self.step:
            self.check_weights()
            if self.dist.is_main:
                self.last_good = self.save({"interrupted": True})
            self.dist.barrier()
        self.close_bar()
        raise TrainingInterrupted(self.step, self.last_good, self.hint)

    def diverged(self, what: str) -> TrainingDiverged:
        """The error that stops a run whose loss, gradient or weights went bad (`what`), naming the last
        good checkpoint."""
        self.close_bar()
        where = (f"{self.last_good} (step {self.saved_at})" if self.last_good is not None
                 else "none (no checkpoint was written)")
        return TrainingDiverged(f"Training stopped: {what} at step {self.step}{self.diverged_context()}. The weights "
                                f"were not saved past that point; the last good checkpoint is {where}. "
                                f"{self.diverged_advice()}, and train into a new --out.")

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
