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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.artifacts import (
    LOG_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    list_checkpoints,
    read_config,
    read_weights,
    write_checkpoint,
)
from workbench.data import Batches, DataConfig, build_text_data, build_tokenizer
from workbench.errors import CheckpointError, ConfigError, InputError, check_field
from workbench.loading import models_dir, resolve_device, save_model
from workbench.model import ModelConfig, Transformer
from workbench.tokenizer import TextCodec, load_tokenizer


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

    def __post_init__(self) -> None:
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
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict (e.g. a preset JSON), naming any key that is not a field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown TrainConfig field(s) {unknown}; valid fields: {sorted(known)}.")
        data = dict(data)
        data["model"] = ModelConfig.from_dict(data.get("model", {}))
        data["data"] = DataConfig(**data.get("data", {}))
        return cls(**data)


def load_train_config(preset_or_path: Union[str, Path]) -> tuple[str, TrainConfig]:
    """(name, config) from a preset name in models/ or a path to a config JSON."""
    path = Path(preset_or_path)
    if not path.exists():
        path = models_dir() / f"{preset_or_path}.json"
    if not path.exists():
        from workbench.loading import preset_names

        raise InputError(f"No preset or config file {str(preset_or_path)!r}. Presets: {', '.join(preset_names())}.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    raw.pop("description", None)
    return path.stem, TrainConfig.from_dict(raw)


class TrainingInterrupted(Exception):
    """Ctrl-C during training; a checkpoint was saved at `step`."""

    def __init__(self, step: int, folder: Path):
        super().__init__(f"Training interrupted at step {step}; checkpoint saved to {folder}. "
                         "Continue with `workbench train ... --resume`.")
        self.step, self.folder = step, folder


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


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


def _save_checkpoint(run_dir: Path, run: _Run, cfg: TrainConfig, name: str, with_state: bool,
                     extra: dict[str, Any]) -> Path:
    meta = {"name": name, "train": cfg.to_dict(), "step": run.step,
            "tokens_seen": run.step * cfg.tokens_per_step, **extra}

    def write(folder: Path) -> None:
        save_model(run.model, folder, meta)
        if with_state:
            tmp = folder / f".{STATE_FILE}.tmp"
            torch.save({"optimizer": run.optimizer.state_dict(), "step": run.step,
                        "torch_rng": torch.get_rng_state()}, tmp)
            tmp.rename(folder / STATE_FILE)

    folder = write_checkpoint(run_dir, run.step, write)
    if with_state and cfg.keep_optimizer_state == "last":
        for step, old in list_checkpoints(run_dir):
            if step != run.step:
                (old / STATE_FILE).unlink(missing_ok=True)
    return folder


def _latest_resumable(run_dir: Path, cfg: TrainConfig) -> tuple[int, Path]:
    steps = [s for s, _ in list_checkpoints(run_dir)]
    if steps and steps[-1] >= cfg.n_steps:
        raise InputError(f"--resume: the run in {run_dir} is already complete ({cfg.n_steps} steps). "
                         "Train a longer config into a new folder to go further.")
    for step, folder in reversed(list_checkpoints(run_dir)):
        if (folder / STATE_FILE).exists():
            return step, folder
    raise CheckpointError(f"--resume: no checkpoint with optimizer state under {run_dir}/checkpoints. "
                          "Start a fresh run (without --resume) or point --out at the interrupted run.")


def _append_log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(run_dir: Path, last_step: int) -> None:
    """Drop log records after `last_step`, so a resumed run's log matches an uninterrupted one."""
    path = run_dir / LOG_FILE
    if path.exists():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in keep))


def train(cfg: TrainConfig, out: Union[str, Path], *, name: str = "run", resume: bool = False,
          device: Union[str, torch.device] = "auto", progress: bool = True) -> Path:
    """Train a model into the run folder `out` and return it. See the module docstring."""
    run_dir = Path(out)
    dev = resolve_device(device)
    if run_dir.exists() and list_checkpoints(run_dir) and not resume:
        raise InputError(f"{run_dir} already holds a training run. Pass --resume to continue it, "
                         "or choose another --out; nothing was overwritten.")
    run_dir.mkdir(parents=True, exist_ok=True)

    resume_from: Optional[Path] = None
    if resume:
        newest = list_checkpoints(run_dir)
        if newest and read_config(newest[-1][1]).get("train") != cfg.to_dict():
            raise ConfigError(f"--resume: the config differs from the one {run_dir} was trained with. "
                              "Resume with the same preset/config, or start a new run elsewhere.")
        _, resume_from = _latest_resumable(run_dir, cfg)
        tokenizer = load_tokenizer(resume_from / TOKENIZER_FILE)
    else:
        tokenizer = build_tokenizer(cfg.data)
    text = build_text_data(cfg.data, cfg.model.n_ctx, tokenizer) if cfg.data.uses_text else None
    batches = Batches(cfg.data, cfg.model.n_ctx, cfg.batch_size, text, synthetic_vocab=min(256, cfg.model.d_vocab))
    val = batches.validation()

    model = Transformer(cfg.model, tokenizer=TextCodec(tokenizer)).to(dev)
    run = _Run(model, _make_optimizer(model, cfg))
    if resume_from is not None:
        model.load_state_dict(read_weights(resume_from, read_config(resume_from)))
        state = torch.load(resume_from / STATE_FILE, map_location=dev, weights_only=True)
        run.optimizer.load_state_dict(state["optimizer"])
        run.step = state["step"]
        _truncate_log(run_dir, run.step)
        print(f"Resuming {name} from step {run.step} ({resume_from})")
    else:
        (run_dir / LOG_FILE).unlink(missing_ok=True)

    ckpt_steps = set(cfg.checkpoint_steps) - ({run.step} if resume_from is not None else set())  # saved already
    bar = tqdm(total=cfg.n_steps, initial=run.step, desc=f"train {name}", disable=not progress,
               unit="step", dynamic_ncols=True)
    model.train()
    t_start = t_last = time.perf_counter()
    tok_since = 0
    try:
        while True:
            if run.step in ckpt_steps:  # checkpoint_steps always ends with n_steps
                evals = evaluate(model, val, cfg.precision)
                _append_log(run_dir, {"step": run.step, "tokens": run.step * cfg.tokens_per_step, **evals})
                _save_checkpoint(run_dir, run, cfg, name, with_state=True, extra=evals)
            if run.step >= cfg.n_steps:
                break
            tokens = batches.train(run.step).to(dev, non_blocking=True)
            for group in run.optimizer.param_groups:
                group["lr"] = cfg.lr_at(run.step)
            with _autocast(cfg.precision, dev):
                loss = model(tokens, return_type="loss")
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            tok_since += tokens.numel()
            bar.update(1)
            if run.step % cfg.log_every == 0:
                now = time.perf_counter()
                record = {"step": run.step, "tokens": run.step * cfg.tokens_per_step, "loss": loss.item(),
                          "lr": cfg.lr_at(run.step - 1), "grad_norm": grad_norm.item(),
                          "tok_per_s": tok_since / (now - t_last)}
                if run.step % cfg.eval_every == 0 and run.step not in ckpt_steps:
                    record.update(evaluate(model, val, cfg.precision))
                _append_log(run_dir, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:,.0f}")
                t_last, tok_since = now, 0
    except KeyboardInterrupt:
        bar.close()
        folder = _save_checkpoint(run_dir, run, cfg, name, with_state=True, extra={"interrupted": True})
        raise TrainingInterrupted(run.step, folder) from None
    bar.close()
    if cfg.keep_optimizer_state == "last":  # a finished run has nothing to resume; keep the folder small
        for _, folder in list_checkpoints(run_dir):
            (folder / STATE_FILE).unlink(missing_ok=True)

    final_meta = {"name": name, "train": cfg.to_dict(), "step": run.step,
                  "tokens_seen": run.step * cfg.tokens_per_step,
                  "train_seconds": round(time.perf_counter() - t_start, 1),  # this process's share, if resumed
                  **evaluate(model, val, cfg.precision)}
    save_model(model, run_dir, final_meta)
    print(f"Wrote {run_dir}: model.safetensors, config.json, tokenizer.json, {LOG_FILE} and "
          f"{len(list_checkpoints(run_dir))} checkpoints under {run_dir / 'checkpoints'}")
    return run_dir
