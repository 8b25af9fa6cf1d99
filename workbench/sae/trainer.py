"""One dictionary's training: `SAETrainConfig` (data volume, optimiser schedule, bookkeeping) and the
trainer that takes its steps, checkpoints it and resumes it. `workbench.sae.training` runs several in
lockstep; its docstring gives the recipe."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from workbench.artifacts import (
    LOG_FILE,
    SAE_TRAINING_WEIGHTS_FILE,
    atomic_write_json,
    list_checkpoints,
    read_config,
    read_state,
    truncate_log,
    write_checkpoint,
    write_state,
)
from workbench.config import check_types, from_dict
from workbench.errors import CheckpointError, ConfigError, TrainingDiverged, check_field
from workbench.sae.files import save_sae
from workbench.sae.metrics import ReconstructionStats
from workbench.sae.modules import SAE, SAEConfig, geometric_median
from workbench.train.distributed import Dist
from workbench.train.lifecycle import config_diff, refuse_changed_config
from workbench.train.optim import fused_adam, param_norms, weights_problem


def _device(sae: torch.nn.Module) -> torch.device:
    return next(sae.parameters()).device


@dataclass(frozen=True)
class SAETrainConfig:
    """How to train: data volume, optimiser schedule and bookkeeping."""

    sae: SAEConfig = field(default_factory=lambda: SAEConfig(d_in=64, d_sae=256))
    """The SAE to train."""
    n_tokens: int = 2_000_000
    """Training tokens (steps = n_tokens // batch_size)."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 1e-3
    """Peak Adam learning rate."""
    lr_warmup_fraction: float = 0.02
    """Linear learning-rate warmup, as a fraction of the steps."""
    lr_decay_fraction: float = 0.2
    """Linear decay to zero over this last fraction of the steps."""
    l1_warmup_fraction: float = 0.05
    """Linear warmup of the sparsity coefficient."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this."""
    normalize: bool = True
    """Scale activations so that E‖x‖ = √d_in (folded back into the weights at save)."""
    b_dec_init: str = "geometric_median"
    """'geometric_median', 'mean' or 'zeros'."""
    dead_window: int = 200_000
    """A latent that has not fired for this many tokens is dead (and feeds the AuxK loss)."""
    log_every: int = 50
    """Steps between log lines."""
    n_checkpoints: int = 4
    """Checkpoints written during training (log-spaced), besides the final SAE."""
    seed: int = 0
    """Seed of the initialisation."""
    precision: str = "fp32"
    """'bf16': the forward pass and losses under bfloat16 autocast (fp32 weights, optimizer and
    statistics), on a GPU or a CPU with bf16 support; 'fp32': everything in float32."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "SAETrainConfig"
        for name in ("n_tokens", "batch_size", "log_every", "dead_window"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        check_field(self.n_tokens >= self.batch_size, own, "n_tokens", self.n_tokens,
                    f"at least one batch (batch_size = {self.batch_size})")
        check_field(self.lr > 0, own, "lr", self.lr, "positive")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "l1_warmup_fraction"):
            value = getattr(self, name)
            check_field(0 <= value < 1, own, name, value, "in [0, 1)")
        check_field(self.b_dec_init in ("geometric_median", "mean", "zeros"), own, "b_dec_init", self.b_dec_init,
                    "'geometric_median', 'mean' or 'zeros'")
        check_field(self.n_checkpoints >= 0, own, "n_checkpoints", self.n_checkpoints, "≥ 0")
        check_field(self.seed >= 0, own, "seed", self.seed, "an integer ≥ 0")
        check_field(self.precision in ("fp32", "bf16"), own, "precision", self.precision, "'fp32' or 'bf16'")

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size

    def lr_at(self, step: int) -> float:
        warm, decay = self.lr_warmup_fraction * self.n_steps, self.lr_decay_fraction * self.n_steps
        if step < warm:
            return self.lr * (step + 1) / warm
        if decay and step >= self.n_steps - decay:
            return self.lr * (self.n_steps - step) / decay
        return self.lr

    def sparsity_warmup(self, step: int) -> float:
        """The factor in [0, 1] on the sparsity coefficient at `step`."""
        warm = self.l1_warmup_fraction * self.n_steps
        return min(1.0, (step + 1) / warm) if warm else 1.0

    def checkpoint_steps(self) -> set[int]:
        if not self.n_checkpoints:
            return set()
        return {int(s) for s in np.geomspace(max(1, self.n_steps // 100), self.n_steps, self.n_checkpoints + 1)[:-1]}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "SAETrainConfig":
        """Build from parsed JSON (with its `sae` section); unknown keys and wrong types are errors
        that name the field."""
        return from_dict(cls, data, where)


class _Trainer:
    """One SAE's optimiser, schedule and bookkeeping."""

    def __init__(self, name: str, sae: SAE, cfg: SAETrainConfig, out: Optional[Path], dist: Optional[Dist] = None,
                 data: Optional[dict[str, Any]] = None):
        self.name, self.sae, self.cfg, self.out, self.data = name, sae, cfg, out, data
        self.start_norms = param_norms(sae)  # the seeded initialisation: the scale sane weights stay near
        self.dist = dist or Dist()
        self.writes = out is not None and self.dist.is_main  # under torchrun only rank 0 writes files
        sae.dist = self.dist  # the statistics inside a step (AuxK's variance, BatchTopK's threshold) are global
        self.key = sae.cfg.hook_name or name  # which activations of a batch it reads
        self.target_key = sae.cfg.target_hook or self.key  # and which it predicts (a transcoder's differ)
        self.opt = fused_adam(torch.optim.Adam, sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=_device(sae))
        self.scale: Optional[float] = None
        self.scale_out: Optional[float] = None
        self.step = 0
        self.stats = ReconstructionStats(sae.d_sae)

    # -- state ----------------------------------------------------------------------------------
    def check_weights(self) -> None:
        """TrainingDiverged unless the weights are fit to keep: finite, and not blown far past their starting
        scale. The loss is checked before each update, so it cannot tell (lr 1e30 gives a finite loss and
        weights of 1e30)."""
        problem = weights_problem(self.sae, self.start_norms)
        if problem:
            raise TrainingDiverged(f"{self.name}: {problem} at step {self.step}. Nothing was saved past that point; "
                                   f"the last good checkpoint is {self.last_checkpoint()}. Lower the learning rate "
                                   f"(now {self.cfg.lr:g}), and train into a new --out.")

    def _checkpoint(self) -> Optional[Path]:
        self.check_weights()  # on every rank, so that all of them stop together
        if not self.writes:
            return None

        def write(tmp: Path) -> None:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.sae.state_dict().items()},
                      str(tmp / SAE_TRAINING_WEIGHTS_FILE))
            write_state(tmp, {"optimizer": self.opt.state_dict(), "since_fired": self.since_fired,
                              "scale": self.scale, "scale_out": self.scale_out, "step": self.step,
                              "stats": dict(vars(self.stats))})  # the log's running sums, so it resumes exactly
            atomic_write_json(tmp / "config.json", {"kind": "workbench.SAECheckpoint", "format_version": 1,
                                                    "step": self.step, "train": self.cfg.to_dict(), "data": self.data})

        size = 3 * sum(p.numel() * p.element_size() for p in self.sae.parameters())
        return write_checkpoint(self.out, self.step, write, needed_bytes=size)

    def last_checkpoint(self) -> str:
        found = list_checkpoints(self.out) if self.out is not None else []
        return f"{found[-1][1]} (step {found[-1][0]})" if found else "none (no checkpoint was written yet)"

    def checkpoint_steps(self) -> set[int]:
        return {s for s, _ in list_checkpoints(self.out)} if self.out is not None else set()

    def resume(self, step: int) -> None:
        """Load the checkpoint at `step` (weights, optimizer, dead-latent counters, scale)."""
        folder = dict(list_checkpoints(self.out))[step]
        try:
            saved = read_config(folder)
        except CheckpointError:
            saved = json.loads((folder / "config.json").read_text())
        refuse_changed_config(saved.get("train"), self.cfg.to_dict(), self.out)
        if saved.get("data") is not None and self.data is not None:  # a checkpoint older than the record has none
            diff = config_diff(saved["data"], self.data)
            if diff:
                raise ConfigError(f"--resume: the data settings differ from those {self.out} was started with: "
                                  f"{'; '.join(diff)}. Resume with the same data, or start a new run in another "
                                  "folder.")
        try:
            weights = load_file(str(folder / SAE_TRAINING_WEIGHTS_FILE))
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise CheckpointError(f"{folder / SAE_TRAINING_WEIGHTS_FILE} is damaged ({err}). Move {folder} out of "
                                  f"{folder.parent} to resume from the checkpoint before it.") from err
        state = read_state(folder)
        self.sae.load_state_dict(weights)
        self.opt.load_state_dict(state["optimizer"])
        self.since_fired = state["since_fired"].to(_device(self.sae))
        self.scale, self.step = state["scale"], int(state["step"])
        self.scale_out = state.get("scale_out", self.scale)
        self.stats = ReconstructionStats(**{k: v.to(_device(self.sae)) if isinstance(v, torch.Tensor) else v
                                            for k, v in state["stats"].items()})
        if self.writes:
            truncate_log(self.out / LOG_FILE, self.step)

    # -- one step ---------------------------------------------------------------------------------
    def init_from(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Activation scales (input and target: the same tensor for an autoencoder) and b_dec, from
        the first batch."""
        if self.scale is None:
            def scale_of(t: torch.Tensor) -> float:
                if not self.cfg.normalize:
                    return 1.0
                count = torch.tensor(len(t), dtype=torch.double, device=t.device)
                sums = self.dist.sum_(torch.stack([t.norm(dim=-1).double().sum(), count]))
                return math.sqrt(t.shape[-1]) / max(float(sums[0] / sums[1]), 1e-12)  # mean norm, over every rank
            self.scale = scale_of(x)
            self.scale_out = scale_of(y) if y is not x else self.scale
            ys = self.dist.cat(y * self.scale_out)  # the whole batch, in rank order (b_dec starts the same everywhere)
            init = {"geometric_median": lambda: geometric_median(ys[:4096]), "mean": lambda: ys.mean(0),
                    "zeros": lambda: torch.zeros_like(ys[0])}[self.cfg.b_dec_init]()
            with torch.no_grad():
                self.sae.b_dec.copy_(init)

    def train_step(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> dict[str, float]:
        """One step on inputs x and targets y (None: x, an autoencoder)."""
        y = x if y is None else y
        for t in (x, y):
            if not torch.isfinite(t).all():
                raise TrainingDiverged(f"The activations for {self.name} contain NaN or inf at step {self.step}. "
                                       "Nothing was overwritten; the last good checkpoint is "
                                       f"{self.last_checkpoint()}. Check the model and hook that produced them.")
        self.init_from(x, y)
        xs = x * self.scale
        x, y = xs, (xs if y is x else y * self.scale_out)
        sae, cfg = self.sae, self.cfg
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        device = _device(sae)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = sae.train_forward(x)
            skip = sae.skip_out(x)
            if skip is not None:
                out.x_hat = out.x_hat + skip
            x_hat = out.x_hat = out.x_hat.float()
            mse = (x_hat - y).pow(2).sum(-1).mean()
            dead = self.since_fired >= cfg.dead_window
            sparsity = sae.sparsity_loss(out, sae.cfg.l1_coefficient * cfg.sparsity_warmup(self.step)).float()
            aux = sae.aux_loss(y, out, dead).float()
        loss = mse + sparsity + aux
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"The loss of {self.name} became {float(loss)} at step {self.step}. Nothing was "
                                   f"overwritten; the last good checkpoint is {self.last_checkpoint()}. Lower the "
                                   "learning rate or the sparsity coefficient, and train into a new --out.")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.mean_grads_(sae.parameters())  # each rank's loss is a mean over its share of the batch
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        if not torch.isfinite(grad_norm):
            self.opt.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"The gradient of {self.name} became {float(grad_norm)} at step {self.step}. "
                                   f"Nothing was overwritten; the last good checkpoint is {self.last_checkpoint()}. "
                                   "Lower the learning rate, and train into a new --out.")
        self.opt.step()
        sae.after_step()
        fired, l0_sum, l1_sum = out.counts(sae.d_sae)
        with torch.no_grad():
            self.stats.add_counts(y, x_hat, fired, l0_sum, l1_sum)  # this rank's; summed over ranks when logged
            fired_anywhere = self.dist.sum_(fired.clone())
            self.since_fired += x.shape[0] * self.dist.world
            self.since_fired[fired_anywhere > 0] = 0
        self.step += 1
        return {"loss": float(loss.detach()), "mse": float(mse.detach()), "sparsity_loss": float(sparsity.detach()),
                "aux_loss": float(aux.detach())}

    def log_record(self, losses: dict[str, float], tok_per_s: float) -> dict[str, Any]:
        s = _reduced(self.stats, self.dist).summary()
        self.stats = ReconstructionStats(self.sae.d_sae)
        return {"step": self.step, "tokens": self.step * self.cfg.batch_size, **losses, "l0": s["l0"],
                "fvu": s["fvu"], "dead_fraction": float((self.since_fired >= self.cfg.dead_window).float().mean()),
                "lr": self.cfg.lr_at(self.step - 1),
                "sparsity_coefficient": self.sae.cfg.l1_coefficient * self.cfg.sparsity_warmup(self.step - 1),
                "tok_per_s": tok_per_s}

    def finish(self) -> Optional[Path]:
        """Fold the activation scale into the weights and save in the SAELens layout."""
        self.check_weights()
        self.sae.fold_scale(self.scale or 1.0, self.scale_out or self.scale or 1.0)
        if not self.writes:
            return None
        own_save = getattr(self.sae, "save", None)  # dictionaries with their own file layout (cross-layer transcoders)
        if own_save is not None:
            return own_save(self.out, extra={"activation_scale_folded": self.scale, "steps": self.step,
                                             "train": self.cfg.to_dict()})
        return save_sae(self.sae, self.out, extra={"activation_scale_folded": self.scale, "steps": self.step,
                                                   "train": self.cfg.to_dict()})


def _reduced(stats: ReconstructionStats, dist: Dist) -> ReconstructionStats:
    """The stats summed over every rank (a copy; itself with one process)."""
    if not dist.active:
        return stats
    scalars = dist.sum_(torch.tensor([stats.n, stats.sq_err, stats.sum_x_sq, stats.l0_sum, stats.l1_sum, stats.cos_sum,
                                      stats.ratio_sum], dtype=torch.float64, device=stats.sum_x.device))
    n, sq_err, sum_x_sq, l0_sum, l1_sum, cos_sum, ratio_sum = scalars.tolist()
    return ReconstructionStats(stats.d_sae, stats.dense_threshold, int(n), sq_err, dist.sum_(stats.sum_x.clone()),
                               sum_x_sq, l0_sum, l1_sum, cos_sum, ratio_sum, dist.sum_(stats.fired.clone()))
