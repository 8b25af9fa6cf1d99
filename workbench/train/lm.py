"""Training: AdamW with warmup and cosine decay, gradient clipping, validation loss, log-spaced
checkpoints, a JSONL log, Ctrl-C safety and bit-identical `--resume`.

Why resume is exact: the batch at step t is a pure function of (data seed, t), the learning rate
a pure function of t, and each checkpoint holds the model and the full optimizer state.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.artifacts import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LEGACY_STATE_FILE,
    LOG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    append_log,
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
from workbench.config import check_types, from_dict
from workbench.data.text import Batches, DataConfig, build_text_data, build_tokenizer
from workbench.data.tokenizer import TextCodec, load_tokenizer
from workbench.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    TrainingDiverged,
    check_field,
    unknown_name_message,
)
from workbench.model.loading import models_dir, resolve_device, save_model
from workbench.model.transformer import ModelConfig, Transformer
from workbench.train.distributed import Dist, init_from_env, restart_count, shutdown
from workbench.train.runs import StopRequest, TrainingInterrupted, refuse_changed_config, refuse_foreign


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the model, its data and the optimisation recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of the model to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the training tokens come from."""
    batch_size: int = 32
    """Sequences per step (each n_ctx tokens)."""
    n_steps: int = 2000
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
    weight_decay: float = 0.05
    """AdamW weight decay, applied to weight matrices only (not biases, LayerNorm or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    eval_every: int = 100
    """Validation loss every this many steps (and at every checkpoint)."""
    log_every: int = 10
    """Training loss in log.jsonl every this many steps."""
    n_checkpoints: int = 12
    """Log-spaced checkpoints, from step 0 to the last step."""
    checkpoint_every: int = 0
    """Also checkpoint every this many steps (0: log-spaced only). Dense checkpoints resolve late
    events such as the induction-head phase change, which log spacing skips over."""
    keep_optimizer_state: Literal["last", "all"] = "last"
    """Keep optimizer state in every checkpoint, or only the newest (all that --resume needs)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """'bf16': bfloat16 autocast for matmuls, fp32 master weights and optimizer."""
    compile: bool = False
    """torch.compile each transformer block for training (fuses element-wise work; it needs a C++
    compiler on CPU and takes a few seconds at the start; measured effect in benchmarks/train_speed.py)."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "TrainConfig"
        for name in ("batch_size", "n_steps", "eval_every", "log_every"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        check_field(self.lr > 0, own, "lr", self.lr, "positive")
        check_field(0 <= self.warmup_steps < self.n_steps, own, "warmup_steps", self.warmup_steps,
                    f"in [0, n_steps={self.n_steps})")
        check_field(0 <= self.min_lr_ratio <= 1, own, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check_field(self.weight_decay >= 0, own, "weight_decay", self.weight_decay, "≥ 0")
        check_field(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, own, "beta1/beta2",
                    (self.beta1, self.beta2), "in [0, 1)")
        check_field(self.grad_clip > 0, own, "grad_clip", self.grad_clip, "positive")
        check_field(isinstance(self.n_checkpoints, int) and self.n_checkpoints >= 2, own,
                    "n_checkpoints", self.n_checkpoints, "an integer ≥ 2 (the first and last step)")
        check_field(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0, own,
                    "checkpoint_every", self.checkpoint_every, "an integer ≥ 0 (0 turns it off)")
        check_field(self.keep_optimizer_state in ("last", "all"), own, "keep_optimizer_state",
                    self.keep_optimizer_state, "'last' or 'all'")
        check_field(self.precision in ("fp32", "bf16"), own, "precision", self.precision, "'fp32' or 'bf16'")
        check_field(self.model.d_vocab == self.data.d_vocab, own, "model.d_vocab", self.model.d_vocab,
                    f"{self.data.d_vocab} to match the {self.data.tokenizer!r} tokenizer (data.tokenizer)")

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step."""
        return self.batch_size * self.model.n_ctx

    @property
    def checkpoint_steps(self) -> list[int]:
        """Steps at which a checkpoint is written: log-spaced 0, 1, ..., n_steps, plus every
        `checkpoint_every` steps when that is set."""
        spaced = np.geomspace(1, self.n_steps, self.n_checkpoints - 1)
        regular = range(self.checkpoint_every, self.n_steps, self.checkpoint_every) if self.checkpoint_every else ()
        return sorted({0, *(int(round(s)) for s in spaced), *regular, self.n_steps})

    def lr_at(self, step: int) -> float:
        """Learning rate at `step`: linear warmup, then cosine decay to lr * min_lr_ratio."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.n_steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "TrainConfig":
        """Build from parsed JSON (e.g. a preset file named by `where`); a key that is not a field, a
        value of the wrong type or a section that is not an object is a ConfigError naming it."""
        return from_dict(cls, data, where)


def load_train_config(preset_or_path: Union[str, Path]) -> tuple[str, TrainConfig]:
    """(name, config) from a preset name in models/ or a path to a config JSON."""
    path = Path(preset_or_path)
    if not path.exists():
        path = models_dir() / f"{preset_or_path}.json"
    if not path.exists():
        from workbench.model.loading import preset_names

        raise InputError(unknown_name_message("preset or config file", str(preset_or_path), preset_names(),
                                              listed_by="`workbench list`"))
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if isinstance(raw, dict):
        raw.pop("description", None)
    return path.stem, TrainConfig.from_dict(raw, str(path))


@dataclass
class _Run:
    """Mutable state of a run in progress (kept out of the frozen config)."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    step: int = 0


def _make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim >= 2 and not name.startswith(("embed", "pos_embed"))

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return fused_adam(torch.optim.AdamW, groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def fused_adam(cls: type[torch.optim.Optimizer], params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """`cls` (Adam or AdamW) with its fused kernel where torch has one for the parameters' device (CPU
    and CUDA do), else its foreach form. Fused: one kernel for the whole update of each tensor
    instead of a dozen element-wise passes (its effect: benchmarks/train_speed.py).

    torch 2.13's fused CPU kernel walks a parameter, its gradient and its Adam state as if they were
    laid out alike; one laid out otherwise is updated at the wrong elements (measured: 0.39 off after
    two steps on a 3×5 weight given a transposed gradient). Autograd gives a gradient its parameter's
    layout, but Adam state read back from a checkpoint is contiguous, so for a parameter that is not
    (the SAE's W_enc was a transposed copy) resumed runs diverged from uninterrupted ones. So the
    fused form is used only when every parameter is contiguous."""
    params = list(params)
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    if all(p.is_contiguous() for p in tensors):
        try:
            return cls(params, fused=True, **kwargs)
        except RuntimeError:  # "`fused=True` requires all the params to be ... on a supported device"
            pass
    return cls(params, foreach=True, **kwargs)


@torch.no_grad()
def evaluate(model: Transformer, val: dict[str, torch.Tensor], precision: str = "fp32",
             chunk: int = 32) -> dict[str, float]:
    """Mean next-token loss on each validation set: {'val_loss_text': ..., 'val_loss_synthetic': ...}."""
    was_training = model.training
    model.eval()
    device = model.W_E.device
    out = {}
    for name, rows in val.items():
        losses = []
        for i in range(0, len(rows), chunk):
            with _autocast(precision, device):
                part = rows[i : i + chunk]
                losses.append(float(model(part.to(device), return_type="loss")) * len(part))
        out[f"val_loss_{name}"] = sum(losses) / len(rows)
    model.train(was_training)
    return out


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


RUN_FILES = {LOG_FILE, CHECKPOINTS_DIR, CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE}
"""What a training run writes at the top of its folder."""


def _finite_weights(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


WEIGHT_GROWTH = 1e6
"""How far past its starting scale a parameter may grow before the weights count as blown up. Healthy
training moves each element by about lr per step, far less than this; one step at lr 1e30 does not."""


def param_norms(module: torch.nn.Module) -> dict[str, float]:
    """{parameter name: its L2 norm}, in float64 (a blown-up fp32 norm would overflow to inf)."""
    return {n: float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) for n, p in module.named_parameters()}


def weights_problem(module: torch.nn.Module, start: dict[str, float]) -> Optional[str]:
    """Why `module`'s weights may not be kept as a good checkpoint, or None: a parameter that is NaN or inf, or
    whose norm is over WEIGHT_GROWTH times its norm in `start` (or √size, for one that starts near zero). The
    loss is checked before each update, so a finite loss says nothing about the weights the update made."""
    for name, norm in param_norms(module).items():
        base = max(start.get(name, 0.0), math.sqrt(module.get_parameter(name).numel()))
        if not math.isfinite(norm) or norm > WEIGHT_GROWTH * base:
            return (f"the weights blew up (‖{name}‖ = {norm:.3g}, from {start.get(name, float('nan')):.3g} at the "
                    "start)")
    return None


def _save_checkpoint(run_dir: Path, run: _Run, cfg: TrainConfig, name: str, extra: dict[str, Any]) -> Path:
    """A checkpoint with optimizer state at `run.step` (older checkpoints lose theirs unless 'all')."""
    meta = {"name": name, "train": cfg.to_dict(), "step": run.step,
            "tokens_seen": run.step * cfg.tokens_per_step, **extra}

    def write(folder: Path) -> None:
        save_model(run.model, folder, meta)
        write_state(folder, {"optimizer": run.optimizer.state_dict(), "step": run.step})

    size = 3 * sum(p.numel() * p.element_size() for p in run.model.parameters())  # weights + Adam moments
    folder = write_checkpoint(run_dir, run.step, write, needed_bytes=size)
    if cfg.keep_optimizer_state == "last":
        for step, old in list_checkpoints(run_dir):
            if step != run.step:
                remove_state(old)
    return folder


def _final_meta(cfg: TrainConfig, name: str, step: int, seconds: float, evals: dict[str, float]) -> dict[str, Any]:
    return {"name": name, "train": cfg.to_dict(), "step": step, "tokens_seen": step * cfg.tokens_per_step,
            "train_seconds": round(seconds, 1), **evals}  # this process's share, if resumed


def _check_fresh_folder(run_dir: Path, resume_hint: str) -> None:
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


def _resume_point(run_dir: Path, cfg: TrainConfig) -> tuple[str, Optional[Path]]:
    """('start', None): nothing to resume yet; ('finish', ckpt): only the final save is missing;
    ('continue', ckpt): the newest checkpoint with optimizer state."""
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


def train(cfg: TrainConfig, out: Union[str, Path], *, name: str = "run", resume: bool = False,
          device: Union[str, torch.device] = "auto", progress: bool = True,
          resume_command: Optional[str] = None) -> Path:
    """Train a model into the run folder `out` and return it. See the module docstring.

    `resume=True` continues the run in `out` from its newest checkpoint (or starts it, if it has
    none yet). `resume_command` is the exact command a user types to resume; the messages quote it.
    The folder is locked while this runs: a second process writing it gets a clear error.

    Under torchrun (WORLD_SIZE > 1) it trains data parallel: step t's batch is the same pure function
    of the seed and t as in one process, each rank takes its rows of it (batch_size / world), the
    gradients are averaged by DistributedDataParallel, and the loss that decides a stop is the whole batch's,
    so any number of processes trains what one process trains. Rank 0 writes the log, checkpoints and
    the final model; every rank resumes from them; with `torchrun --max-restarts` a restarted run
    resumes by itself."""
    run_dir = Path(out)
    dev = resolve_device(device)
    dist = init_from_env(dev)
    if dist.active and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    if cfg.batch_size % dist.world:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over {dist.world} processes; use a multiple of "
                          f"{dist.world}.")
    resume = resume or restart_count() > 0  # torchrun --max-restarts
    hint = f"`{resume_command}`" if resume_command else f"train(..., out={str(run_dir)!r}, resume=True)"
    try:
        if not resume and dist.is_main:
            _check_fresh_folder(run_dir, hint)
        with run_lock(run_dir, "training run") if dist.is_main else contextlib.nullcontext():
            if not resume and dist.is_main:  # again, now that the folder is ours: another process may have started
                _check_fresh_folder(run_dir, hint)
            dist.barrier()
            return _train(cfg, run_dir, name, resume, dev, progress, hint, dist)
    finally:
        shutdown()


def _train(cfg: TrainConfig, run_dir: Path, name: str, resume: bool, dev: torch.device, progress: bool,
           hint: str, dist: Optional[Dist] = None) -> Path:
    dist = dist or Dist()
    main = dist.is_main
    mode, resume_from = _resume_point(run_dir, cfg) if resume else ("start", None)
    dist.barrier()  # every rank has found the checkpoint it resumes from before rank 0 writes another
    if resume and mode == "start" and main:
        print(f"Nothing to resume in {run_dir} yet; starting {name} from step 0.")
    tokenizer = load_tokenizer(resume_from / TOKENIZER_FILE) if resume_from is not None else build_tokenizer(cfg.data)
    model = Transformer(cfg.model, tokenizer=TextCodec(tokenizer)).to(dev)
    text = build_text_data(cfg.data, cfg.model.n_ctx, tokenizer) if cfg.data.uses_text else None
    batches = Batches(cfg.data, cfg.model.n_ctx, cfg.batch_size, text, synthetic_vocab=min(256, cfg.model.d_vocab))
    val = batches.validation()
    if mode == "finish":  # killed after the last checkpoint, before the final save: only that is left
        model.load_state_dict(read_weights(resume_from, read_config(resume_from)))
        if not main:
            return run_dir
        print(f"The run in {run_dir} reached step {cfg.n_steps}; writing its final model from {resume_from}.")
        return _finish(cfg, run_dir, name, model, val, 0.0)

    run = _Run(model, _make_optimizer(model, cfg))
    start_norms = param_norms(model)  # the seeded initialisation: the scale sane weights stay near
    if resume_from is not None:
        model.load_state_dict(read_weights(resume_from, read_config(resume_from)))
        state = read_state(resume_from)
        run.optimizer.load_state_dict(state["optimizer"])
        run.step = int(state["step"])
        if main:
            truncate_log(run_dir / LOG_FILE, run.step)
            print(f"Resuming {name} from step {run.step} ({resume_from})")
    elif main:
        (run_dir / LOG_FILE).unlink(missing_ok=True)
    dist.barrier()
    # DistributedDataParallel all-reduces gradient buckets while the backward pass runs
    forward = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
    share = cfg.batch_size // dist.world
    rows = slice(dist.rank * share, (dist.rank + 1) * share)  # this rank's rows of every step's batch

    saved_at = run.step if resume_from is not None else -1  # the step of the newest checkpoint on disk
    last_good = resume_from
    ckpt_steps = set(cfg.checkpoint_steps)
    bar = tqdm(total=cfg.n_steps, initial=run.step, desc=f"train {name}" + (f" ({dist.world} processes)"
               if dist.active else ""), disable=not (progress and main), unit="step", dynamic_ncols=True)
    model.train()
    t_start = t_last = time.perf_counter()
    tok_since = 0

    def diverged(what: str) -> TrainingDiverged:
        bar.close()
        where = f"{last_good} (step {saved_at})" if last_good is not None else "none (no checkpoint was written)"
        return TrainingDiverged(
            f"Training stopped: {what} at step {run.step} (lr {cfg.lr_at(run.step):.3g}). The weights were not "
            f"saved past that point; the last good checkpoint is {where}. Lower TrainConfig.lr (now {cfg.lr:g}) "
            "or raise warmup_steps, and train into a new --out.")

    compile_errors: tuple[type[BaseException], ...] = ()  # `except ()` catches nothing
    if cfg.compile:
        compile_errors = _compile_errors()
        for block in model.blocks:
            block.compile()  # in place: parameter names and checkpoints are unchanged
    try:
        with StopRequest(f"training {name}") as stop:
            while True:
                if run.step in ckpt_steps and run.step != saved_at:  # checkpoint_steps always ends with n_steps
                    problem = weights_problem(model, start_norms)
                    if problem:
                        raise diverged(problem)
                    if main:
                        evals = evaluate(model, val, cfg.precision)
                        append_log(run_dir / LOG_FILE, {"step": run.step, "tokens": run.step * cfg.tokens_per_step,
                                                        **evals})
                        last_good = _save_checkpoint(run_dir, run, cfg, name, evals)
                    saved_at = run.step
                    dist.barrier()
                if run.step >= cfg.n_steps:
                    break
                if dist.any_(stop.requested):
                    if saved_at != run.step:
                        problem = weights_problem(model, start_norms)
                        if problem:
                            raise diverged(problem)
                        if main:
                            last_good = _save_checkpoint(run_dir, run, cfg, name, {"interrupted": True})
                        dist.barrier()
                    bar.close()
                    raise TrainingInterrupted(run.step, last_good, hint)
                tokens = batches.train(run.step)[rows].to(dev, non_blocking=True)
                for group in run.optimizer.param_groups:
                    group["lr"] = cfg.lr_at(run.step)
                with _autocast(cfg.precision, dev):
                    loss = forward(tokens, return_type="loss")
                loss.backward()  # under DDP the gradients arrive averaged over the ranks' equal shares
                if dist.active:  # and the loss that is logged and decides a stop is the whole batch's too
                    loss = dist.sum_(loss.detach().clone()) / dist.world
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if not bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)):  # before the step: weights kept
                    run.optimizer.zero_grad(set_to_none=True)
                    raise diverged(f"the loss was {float(loss.detach()):g} and the gradient norm {float(grad_norm):g}")
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                run.step += 1
                tok_since += tokens.numel() * dist.world
                bar.update(1)
                if run.step % cfg.log_every == 0:
                    now = time.perf_counter()
                    record = {"step": run.step, "tokens": run.step * cfg.tokens_per_step, "loss": loss.item(),
                              "lr": cfg.lr_at(run.step - 1), "grad_norm": grad_norm.item(),
                              "tok_per_s": tok_since / (now - t_last)}
                    if run.step % cfg.eval_every == 0 and run.step not in ckpt_steps and main:
                        record.update(evaluate(model, val, cfg.precision))
                    if main:
                        append_log(run_dir / LOG_FILE, record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:,.0f}")
                    t_last, tok_since = now, 0
    except KeyboardInterrupt:  # a second Ctrl-C: quit now; the newest checkpoint on disk is consistent
        bar.close()
        raise TrainingInterrupted(saved_at, last_good, hint, saved=False) from None
    except compile_errors as err:  # the first compiled forward builds the kernels (step 0's evaluation)
        bar.close()
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ConfigError(f"--compile (TrainConfig.compile): torch.compile could not build the transformer blocks "
                          f"({first.strip()}). On CPU it needs a working C++ compiler (g++ or clang++ on PATH, or "
                          "CXX naming one): install one, or train without --compile.") from err
    bar.close()
    if not main:
        return run_dir
    return _finish(cfg, run_dir, name, model, val, time.perf_counter() - t_start)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot build kernels (no C++ compiler, a failed build)."""
    from torch._dynamo.exc import BackendCompilerFailed  # inductor's InductorError subclasses it
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    return BackendCompilerFailed, CppCompileError, InvalidCxxCompiler


def _finish(cfg: TrainConfig, run_dir: Path, name: str, model: Transformer, val: dict[str, torch.Tensor],
            seconds: float) -> Path:
    """The final model at the top of the run folder; then optimizer state is dropped (nothing to resume)."""
    if not _finite_weights(model):
        raise TrainingDiverged(f"The final weights of {name} are NaN or inf; nothing was saved at the top of "
                               f"{run_dir}. Lower TrainConfig.lr and train into a new --out.")
    save_model(model, run_dir, _final_meta(cfg, name, cfg.n_steps, seconds, evaluate(model, val, cfg.precision)))
    if cfg.keep_optimizer_state == "last":  # a finished run has nothing to resume; keep the folder small
        for _, folder in list_checkpoints(run_dir):
            remove_state(folder)
    print(f"Wrote {run_dir}: model.safetensors, config.json, tokenizer.json, {LOG_FILE} and "
          f"{len(list_checkpoints(run_dir))} checkpoints under {run_dir / CHECKPOINTS_DIR}")
    return run_dir
