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
- Ctrl-C is handled between steps (`workbench.train.runs.StopRequest`), state is safetensors plus JSON
  (never pickle), and a run folder is locked while a process writes it.

Several SAEs train in lockstep from one source, so one forward pass of the model feeds them all.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from workbench.artifacts import (
    CHECKPOINTS_DIR,
    LOG_FILE,
    SAE_CFG_FILE,
    SAE_TRAINING_WEIGHTS_FILE,
    SAE_WEIGHTS_FILE,
    append_log,
    atomic_write_json,
    list_checkpoints,
    read_config,
    read_state,
    run_lock,
    truncate_log,
    write_checkpoint,
    write_state,
)
from workbench.cache.activations import Batch
from workbench.config import check_types, from_dict
from workbench.errors import CheckpointError, ConfigError, InputError, TrainingDiverged, check_field
from workbench.sae.metrics import ReconstructionStats
from workbench.sae.modules import SAE, SAEConfig, geometric_median, make_sae, save_sae
from workbench.train.distributed import Dist
from workbench.train.lm import fused_adam, param_norms, weights_problem
from workbench.train.runs import StopRequest, TrainingInterrupted, config_diff, refuse_changed_config, refuse_foreign

__all__ = ["RankShare", "SAETrainConfig", "TrainingDiverged", "rank_share", "store_batches", "text_batches",
           "train_sae", "train_saes"]
RUN_FILES = {LOG_FILE, CHECKPOINTS_DIR, SAE_CFG_FILE, SAE_WEIGHTS_FILE}
"""What an SAE run writes at the top of its folder."""


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


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the dictionary's device; from the CPU to a GPU through pinned memory, without blocking."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _reduced(stats: ReconstructionStats, dist: Dist) -> ReconstructionStats:
    """The stats summed over every rank (a copy; itself with one process)."""
    if not dist.active:
        return stats
    scalars = dist.sum_(torch.tensor([stats.n, stats.sq_err, stats.sum_x_sq, stats.l0_sum, stats.l1_sum, stats.cos_sum,
                                      stats.ratio_sum], dtype=torch.float64, device=stats.sum_x.device))
    n, sq_err, sum_x_sq, l0_sum, l1_sum, cos_sum, ratio_sum = scalars.tolist()
    return ReconstructionStats(stats.d_sae, stats.dense_threshold, int(n), sq_err, dist.sum_(stats.sum_x.clone()),
                               sum_x_sq, l0_sum, l1_sum, cos_sum, ratio_sum, dist.sum_(stats.fired.clone()))


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
    from workbench.sae.modules import load_sae

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


# -- data parallel: what each process reads -----------------------------------------------------------
@dataclass(frozen=True)
class RankShare:
    """What one process of a data-parallel SAE job trains on: the hooks whose SAEs it trains, its share
    of every batch, and which slice (every `world`-th row or store batch, from `rank`) it reads. With
    spread hooks a process reads everything, for its own hooks only."""

    hooks: list[str]
    batch_size: int
    rank: int = 0
    world: int = 1


def rank_share(dist: Dist, hooks: Sequence[str], batch_size: int, spread: bool = False) -> RankShare:
    """This process's share: the batch split over the processes (every hook's SAE on every rank), or,
    with `spread`, the hooks dealt over them (each SAE on one rank, whole batches)."""
    hooks = list(hooks)
    if spread and len(hooks) < dist.world:
        raise InputError(f"--spread-hooks deals {len(hooks)} hook(s) over {dist.world} processes; give at least as "
                         "many --hook as processes, or train data parallel (without --spread-hooks).")
    if spread:
        return RankShare(hooks[dist.rank::dist.world], batch_size)
    if batch_size % dist.world:
        raise InputError(f"--batch-size {batch_size} does not split over {dist.world} processes; use a multiple "
                         f"of {dist.world}.")
    return RankShare(hooks, batch_size // dist.world, dist.rank, dist.world)


def store_batches(store: Any, share: RankShare, seed: int) -> Iterator[Batch]:
    """This process's batches from an `ActivationStore`: every world-th of the shuffled stream."""
    return itertools.islice(store.batches(share.batch_size, seed=seed, hooks=share.hooks), share.rank, None,
                            share.world)


def text_batches(model: Any, token_rows: torch.Tensor, share: RankShare, seed: int, **stream: Any
                 ) -> Iterator[Batch]:
    """This process's batches streamed from `model` over its own rows (every world-th), with its own
    shuffling seed; `stream` goes to `stream_activations` (buffer_batches, exclude_special, skip_first)."""
    from workbench.cache.activations import stream_activations

    return stream_activations(model, token_rows[share.rank::share.world], share.hooks, batch_size=share.batch_size,
                              seed=seed + share.rank, **stream)


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
