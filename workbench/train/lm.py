"""Training language models: AdamW with warmup and cosine decay, gradient clipping, validation loss,
log-spaced checkpoints, a JSONL log, Ctrl-C safety and bit-identical `--resume`. The run folder's life
(lock, resume, checkpoints, Ctrl-C, the final save) is `workbench.train.lifecycle`'s, the optimizer
`workbench.train.optim`'s.

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

from workbench.artifacts import CHECKPOINTS_DIR, LOG_FILE, TOKENIZER_FILE, append_log, list_checkpoints
from workbench.config import check_types, from_dict
from workbench.data.text import Batches, DataConfig, build_text_data, build_tokenizer
from workbench.data.tokenizer import TextCodec, load_tokenizer
from workbench.errors import ConfigError, InputError, check_field, unknown_name_message
from workbench.model.loading import models_dir, resolve_device
from workbench.model.transformer import ModelConfig, Transformer
from workbench.train.distributed import Dist, init_from_env, restart_count, shutdown
from workbench.train.lifecycle import (
    Run,
    check_final_weights,
    claim_folder,
    load_for_finish,
    resume_hint,
    save_final,
    start_point,
)
from workbench.train.optim import OptimizerConfig, make_optimizer, param_norms, weights_problem


@dataclass(frozen=True)
class TrainConfig(OptimizerConfig):
    """One training run: the model, its data and the optimisation recipe (the AdamW settings lr,
    warmup_steps, weight_decay, beta1 and beta2 are `OptimizerConfig`'s; weight decay applies to weight
    matrices only, not biases, LayerNorm or embeddings)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture of the model to train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the training tokens come from."""
    batch_size: int = 32
    """Sequences per step (each n_ctx tokens)."""
    n_steps: int = 2000
    """Optimizer steps."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
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
        self.check_optimizer(own, self.n_steps)
        check_field(0 <= self.min_lr_ratio <= 1, own, "min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
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
    hint = resume_hint(resume_command, "train", run_dir)
    try:
        with claim_folder(run_dir, resume, hint, dist):
            return _train(cfg, run_dir, name, resume, dev, progress, hint, dist)
    finally:
        shutdown()


def _train(cfg: TrainConfig, run_dir: Path, name: str, resume: bool, dev: torch.device, progress: bool,
           hint: str, dist: Optional[Dist] = None) -> Path:
    dist = dist or Dist()
    mode, resume_from = start_point(run_dir, cfg, resume, name, dist)
    tokenizer = load_tokenizer(resume_from / TOKENIZER_FILE) if resume_from is not None else build_tokenizer(cfg.data)
    model = Transformer(cfg.model, tokenizer=TextCodec(tokenizer)).to(dev)
    text = build_text_data(cfg.data, cfg.model.n_ctx, tokenizer) if cfg.data.uses_text else None
    batches = Batches(cfg.data, cfg.model.n_ctx, cfg.batch_size, text, synthetic_vocab=min(256, cfg.model.d_vocab))
    val = batches.validation()
    if mode == "finish":  # killed after the last checkpoint, before the final save: only that is left
        load_for_finish(model, run_dir, resume_from, cfg.n_steps, dist.is_main)
        return _finish(cfg, run_dir, name, model, val, 0.0) if dist.is_main else run_dir

    run = _LMRun(cfg, run_dir, name, hint, model, batches, val, dev, dist)
    run.restore(resume_from)
    run.start(progress)
    t_start = time.perf_counter()
    compile_errors: tuple[type[BaseException], ...] = ()  # `except ()` catches nothing
    if cfg.compile:
        compile_errors = _compile_errors()
        for block in model.blocks:
            block.compile()  # in place: parameter names and checkpoints are unchanged
    try:
        run.train_loop(cfg.n_steps)
    except compile_errors as err:  # the first compiled forward builds the kernels (step 0's evaluation)
        run.close_bar()
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ConfigError(f"--compile (TrainConfig.compile): torch.compile could not build the transformer blocks "
                          f"({first.strip()}). On CPU it needs a working C++ compiler (g++ or clang++ on PATH, or "
                          "CXX naming one): install one, or train without --compile.") from err
    if not dist.is_main:
        return run_dir
    return _finish(cfg, run_dir, name, model, val, time.perf_counter() - t_start)


class _LMRun(Run):
    """A language-model run in progress: evaluations and checkpoints at the scheduled steps, a logged
    training loss every log_every steps, and data-parallel steps under torchrun."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, name: str, hint: str, model: Transformer, batches: Batches,
                 val: dict[str, torch.Tensor], dev: torch.device, dist: Dist):
        super().__init__(run_dir, name, hint, model, make_optimizer(model, cfg), dist=dist,
                         keep_all_states=cfg.keep_optimizer_state == "all")
        self.cfg, self.batches, self.val, self.dev = cfg, batches, val, dev
        self.start_norms = param_norms(model)  # the seeded initialisation: the scale sane weights stay near
        self.ckpt_steps = set(cfg.checkpoint_steps)

    def start(self, progress: bool) -> None:
        """After `restore`: the data-parallel wrapper, this rank's rows, the progress bar and the timers."""
        cfg, dist = self.cfg, self.dist
        # DistributedDataParallel all-reduces gradient buckets while the backward pass runs
        self.forward_model = torch.nn.parallel.DistributedDataParallel(self.model) if dist.active else self.model
        share = cfg.batch_size // dist.world
        self.rows = slice(dist.rank * share, (dist.rank + 1) * share)  # this rank's rows of every step's batch
        self.bar = tqdm(total=cfg.n_steps, initial=self.step, desc=f"train {self.name}" + (
            f" ({dist.world} processes)" if dist.active else ""), disable=not (progress and dist.is_main),
            unit="step", dynamic_ncols=True)
        self.model.train()
        self.t_last = time.perf_counter()
        self.tok_since = 0

    def checkpoint_meta(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {"name": self.name, "train": self.cfg.to_dict(), "step": self.step,
                "tokens_seen": self.step * self.cfg.tokens_per_step, **extra}

    def weights_problem(self) -> Optional[str]:
        return weights_problem(self.model, self.start_norms)

    def diverged_context(self) -> str:
        return f" (lr {self.cfg.lr_at(self.step):.3g})"

    def diverged_advice(self) -> str:
        return f"Lower TrainConfig.lr (now {self.cfg.lr:g}) or raise warmup_steps"

    def at_step(self) -> None:
        """The validation loss and a checkpoint at each scheduled step (checkpoint_steps ends with n_steps)."""
        if self.step in self.ckpt_steps and self.step != self.saved_at:
            self.check_weights()
            if self.dist.is_main:
                evals = evaluate(self.model, self.val, self.cfg.precision)
                append_log(self.run_dir / LOG_FILE, {"step": self.step, "tokens": self.step * self.cfg.tokens_per_step,
                                                     **evals})
                self.last_good = self.save(evals)
            self.saved_at = self.step
            self.dist.barrier()

    def take_step(self) -> None:
        cfg, dist, optimizer = self.cfg, self.dist, self.optimizer
        tokens = self.batches.train(self.step)[self.rows].to(self.dev, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        with _autocast(cfg.precision, self.dev):
            loss = self.forward_model(tokens, return_type="loss")
        loss.backward()  # under DDP the gradients arrive averaged over the ranks' equal shares
        if dist.active:  # and the loss that is logged and decides a stop is the whole batch's too
            loss = dist.sum_(loss.detach().clone()) / dist.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if not bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)):  # before the step: weights kept
            optimizer.zero_grad(set_to_none=True)
            raise self.diverged(f"the loss was {float(loss.detach()):g} and the gradient norm {float(grad_norm):g}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tok_since += tokens.numel() * dist.world
        self.bar.update(1)
        if self.step % cfg.log_every == 0:
            self._log(loss, grad_norm)

    def _log(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """The training loss, learning rate, gradient norm and throughput (and the validation loss every
        eval_every steps that is no checkpoint step) in log.jsonl."""
        cfg, main = self.cfg, self.dist.is_main
        now = time.perf_counter()
        record = {"step": self.step, "tokens": self.step * cfg.tokens_per_step, "loss": loss.item(),
                  "lr": cfg.lr_at(self.step - 1), "grad_norm": grad_norm.item(),
                  "tok_per_s": self.tok_since / (now - self.t_last)}
        if self.step % cfg.eval_every == 0 and self.step not in self.ckpt_steps and main:
            record.update(evaluate(self.model, self.val, cfg.precision))
        if main:
            append_log(self.run_dir / LOG_FILE, record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:,.0f}")
        self.t_last, self.tok_since = now, 0


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot build kernels (no C++ compiler, a failed build)."""
    from torch._dynamo.exc import BackendCompilerFailed  # inductor's InductorError subclasses it
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    return BackendCompilerFailed, CppCompileError, InvalidCxxCompiler


def _finish(cfg: TrainConfig, run_dir: Path, name: str, model: Transformer, val: dict[str, torch.Tensor],
            seconds: float) -> Path:
    """The final model at the top of the run folder; then optimizer state is dropped (nothing to resume)."""
    check_final_weights(run_dir, name, model, "TrainConfig.lr")
    evals = evaluate(model, val, cfg.precision)
    meta = {"name": name, "train": cfg.to_dict(), "step": cfg.n_steps, "tokens_seen": cfg.n_steps * cfg.tokens_per_step,
            "train_seconds": round(seconds, 1), **evals}  # this process's share, if resumed
    save_final(run_dir, model, meta, drop_states=cfg.keep_optimizer_state == "last")
    print(f"Wrote {run_dir}: model.safetensors, config.json, tokenizer.json, {LOG_FILE} and "
          f"{len(list_checkpoints(run_dir))} checkpoints under {run_dir / CHECKPOINTS_DIR}")
    return run_dir
