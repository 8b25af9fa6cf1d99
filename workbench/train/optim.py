"""The optimizer: one set of AdamW settings for every trainer, the fused Adam kernel, and the checks
that tell good weights from blown-up ones.

    class TrainConfig(OptimizerConfig): ...      # lr, warmup_steps, weight_decay, beta1, beta2 come from here
    optimizer = make_optimizer(model, cfg)       # AdamW, fused where torch has the kernel

The configs inherit the fields, so their JSON stays flat ("lr": 1e-3 at the top level, as in every
preset). Each trainer keeps its own learning-rate schedule (`lr_at`) and may change a default (the
grokking recipe's weight decay of 1.0). The SAE trainer uses `fused_adam` and the weight checks; its
config (`SAETrainConfig`) has other fields (no weight decay, no betas, a warmup as a fraction of the run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch

from workbench.errors import check_field


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings. A trainer's config inherits them (its JSON keys stay at the top level) and
    calls `check_optimizer` in its `__post_init__`."""

    lr: float = 1e-3
    """Peak learning rate (each trainer's `lr_at` gives the schedule)."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr."""
    weight_decay: float = 0.05
    """AdamW weight decay. The language-model trainer applies it to weight matrices only (not biases,
    LayerNorm or embeddings); the modular-addition trainer to every parameter, as in the paper."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""

    decay_every_parameter: ClassVar[bool] = False
    """Not a field: whether `make_optimizer` decays every parameter of a model (True) or only its
    weight matrices (False: biases, norms and embeddings are left alone)."""

    def check_optimizer(self, own: str, n_steps: int) -> None:
        """A ConfigError naming the first optimizer field out of range (`own`: the config's class name)."""
        check_field(self.lr > 0, own, "lr", self.lr, "positive")
        check_field(0 <= self.warmup_steps < n_steps, own, "warmup_steps", self.warmup_steps,
                    f"in [0, n_steps={n_steps})")
        check_field(self.weight_decay >= 0, own, "weight_decay", self.weight_decay, "≥ 0")
        check_field(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, own, "beta1/beta2", (self.beta1, self.beta2),
                    "in [0, 1)")


def make_optimizer(model_or_params: Union[torch.nn.Module, Iterable[Any]],
                   cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW with `cfg`'s learning rate, betas and weight decay, fused where torch can (`fused_adam`).

    Given a model, its weight matrices decay and its biases, norms and embeddings (`embed`,
    `pos_embed`) do not, unless `cfg.decay_every_parameter`. Given parameters or parameter groups,
    every one decays (a group may set its own weight_decay)."""
    betas = (cfg.beta1, cfg.beta2)
    if isinstance(model_or_params, torch.nn.Module):
        if not cfg.decay_every_parameter:
            named = list(model_or_params.named_parameters())
            decay = [p for n, p in named if _decays(n, p)]
            no_decay = [p for n, p in named if not _decays(n, p)]
            groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            return fused_adam(torch.optim.AdamW, groups, lr=cfg.lr, betas=betas)
        model_or_params = model_or_params.parameters()
    return fused_adam(torch.optim.AdamW, model_or_params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)


def _decays(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and not name.startswith(("embed", "pos_embed"))


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


def finite_weights(model: torch.nn.Module) -> bool:
    """Whether every parameter of `model` is finite (no NaN, no inf)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


WEIGHT_GROWTH = 1e6
"""How far past its starting scale a parameter may grow before the weights count as blown up. Healthy
training moves each element by about lr per step, far less than this; one step at lr 1e30 does not."""


def param_norms(module: torch.nn.Module) -> dict[str, float]:
    """{parameter name: its L2 norm}, in float64 (a blown-up fp32 norm would overflow to inf)."""
    return {n: float(torch.linalg.vector_norm(p.detach(), dtype=torch.float64)) for n, p in module.named_parameters()}


def weight_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all parameters together."""
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters())))


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
