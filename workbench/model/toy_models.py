"""Toy models of superposition (Elhage et al. 2022), many instances trained at once.

    ReLU output model   x' = ReLU(WᵀW x + b)      W [instances, m, n], b [instances, n], x [instances, batch, n]
    linear model        x' = WᵀW x + b
    absolute value      y = ReLU(W₂ᵀ ReLU(W₁ x)) + b, trained to output |x| (computation in superposition)

n features, m hidden dimensions. Each feature is zero with probability S (its instance's sparsity)
and otherwise uniform on [0, 1] ([-1, 1] for the absolute-value task). The loss is the
importance-weighted squared error, summed over instances so that each instance's gradient is
exactly what it would be if it were trained alone. Every instance has its own sparsity,
importance vector and initialisation seed; a sweep of 50 instances is one batched tensor, not a
Python loop.

The analysis functions at the bottom are pure functions of W.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from workbench.artifacts import atomic_write_json, check_output_folder, write_output_folder
from workbench.config import check_types
from workbench.errors import ConfigError, InputError, check_field

Kind = Literal["relu", "linear"]
Correlation = Literal["none", "correlated", "anticorrelated"]


@dataclass(frozen=True)
class ToyConfig:
    """A batch of toy-model instances and how to train them."""

    n_features: int = 5
    """n: features per input."""
    n_hidden: int = 2
    """m: hidden dimensions."""
    sparsities: tuple[float, ...] = (0.0, 0.7, 0.9, 0.97, 0.99)
    """S of each group of instances: the probability that a feature is zero."""
    n_seeds: int = 1
    """Instances (different initialisations) per sparsity; instances = len(sparsities) * n_seeds."""
    importance: Optional[tuple[float, ...]] = None
    """Importance of each feature (length n); None: importance_decay ** i."""
    importance_decay: float = 0.9
    """Importance of feature i is importance_decay ** i (when `importance` is None)."""
    kind: Kind = "relu"
    """'relu': x' = ReLU(WᵀW x + b); 'linear': x' = WᵀW x + b."""
    correlation: Correlation = "none"
    """'correlated': features come in pairs that are present together; 'anticorrelated': pairs in
    which at most one is present, so a feature's density is at most 1/2 (as in the paper's
    correlated-feature experiments)."""
    n_steps: int = 4000
    """Optimizer steps (the paper's notebook: 10,000 at lr 1e-3; 4,000 at 3e-3 gives the same
    geometry here, see the README)."""
    batch_size: int = 1024
    """Inputs per step, per instance."""
    lr: float = 3e-3
    """Adam learning rate (constant)."""
    seed: int = 0
    """Seed of the data; instance k is initialised from seed * 1000 + k."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "ToyConfig"
        for name in ("n_features", "n_hidden", "n_seeds", "n_steps", "batch_size"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        check_field(len(self.sparsities) > 0 and all(0 <= s < 1 for s in self.sparsities), own, "sparsities",
                    self.sparsities, "one or more sparsities S in [0, 1) (S = 1 would mean no feature is ever "
                    "present)")
        if self.importance is not None:
            check_field(len(self.importance) == self.n_features, own, "importance", self.importance,
                        f"one value per feature: length n_features = {self.n_features}, got {len(self.importance)}")
            check_field(all(i >= 0 for i in self.importance), own, "importance", self.importance, "non-negative")
        check_field(self.importance_decay > 0, own, "importance_decay", self.importance_decay, "positive")
        check_field(self.kind in ("relu", "linear"), own, "kind", self.kind, "'relu' or 'linear'")
        check_field(self.correlation in ("none", "correlated", "anticorrelated"), own, "correlation",
                    self.correlation, "'none', 'correlated' or 'anticorrelated'")
        if self.correlation != "none" and self.n_features % 2:
            raise ConfigError(f"ToyConfig.correlation={self.correlation!r} pairs up features, so n_features must be "
                              f"even; got {self.n_features}.")
        check_field(self.lr > 0, own, "lr", self.lr, "positive")
        if self.n_hidden >= self.n_features:
            warnings.warn(f"ToyConfig: n_hidden={self.n_hidden} ≥ n_features={self.n_features}, so every feature can "
                          "have its own dimension and no superposition is possible.", stacklevel=3)

    @property
    def n_instances(self) -> int:
        return len(self.sparsities) * self.n_seeds

    def instance_sparsity(self) -> torch.Tensor:
        """[instances] S of each instance (sparsity-major: all seeds of the first sparsity, then ...)."""
        return torch.tensor(self.sparsities, dtype=torch.float32).repeat_interleave(self.n_seeds)

    def instance_importance(self) -> torch.Tensor:
        """[instances, n] importance of each feature of each instance."""
        imp = (torch.tensor(self.importance, dtype=torch.float32) if self.importance is not None
               else self.importance_decay ** torch.arange(self.n_features, dtype=torch.float32))
        return imp.expand(self.n_instances, -1).clone()


class ToyModel(nn.Module):
    """I instances of x' = ReLU(WᵀW x + b) (or the linear model), W [I, m, n], b [I, n].

    `kind` is one of 'relu'/'linear' for every instance, or a list with one per instance (so the
    ReLU and linear models of a comparison train in the same batch)."""

    def __init__(self, n_features: int, n_hidden: int, sparsity: torch.Tensor, importance: torch.Tensor,
                 kind: Union[Kind, list[Kind]] = "relu", correlation: Correlation = "none",
                 seeds: Optional[list[int]] = None):
        super().__init__()
        I = len(sparsity)
        if importance.shape != (I, n_features):
            raise InputError(f"importance must have shape [instances, n_features] = [{I}, {n_features}], "
                             f"got {list(importance.shape)}.")
        if not ((sparsity >= 0) & (sparsity < 1)).all():
            raise InputError(f"Every sparsity must lie in [0, 1); got {sparsity.tolist()}.")
        kinds = [kind] * I if isinstance(kind, str) else list(kind)
        if len(kinds) != I or not set(kinds) <= {"relu", "linear"}:
            raise InputError(f"kind must be 'relu', 'linear' or a list of those, one per instance ({I}); got {kind!r}.")
        self.n_features, self.n_hidden, self.correlation = n_features, n_hidden, correlation
        self.register_buffer("relu", torch.tensor([k == "relu" for k in kinds]))
        self.all_relu, self.any_relu = all(k == "relu" for k in kinds), any(k == "relu" for k in kinds)
        self.register_buffer("sparsity", sparsity.float())
        self.register_buffer("importance", importance.float())
        seeds = seeds if seeds is not None else list(range(I))
        bound = math.sqrt(6 / (n_hidden + n_features))  # Xavier-uniform, per instance from its own seed
        W = torch.stack([(torch.rand(n_hidden, n_features, generator=torch.Generator().manual_seed(s)) * 2 - 1)
                         * bound for s in seeds])
        self.W = nn.Parameter(W)
        self.b = nn.Parameter(torch.zeros(I, n_features))

    @classmethod
    def from_config(cls, cfg: ToyConfig) -> "ToyModel":
        return cls(cfg.n_features, cfg.n_hidden, cfg.instance_sparsity(), cfg.instance_importance(), cfg.kind,
                   cfg.correlation, [cfg.seed * 1000 + k for k in range(cfg.n_instances)])

    @property
    def n_instances(self) -> int:
        return self.W.shape[0]

    def hidden(self, x_IBN: torch.Tensor) -> torch.Tensor:
        """h = W x: [I, batch, m]."""
        return torch.bmm(x_IBN, self.W.transpose(1, 2))

    def _activate(self, y_IBN: torch.Tensor) -> torch.Tensor:
        if self.all_relu:
            return F.relu(y_IBN)
        return torch.where(self.relu[:, None, None], F.relu(y_IBN), y_IBN) if self.any_relu else y_IBN

    def forward(self, x_IBN: torch.Tensor) -> torch.Tensor:
        """x' [I, batch, n] from features x [I, batch, n]."""
        return self._activate(torch.baddbmm(self.b[:, None, :], self.hidden(x_IBN), self.W))

    def generate_batch(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """[I, batch, n] features: each present with probability 1 - S and then uniform on [0, 1].

        One uniform u per (batch row, feature) is shared by all instances: a feature is present in
        an instance when u < 1 - S, with value u / (1 - S), which given presence is uniform on
        [0, 1]. Every instance sees exactly the paper's distribution; instances with different S
        see coupled draws, which changes nothing about any one instance's training and makes the
        batch I times cheaper to draw (drawing dominated the step time).
        """
        n, dev = self.n_features, self.W.device
        p_I11 = (1 - self.sparsity)[:, None, None]
        if self.correlation == "none":
            return sparse_uniform(torch.rand(1, batch, n, generator=gen, device=dev), self.sparsity)
        u = torch.rand(1, batch, n // 2, generator=gen, device=dev)  # one draw per pair decides presence
        values = torch.rand(1, batch, n, generator=gen, device=dev)
        if self.correlation == "correlated":  # both of a pair present, or neither
            present = (u < p_I11).repeat_interleave(2, dim=-1)
        else:  # anticorrelated: at most one of a pair, each present with probability 1 - S
            pair_on = u < (2 * p_I11).clamp(max=1)
            first = torch.rand(1, batch, n // 2, generator=gen, device=dev) < 0.5
            present = torch.stack([pair_on & first, pair_on & ~first], dim=-1).flatten(-2)
        return values * present

    def loss(self, x_IBN: torch.Tensor) -> torch.Tensor:
        """Importance-weighted squared error: mean over batch and features, summed over instances."""
        return (self.importance[:, None, :] * (self(x_IBN) - x_IBN) ** 2).mean(dim=(1, 2)).sum()

    @torch.no_grad()
    def loss_and_grads(self, x_IBN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, dL/dW, dL/db) in closed form: the same numbers as `loss(x).backward()` (tested)."""
        return toy_loss_and_grads(self.W.detach(), self.b.detach(), self.importance, self.relu, x_IBN)


def sparse_uniform(u_1BN: torch.Tensor, sparsity_I: torch.Tensor) -> torch.Tensor:
    """[I, B, n] features from shared uniforms u [1, B, n]: present in instance i when u < 1 - S_i,
    with value u / (1 - S_i), which given presence is uniform on [0, 1]."""
    p_I11 = (1 - sparsity_I)[:, None, None]
    return torch.where(u_1BN < p_I11, u_1BN / p_I11, 0.0)


def toy_loss_and_grads(W: torch.Tensor, b: torch.Tensor, importance: torch.Tensor, relu: torch.Tensor,
                       x_IBN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradients of the ReLU (or linear, where `relu` is False) output model, closed form.

    With A = WᵀW, y = x A + b, out = act(y) and G = dL/dy, the gradient is dA = xᵀG and
    dW = W (dA + dAᵀ): one batch-sized matmul instead of autograd's four, and no stored graph.
    A pure function of tensors, so `torch.compile` fuses it (see `train_toy`).
    """
    B, n = x_IBN.shape[1], x_IBN.shape[2]
    y = torch.baddbmm(b[:, None, :], torch.bmm(x_IBN, W.transpose(1, 2)), W)
    relu_I11 = relu[:, None, None]
    diff = torch.where(relu_I11, F.relu(y), y) - x_IBN
    weighted = diff * importance[:, None, :]
    loss = (weighted * diff).sum() / (B * n)
    G = torch.where(relu_I11 & (y <= 0), 0.0, weighted * (2.0 / (B * n)))
    dA = torch.bmm(x_IBN.transpose(1, 2), G)  # [I, n, n]
    return loss, torch.bmm(W, dA + dA.transpose(1, 2)), G.sum(1)


def _toy_step(W: torch.Tensor, b: torch.Tensor, importance: torch.Tensor, relu: torch.Tensor,
              sparsity: torch.Tensor, u_1BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return toy_loss_and_grads(W, b, importance, relu, sparse_uniform(u_1BN, sparsity))


_COMPILED: dict[str, Any] = {}


def _compiled_step(use: bool):
    """`torch.compile` of one training step (data, loss and gradients), or the eager function when
    compiling is off or fails (no C++ compiler, an unsupported platform): then a warning, once."""
    if not use:
        return _toy_step
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(_toy_step, dynamic=None)
    return _COMPILED["step"]


class AbsModel(nn.Module):
    """Computation in superposition: I instances of y = ReLU(W₂ᵀ ReLU(W₁ x)) + b learning |x| from
    sparse x uniform on [-1, 1]. W₁ [I, neurons, n] reads features into neurons."""

    def __init__(self, n_features: int, n_neurons: int, sparsity: torch.Tensor, importance: torch.Tensor,
                 seeds: Optional[list[int]] = None):
        super().__init__()
        I = len(sparsity)
        self.n_features, self.n_neurons = n_features, n_neurons
        self.register_buffer("sparsity", sparsity.float())
        self.register_buffer("importance", importance.float())
        seeds = seeds if seeds is not None else list(range(I))
        bound = math.sqrt(6 / (n_neurons + n_features))
        W = torch.stack([(torch.rand(2, n_neurons, n_features, generator=torch.Generator().manual_seed(s)) * 2 - 1)
                         * bound for s in seeds])  # [I, 2, neurons, n]
        self.W1, self.W2 = nn.Parameter(W[:, 0].clone()), nn.Parameter(W[:, 1].clone())
        self.b = nn.Parameter(torch.zeros(I, n_features))

    @property
    def n_instances(self) -> int:
        return self.W1.shape[0]

    def forward(self, x_IBN: torch.Tensor) -> torch.Tensor:
        acts_IBK = F.relu(torch.bmm(x_IBN, self.W1.transpose(1, 2)))
        return F.relu(torch.baddbmm(self.b[:, None, :], acts_IBK, self.W2))

    def generate_batch(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        """[I, batch, n]: each feature present with probability 1 - S, then uniform on [-1, 1]."""
        p_I11 = (1 - self.sparsity)[:, None, None]
        u = torch.rand(1, batch, self.n_features, generator=gen, device=self.W1.device)
        sign = torch.rand(1, batch, self.n_features, generator=gen, device=self.W1.device) < 0.5
        return torch.where(u < p_I11, torch.where(sign, 1.0, -1.0) * u / p_I11, 0.0)

    def loss(self, x_IBN: torch.Tensor) -> torch.Tensor:
        return (self.importance[:, None, :] * (self(x_IBN) - x_IBN.abs()) ** 2).mean(dim=(1, 2)).sum()


def train_toy(model: Union[ToyModel, AbsModel], n_steps: int, batch_size: int = 1024, lr: float = 1e-3,
              seed: int = 0, progress: bool = True, desc: str = "toy models", compile: bool = True) -> list[float]:
    """Train every instance at once with Adam; returns the summed loss every 100 steps.

    A ToyModel with independent features steps with `toy_loss_and_grads` under `torch.compile`,
    which fuses the dozen elementwise passes over the [I, B, n] batch into a few (about 4× faster per
    step on a 2-core CPU, for a one-off compile of a few seconds); `compile=False` runs it eagerly.
    Other models use autograd."""
    if not isinstance(n_steps, int) or n_steps <= 0:
        raise ConfigError(f"n_steps must be a positive integer (optimizer steps), got {n_steps!r}.")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    fused = isinstance(model, ToyModel) and model.correlation == "none"
    step_fn = _compiled_step(compile) if fused else None
    losses = []
    bar = tqdm(range(n_steps), desc=desc, unit="step", disable=not progress or None, leave=False, mininterval=0.5)
    for step in bar:
        if fused:
            u = torch.rand(1, batch_size, model.n_features, generator=gen, device=device)
            args = (model.W.detach(), model.b.detach(), model.importance, model.relu, model.sparsity, u)
            try:
                loss, model.W.grad, model.b.grad = step_fn(*args)
            except Exception as err:  # compiling failed: say so once, carry on eagerly
                if step_fn is _toy_step:
                    raise
                warnings.warn(f"torch.compile of the toy-model step failed ({type(err).__name__}); training "
                              "eagerly (slower, same results up to rounding).", stacklevel=2)
                _COMPILED["step"] = step_fn = _toy_step
                loss, model.W.grad, model.b.grad = step_fn(*args)
        elif isinstance(model, ToyModel):
            loss, model.W.grad, model.b.grad = model.loss_and_grads(model.generate_batch(batch_size, gen))
        else:
            opt.zero_grad(set_to_none=True)
            loss = model.loss(model.generate_batch(batch_size, gen))
            loss.backward()
        opt.step()
        if step % 100 == 0 or step == n_steps - 1:
            losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def instance_losses(model: Union[ToyModel, AbsModel], n_samples: int = 8192, seed: int = 1) -> torch.Tensor:
    """[instances] each instance's loss on one fresh batch (the same inputs for a fair comparison)."""
    x = model.generate_batch(n_samples, torch.Generator(device=model.importance.device).manual_seed(seed))
    target = x.abs() if isinstance(model, AbsModel) else x
    return (model.importance[:, None, :] * (model(x) - target) ** 2).mean(dim=(1, 2))


def train_config(cfg: ToyConfig, device: Union[str, torch.device] = "cpu", progress: bool = True) -> ToyModel:
    """Build the instances of `cfg` and train them together."""
    model = ToyModel.from_config(cfg).to(device)
    train_toy(model, cfg.n_steps, cfg.batch_size, cfg.lr, cfg.seed, progress,
              desc=f"{cfg.kind} toy models n={cfg.n_features} m={cfg.n_hidden} ×{cfg.n_instances}")
    return model


# -- analysis: pure functions of W [..., m, n] -------------------------------------------------------
def feature_norms(W: torch.Tensor) -> torch.Tensor:
    """[..., n] ‖W_i‖ of each feature's column."""
    return W.norm(dim=-2)


def superposition(W: torch.Tensor) -> torch.Tensor:
    """[..., n] Σ_{j≠i} (Ŵ_i·W_j)²: how much other features overlap feature i's direction (0 for a
    zero column)."""
    unit = W / W.norm(dim=-2, keepdim=True).clamp_min(1e-12)
    overlap = torch.einsum("...mi,...mj->...ij", unit, W) ** 2  # (Ŵ_i·W_j)²
    return overlap.sum(-1) - overlap.diagonal(dim1=-2, dim2=-1)


def feature_dimensionality(W: torch.Tensor) -> torch.Tensor:
    """[..., n] D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)² (Elhage et al. 2022); 0 for a feature that is not
    represented."""
    norms = W.norm(dim=-2)
    unit = W / norms[..., None, :].clamp_min(1e-12)
    denom = (torch.einsum("...mi,...mj->...ij", unit, W) ** 2).sum(-1)
    return torch.where(norms > 1e-6, norms ** 2 / denom.clamp_min(1e-12), torch.zeros_like(norms))


def dims_per_feature(W: torch.Tensor) -> torch.Tensor:
    """[...] m / ‖W‖_F²: hidden dimensions per (unit-norm-equivalent) represented feature."""
    return W.shape[-2] / (W ** 2).sum(dim=(-2, -1)).clamp_min(1e-12)


STICKY_FRACTIONS = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8)
"""Fractions of a dimension per feature at which the paper's sweeps linger (Elhage et al. 2022)."""

PHASES = ("not represented", "dedicated dimension", "superposition")


def classify_phase(W: torch.Tensor, threshold: float = 0.75) -> torch.Tensor:
    """[...] for 2 features in 1 hidden dimension: 0 if the second (extra) feature is not
    represented (‖W₂‖ < threshold), 1 if it has the dimension to itself, 2 if both features share
    it (superposition).

    The threshold is above 1/√2: a linear model's optimum is a projection, ‖W₁‖² + ‖W₂‖² ≤ 1, so
    its even split at equal importance (0.71 each) is not read as two represented features."""
    if W.shape[-2:] != (1, 2):
        raise InputError(f"classify_phase is for 2 features in 1 dimension (W [..., 1, 2]); got {list(W.shape)}.")
    on = feature_norms(W) >= threshold
    return torch.where(~on[..., 1], 0, torch.where(on[..., 0], 2, 1))


def angles_between_neighbours(W: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[k] angles (degrees) between neighbouring represented directions of one m = 2 instance, going
    round the circle."""
    if W.shape[0] != 2:
        raise InputError(f"Angles are for m = 2 instances (W [2, n]); got {list(W.shape)}.")
    keep = feature_norms(W) >= threshold
    theta = torch.atan2(W[1, keep], W[0, keep]).sort().values
    if len(theta) < 2:
        return torch.zeros(0)
    gaps = torch.diff(torch.cat([theta, theta[:1] + 2 * math.pi]))
    return torch.rad2deg(gaps)


def export_ground_truth(model: ToyModel, instances: list[int], out: Union[str, Path], n_samples: int = 65_536,
                        seed: int = 0) -> Path:
    """Write, per chosen instance, hidden activations h = W x [N, m], the true feature activations
    x [N, n] and the true feature directions (W's columns) [n, m]: the ground truth an SAE trained
    on h is scored against. A folder, written aside and moved into place."""
    out = Path(out)
    bad = [i for i in instances if not 0 <= i < model.n_instances]
    if bad:
        raise InputError(f"Instances {bad} are out of range: this model has instances 0–{model.n_instances - 1}.")
    check_output_folder(out, "ground-truth export")
    gen = torch.Generator(device=model.W.device).manual_seed(seed)
    with torch.no_grad():
        x = model.generate_batch(n_samples, gen)  # [I, N, n]
        h = model.hidden(x)
    meta = {"kind": "workbench.ToyGroundTruth", "n_features": model.n_features, "n_hidden": model.n_hidden,
            "n_samples": n_samples, "seed": seed, "instances": {}}

    def build(tmp: Path) -> None:
        for i in instances:
            name = f"instance_{i:03d}"
            save_file({"hidden": h[i].contiguous().cpu(), "features": x[i].contiguous().cpu(),
                       "directions": model.W[i].detach().T.contiguous().cpu()}, str(tmp / f"{name}.safetensors"))
            meta["instances"][name] = {"index": i, "sparsity": float(model.sparsity[i]),
                                       "importance": model.importance[i].tolist()}
        atomic_write_json(tmp / "config.json", meta)

    return write_output_folder(out, "ground-truth export", build)
