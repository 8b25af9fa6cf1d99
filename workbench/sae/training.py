"""Training sparse autoencoders: the recipe of Anthropic's April 2024 update and OpenAI's TopK paper.

- Activations are scaled so that E‖x‖ = √d_in (estimated on the first batches); the scale is
  folded back into the weights when the SAE is saved, so the saved SAE reads raw activations.
- Tied initialisation (W_enc = W_decᵀ), decoder rows of norm 0.1 (relu, jumprelu) or 1 (topk).
- b_dec starts at the geometric median (or mean) of the first batch.
- Adam; learning rate warmup, then constant, then linear decay to 0 over the last 20%; the
  sparsity coefficient warms up linearly; gradient-norm clipping.
- Dead latents: tokens since each last fired; those past `dead_window` feed the AuxK loss.
- A progress bar with L0, FVU and tokens/s; a JSONL log; log-spaced checkpoints; `resume`.
- NaN or inf in a batch, the loss or the gradient stops training before the step is taken, and the
  error names the last good checkpoint.
- Ctrl-C is handled between steps (`workbench.train.lifecycle.StopRequest`), state is safetensors plus JSON
  (never pickle), and a run folder is locked while a process writes it.

Several SAEs train in lockstep from one source, so one forward pass of the model feeds them all.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm

from workbench.artifacts import (
    CHECKPOINTS_DIR,
    LOG_FILE,
    SAE_CFG_FILE,
    SAE_WEIGHTS_FILE,
    append_log,
    list_checkpoints,
    run_lock,
)
from workbench.cache.activations import Batch, model_activations
from workbench.errors import ConfigError, InputError, TrainingDiverged
from workbench.sae.modules import SAE, make_sae
from workbench.sae.trainer import SAETrainConfig, _device, _Trainer
from workbench.train.distributed import Dist
from workbench.train.lifecycle import StopRequest, TrainingInterrupted, refuse_foreign

__all__ = ["SAETrainConfig", "TrainingDiverged", "hook_widths", "train_configs", "train_sae", "train_saes"]
RUN_FILES = {LOG_FILE, CHECKPOINTS_DIR, SAE_CFG_FILE, SAE_WEIGHTS_FILE}
"""What an SAE run writes at the top of its folder."""


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the dictionary's device; from the CPU to a GPU through pinned memory, without blocking."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _out_for(out: Optional[Path], name: str, many: bool) -> Optional[Path]:
    if out is None:
        return None
    return out / name.replace("/", "_") if many else out


def _check_fresh(t: _Trainer, hint: str) -> None:
    if t.out is None or not t.out.exists():
        return
    if (t.out / SAE_CFG_FILE).exists():
        raise InputError(f"{t.out} already holds a trained SAE; nothing was overwritten. Choose another --out.")
    if list_checkpoints(t.out) or (t.out / LOG_FILE).exists():
        raise InputError(f"{t.out} holds an unfinished SAE run; continue it with {hint}, or choose another --out.")
    refuse_foreign(t.out, RUN_FILES, "SAE run")


def _resume_all(trainers: list[_Trainer]) -> list[_Trainer]:
    """Resume every unfinished trainer from the newest step all of them saved (a kill can land between
    two SAEs' checkpoints); trainers whose SAE was already saved get its weights and sit out.
    Returns the trainers that still train."""
    from workbench.sae.files import load_sae

    todo = []
    for t in trainers:
        if t.out is not None and (t.out / SAE_CFG_FILE).exists():
            own_load = getattr(type(t.sae), "load", None)  # dictionaries with their own file layout
            done = own_load(t.out) if own_load is not None else load_sae(t.out)
            t.sae.load_state_dict(done.to(_device(t.sae)).state_dict())
            print(f"SAE {t.name} is already finished in {t.out}; it is not trained again.")
        else:
            todo.append(t)
    if not todo:
        raise InputError(f"--resume: every SAE in {trainers[0].out} is already finished; nothing to resume. Train "
                         "into a new --out to go further.")
    common = set.intersection(*(t.checkpoint_steps() for t in todo))
    if not common:
        for t in todo:
            if t.writes:
                (t.out / LOG_FILE).unlink(missing_ok=True)  # the log of a run that never reached a checkpoint
        print(f"Nothing to resume in {todo[0].out} yet (no checkpoint was written); starting from step 0.")
        return todo
    for t in todo:
        t.resume(max(common))
    return todo


def train_saes(saes: dict[str, SAE], batches: Iterable[Batch], cfg: SAETrainConfig,
               out: Optional[Union[str, Path]] = None, resume: bool = False, progress: bool = True,
               resume_command: Optional[str] = None, dist: Optional[Dist] = None, spread: bool = False,
               on_log: Optional[Callable[[str, dict[str, Any]], None]] = None,
               data: Optional[dict[str, Any]] = None) -> dict[str, list[dict[str, Any]]]:
    """Train each SAE on `batch[its hook_name]` (or `batch[name]` when it has none) of every batch from
    `batches`; returns each one's log. Several SAEs on the same or different hooks share each batch,
    so one forward pass of the model feeds them all.

    With `out`, each SAE's folder (out itself for one SAE, out/<name> for several) gets log.jsonl,
    checkpoints/ and finally cfg.json + sae_weights.safetensors (normalisation folded in). Nothing
    there is overwritten: a finished SAE, an unfinished run or someone else's files are an error.
    `resume` continues the unfinished run from its newest checkpoint, or starts it if it has none;
    its config must equal the one the run started with. Each folder is locked while training.

    Data parallel (`dist` from `workbench.train.distributed.init_from_env`, under torchrun): `cfg.batch_size`
    is the whole batch; each rank's `batches` give its share, batch_size / world rows, its own
    activations. Gradients are averaged over the ranks, and every statistic that decides what
    training does is taken over the whole batch: the normalisation scale, b_dec's starting point,
    which latents fired (dead latents, AuxK), AuxK's residual variance and BatchTopK's threshold. So
    2 ranks with half the batch each train what 1 process does with the whole batch (the shares
    concatenated in rank order). Rank 0 writes the log, checkpoints and the SAE; every rank resumes
    from them.

    `spread` (with several SAEs, under torchrun) deals the SAEs out instead, as sparsify's
    `distribute_modules` does: rank r trains SAEs r, r + world, ... (in the order of `saes`) on whole
    batches of its own, alone, and writes their folders; each trains exactly as it would alone.
    Returns the logs of this rank's SAEs.

    `on_log(name, record)` is called with every log record on rank 0 (`wandb_logger` sends them to
    Weights & Biases).

    `data` describes where `batches` come from (the command line's text, rows, seq_len...): it is saved
    with every checkpoint, and `resume` with different data is a ConfigError naming each setting."""
    out = Path(out) if out is not None else None
    dist = dist or Dist()
    many = len(saes) > 1
    if spread and dist.active:
        names = list(saes)[dist.rank::dist.world]
        if not names:
            raise InputError(f"{len(saes)} SAE(s) spread over {dist.world} processes leaves rank {dist.rank} without "
                             "one; use at most as many processes as SAEs.")
        saes, dist = {n: saes[n] for n in names}, Dist()
    if cfg.batch_size % dist.world:
        raise InputError(f"batch_size {cfg.batch_size} does not split evenly over {dist.world} processes; choose a "
                         "multiple of the number of processes.")
    trainers = [_Trainer(name, sae, cfg, _out_for(out, name, many), dist, data) for name, sae in saes.items()]
    hint = f"`{resume_command}`" if resume_command else "resume=True"
    if not resume and dist.is_main:
        for t in trainers:
            _check_fresh(t, hint)
    with contextlib.ExitStack() as locks:
        for t in trainers:
            if t.writes:
                locks.enter_context(run_lock(t.out, "SAE training run"))
        if not resume and dist.is_main:
            for t in trainers:
                _check_fresh(t, hint)  # again under the lock: another process may have started in between
        dist.barrier()
        active = _resume_all(trainers) if resume and out is not None else trainers
        dist.barrier()  # nobody writes a checkpoint before every rank has read the one it resumes from
        return _train_loop(trainers, active, batches, cfg, progress, hint, on_log)


class _StopWaiting(BaseException):
    """A stop request that arrived while the loop waited for a batch (see `_waiting_for_data`); a
    BaseException, so that no `except Exception` inside a data source swallows it."""


@contextlib.contextmanager
def _waiting_for_data(dist: Dist) -> Iterator[None]:
    """While the loop waits for the next batch no step has begun, so a stop request (Ctrl-C, SIGTERM) may
    end the wait at once. Elsewhere the first signal only sets StopRequest's flag, which the loop checks
    between steps; a source that never yields never got there, so the first signal was ignored. One
    process only: under torchrun every rank must stop at the same step, which the check between steps
    guarantees."""
    if dist.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    flagging = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}  # StopRequest's own handlers

    def stop_waiting(signum: int, frame: Any) -> None:
        handler = flagging[signum]
        if callable(handler):
            handler(signum, frame)  # sets the flag (a second signal: KeyboardInterrupt, as everywhere)
        raise _StopWaiting

    for s in flagging:
        signal.signal(s, stop_waiting)
    try:
        yield
    finally:
        for s, handler in flagging.items():
            signal.signal(s, handler)


def _train_loop(trainers: list[_Trainer], active: list[_Trainer], batches: Iterable[Batch], cfg: SAETrainConfig,
                progress: bool, hint: str, on_log: Optional[Callable[[str, dict[str, Any]], None]] = None
                ) -> dict[str, list[dict[str, Any]]]:
    start = active[0].step
    logs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in trainers}
    it: Iterator[Batch] = iter(batches)
    for _ in range(start):  # keep the data stream aligned with the resumed steps
        next(it)
    ckpt_steps = cfg.checkpoint_steps()
    saved_at = start if start else -1
    dist = active[0].dist
    share = cfg.batch_size // dist.world
    what = "transcoders" if any(t.sae.cfg.is_transcoder for t in active) else "SAE" if len(active) == 1 else "SAEs"
    bar = tqdm(total=cfg.n_steps, initial=start, desc=what + (f" ({dist.world} processes)" if dist.active else ""),
               unit="step", disable=not (progress and dist.is_main) or None)
    t0, tokens0 = time.perf_counter(), 0
    step = start
    try:
        with StopRequest("SAE training") as stop:
            while step < cfg.n_steps:
                if dist.any_(stop.requested):
                    saved = [t._checkpoint() for t in active] if saved_at != step else [None]
                    bar.close()
                    folder = saved[0] or (active[0].out and dict(list_checkpoints(active[0].out)).get(step))
                    raise TrainingInterrupted(step, folder, hint)
                try:
                    with _waiting_for_data(dist):
                        batch = next(it)
                except _StopWaiting:
                    continue  # the stop is requested: the check above saves a checkpoint at this step
                except StopIteration:
                    raise InputError(f"The activation source ran out after {step} of {cfg.n_steps} steps; use a "
                                     "looping source or fewer n_tokens.") from None
                losses = {}
                for t in active:
                    for key in {t.key, t.target_key}:
                        if key not in batch:
                            raise InputError(f"The activation source gives {sorted(batch)}, not {key!r}, which "
                                             f"{t.name!r} reads.")
                        if len(batch[key]) != share:
                            raise InputError(f"Batches of {len(batch[key])} rows, but batch_size {cfg.batch_size} over "
                                             f"{dist.world} process(es) needs {share} per process.")
                    device = _device(t.sae)
                    losses[t.name] = t.train_step(_to(batch[t.key], device), _to(batch[t.target_key], device)
                                                  if t.target_key != t.key else None)
                step += 1
                bar.update(1)
                tokens0 += cfg.batch_size
                if step % cfg.log_every == 0 or step == cfg.n_steps:
                    rate = tokens0 / max(time.perf_counter() - t0, 1e-9)
                    for t in active:
                        record = t.log_record(losses[t.name], rate)
                        logs[t.name].append(record)
                        if t.writes:
                            append_log(t.out / LOG_FILE, record)
                        if on_log is not None and dist.is_main:
                            on_log(t.name, record)
                    first = logs[active[0].name][-1]
                    bar.set_postfix(L0=f"{first['l0']:.1f}", FVU=f"{first['fvu']:.3f}", tok_s=f"{rate:,.0f}")
                if step in ckpt_steps:
                    for t in active:
                        t._checkpoint()
                    dist.barrier()  # every rank is past this step only once its checkpoint is on disk
                    saved_at = step
    except KeyboardInterrupt:  # a second Ctrl-C: quit now; the newest checkpoint on disk is consistent
        bar.close()
        found = list_checkpoints(active[0].out) if active[0].out is not None else []
        raise TrainingInterrupted(found[-1][0] if found else 0, found[-1][1] if found else None, hint,
                                  saved=False) from None
    bar.close()
    for t in active:
        path = t.finish()
        if path is not None:
            what = "transcoder" if t.sae.cfg.is_transcoder else "SAE"
            print(f"Wrote {what} {t.name} ({t.sae.cfg.arch}, d_sae {t.sae.d_sae}) to {path}")
    return logs


# -- several SAEs, one per hook (as `workbench sae train` sets them up) --------------------------------
def hook_widths(hooks: Sequence[str], model: Any = None, store: Any = None) -> dict[str, int]:
    """Each hook's activation width: from the activation `store` (which must hold every hook), else from
    one forward pass of `model` over two tokens."""
    missing = [h for h in hooks if store is not None and h not in store.d]
    if missing:
        raise InputError(f"The store {store.folder} holds {store.hooks}, not {missing[0]!r}.")
    if store is not None:
        return {h: int(store.d[h]) for h in hooks}
    probe = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    acts = model_activations(model, probe, list(hooks), 0)
    return {h: int(acts[h].shape[-1]) for h in hooks}


def train_configs(widths: dict[str, int], base: Optional[dict[str, Any]] = None,
                  sae: Optional[dict[str, Any]] = None, train: Optional[dict[str, Any]] = None,
                  d_sae: Optional[int] = None, expansion: int = 8, model_name: Optional[str] = None,
                  where: str = "the command line") -> dict[str, SAETrainConfig]:
    """One SAETrainConfig for each hook of `widths` (in its order): `base` (a config file's JSON, with
    its `sae` section) with the `sae` and `train` settings that are not None laid over it. Each SAE
    reads its hook, with d_in its width and d_sae `d_sae`, else the file's, else `expansion` × d_in.
    `where` names the settings' source in errors."""
    base = base or {}
    section = base.get("sae", {})
    if not isinstance(section, dict):
        raise ConfigError(f"The 'sae' section of {where} must be a JSON object, got {section!r:.60}.")
    section = {**section, **{k: v for k, v in (sae or {}).items() if v is not None}}
    overrides = {k: v for k, v in (train or {}).items() if v is not None}
    configs = {}
    for hook, width in widths.items():
        d_in = int(width)
        cfg = {**base, "sae": {**section, "d_in": d_in, "hook_name": hook,
                               "d_sae": d_sae or section.get("d_sae") or expansion * d_in,
                               "model_name": str(model_name or section.get("model_name", ""))}}
        configs[hook] = SAETrainConfig.from_dict({**cfg, **overrides}, where)
    return configs


def wandb_logger(project: str, config: dict[str, Any]) -> Callable[[str, dict[str, Any]], None]:
    """An `on_log` that sends each record to Weights & Biases (`pip install wandb`; offline runs with
    WANDB_MODE=offline), each dictionary's metrics under its own name."""
    try:
        import wandb
    except ImportError:
        raise InputError("--wandb needs the wandb package: pip install wandb (or leave --wandb out; every metric "
                         "is in log.jsonl anyway).") from None
    try:
        run = wandb.init(project=project, config=config)
    except Exception as err:  # wandb's own types vary by version: UsageError, AuthenticationError, CommError...
        raise InputError(f"--wandb: Weights & Biases could not start a run ({type(err).__name__}: {err}). Run "
                         "`wandb login` (or set WANDB_API_KEY, or WANDB_MODE=offline to log locally), or drop "
                         "--wandb: every metric is in log.jsonl anyway.") from err

    def log(name: str, record: dict[str, Any]) -> None:
        run.log({f"{name}/{k}": v for k, v in record.items() if k != "step"}, step=int(record["step"]))
    return log


def train_sae(cfg: SAETrainConfig, batches: Iterable[Batch], name: str = "x", out: Optional[Union[str, Path]] = None,
              device: Union[str, torch.device] = "cpu", resume: bool = False, progress: bool = True,
              resume_command: Optional[str] = None, dist: Optional[Dist] = None) -> tuple[SAE, list[dict[str, Any]]]:
    """Build the SAE of `cfg.sae`, train it on `batch[cfg.sae.hook_name or name]`, return (sae, log)."""
    sae = make_sae(cfg.sae, seed=cfg.seed).to(device)
    logs = train_saes({name: sae}, batches, cfg, out, resume, progress, resume_command, dist)
    return sae, logs[name]
