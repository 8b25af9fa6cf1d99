"""Superposition toy models (Elhage et al. 2022): sparsity sweeps, feature geometry, dimensionality,
the phase diagram and computation in superposition, every figure from one command.

    workbench run superposition                                   # the default sweeps, < 1 minute
    workbench run superposition --n-features 40 --n-hidden 10 --sparsities 0 0.9 0.99 --n-steps 5000
    python -m analyses.superposition --kind linear --export ground-truth/

Each sweep trains all its instances (one per sparsity and seed) at once in one batched model; the
analyses are pure functions of the trained weights (workbench.model.toy_models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.config import check_types
from workbench.errors import check_field
from workbench.model.toy_models import (
    PHASES,
    STICKY_FRACTIONS,
    AbsModel,
    ToyConfig,
    ToyModel,
    angles_between_neighbours,
    classify_phase,
    dims_per_feature,
    export_ground_truth,
    feature_dimensionality,
    feature_norms,
    instance_losses,
    superposition,
    train_toy,
)
from workbench.report.pipeline import Analysis
from workbench.report.plotting import LAYOUT, captioned, heatmap

DEFAULT_SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)


@dataclass(frozen=True)
class SuperpositionConfig:
    """Settings of the superposition study."""

    n_features: tuple[int, ...] = (5, 20)
    """n of each sweep (paired with n_hidden)."""
    n_hidden: tuple[int, ...] = (2, 5)
    """m of each sweep."""
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    """Sparsity S (the probability that a feature is zero, in [0, 1)) of each sweep's instances."""
    n_seeds: int = 1
    """Instances per density."""
    importance_decay: float = 0.9
    """Importance of feature i is importance_decay ** i."""
    kind: str = "relu"
    """'relu' (x' = ReLU(WᵀW x + b)) or 'linear' (x' = WᵀW x + b) for the sweeps."""
    correlation: str = "none"
    """'none', 'correlated' or 'anticorrelated' feature pairs in the sweeps."""
    n_steps: int = 4000
    """Adam steps for the sweeps."""
    batch_size: int = 1024
    """Inputs per step and instance."""
    lr: float = 3e-3
    """Adam learning rate."""
    phase_diagram: bool = True
    """Also train 2 features in 1 dimension over a grid of relative importance x density, ReLU and linear."""
    phase_grid: int = 8
    """Grid points per axis of the phase diagram."""
    phase_seeds: int = 3
    """Models per phase-diagram cell; the one with the lowest loss is classified (one seed alone
    sometimes stops in the other local minimum near a phase boundary)."""
    phase_steps: int = 2000
    """Adam steps for the phase-diagram models (batch 512)."""
    phase_lr: float = 1e-2
    """Adam learning rate for the phase-diagram models."""
    computation: bool = True
    """Also train the absolute-value task (computation in superposition)."""
    abs_features: int = 20
    """Features of the absolute-value task."""
    abs_neurons: int = 10
    """Neurons of the absolute-value task."""
    abs_sparsities: tuple[float, ...] = (0.0, 0.9, 0.99)
    """Sparsities of the absolute-value task's instances."""
    abs_steps: int = 4000
    """Adam steps for the absolute-value task."""
    export: str = ""
    """If set, a folder to write ground truth into: per instance of the first sweep, the hidden
    activations h = W x, the true feature activations and the true feature directions."""
    seed: int = 0
    """Seed of data and initialisation."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "SuperpositionConfig"
        check_field(len(self.n_features) == len(self.n_hidden) > 0, own, "n_features/n_hidden",
                    (self.n_features, self.n_hidden), "lists of the same length (one (n, m) pair per sweep)")
        for name in ("sparsities", "abs_sparsities"):
            value = getattr(self, name)
            check_field(len(value) > 0 and all(0 <= s < 1 for s in value), own, name, value,
                        "one or more sparsities S in [0, 1) (S = 1 would mean no feature is ever present)")
        for name in ("n_steps", "phase_steps", "phase_seeds", "abs_steps", "batch_size", "n_seeds", "abs_features",
                     "abs_neurons"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        check_field(isinstance(self.phase_grid, int) and self.phase_grid >= 2, own, "phase_grid", self.phase_grid,
                    "an integer ≥ 2")

    def sweeps(self) -> list[ToyConfig]:
        """One ToyConfig per (n, m) pair (validated there: m ≥ n warns, bad sparsities fail)."""
        return [ToyConfig(n_features=n, n_hidden=m, sparsities=self.sparsities,
                          n_seeds=self.n_seeds, importance_decay=self.importance_decay, kind=self.kind,
                          correlation=self.correlation, n_steps=self.n_steps, batch_size=self.batch_size,
                          lr=self.lr, seed=self.seed)
                for n, m in zip(self.n_features, self.n_hidden)]


@dataclass(frozen=True, eq=False)
class Sweep:
    """One trained sweep: weights and the measures derived from them ([instances, ...] arrays)."""

    n: int
    m: int
    density: np.ndarray
    W: np.ndarray
    """[I, m, n]"""
    b: np.ndarray
    """[I, n]"""
    norms: np.ndarray
    superposition: np.ndarray
    dimensionality: np.ndarray
    dims_per_feature: np.ndarray
    importance: np.ndarray
    final_loss: float

    @classmethod
    def from_model(cls, model: ToyModel, final_loss: float = float("nan")) -> "Sweep":
        W = model.W.detach().float().cpu()
        return cls(model.n_features, model.n_hidden, (1 - model.sparsity).cpu().numpy(), W.numpy(),
                   model.b.detach().cpu().numpy(), feature_norms(W).numpy(), superposition(W).numpy(),
                   feature_dimensionality(W).numpy(), dims_per_feature(W).numpy(),
                   model.importance.cpu().numpy(), final_loss)

    def represented(self) -> np.ndarray:
        """[I] features with ‖W_i‖ ≥ 0.5."""
        return (self.norms >= 0.5).sum(-1)


@dataclass(frozen=True, eq=False)
class SuperpositionResult:
    config: SuperpositionConfig
    sweeps: tuple[Sweep, ...]
    phase_relu: Optional[np.ndarray]
    """[importance, density] class index into PHASES."""
    phase_linear: Optional[np.ndarray]
    phase_importance: np.ndarray
    phase_density: np.ndarray
    abs_W1: Optional[np.ndarray]
    """[I, neurons, features] how strongly each neuron reads each feature."""
    abs_density: np.ndarray
    exported: Optional[str]

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.sweeps:
            key = f"n{s.n}_m{s.m}"
            out[f"{key}_density"] = s.density.round(4).tolist()
            out[f"{key}_represented"] = s.represented().tolist()
            out[f"{key}_dims_per_feature"] = s.dims_per_feature.round(4).tolist()
            out[f"{key}_final_loss"] = s.final_loss
            if s.m == 2:
                out[f"{key}_neighbour_angles"] = [angles_between_neighbours(torch.from_numpy(w)).round().tolist()
                                                  for w in s.W]
        if self.phase_relu is not None:
            out["phase_relu"] = self.phase_relu.tolist()
            out["phase_linear"] = self.phase_linear.tolist()
            out["phase_classes"] = list(PHASES)
        if self.abs_W1 is not None:
            out["abs_monosemantic_neuron_share"] = [float(monosemantic(w).mean()) for w in self.abs_W1]
        out["exported_ground_truth"] = self.exported
        return out

    def headlines(self) -> list[str]:
        out = []
        for s in self.sweeps:
            rep = s.represented()
            out.append(f"n={s.n}, m={s.m}: {rep[0]} features represented when dense, {rep[-1]} at density "
                       f"{s.density[-1]:g}; dimensions per feature {s.dims_per_feature[0]:.2f} → "
                       f"{s.dims_per_feature[-1]:.2f}")
            if s.m == 2:
                angles = angles_between_neighbours(torch.from_numpy(s.W[-1]))
                if len(angles):
                    out.append(f"n={s.n}, m=2 at density {s.density[-1]:g}: neighbouring directions "
                               f"{', '.join(f'{a:.0f}°' for a in angles.tolist())}")
        if self.phase_relu is not None:
            out.append(f"phase diagram (2 features, 1 dimension): superposition in {int((self.phase_relu == 2).sum())} "
                       f"of {self.phase_relu.size} ReLU cells, {int((self.phase_linear == 2).sum())} linear cells")
        if self.abs_W1 is not None:
            shares = ", ".join(f"{monosemantic(w).mean():.0%} at density {d:g}"
                               for w, d in zip(self.abs_W1, self.abs_density))
            out.append(f"absolute-value task: monosemantic neurons {shares}")
        if self.exported:
            out.append(f"ground truth written to {self.exported}")
        return out


def monosemantic(W1: np.ndarray, share: float = 0.9) -> np.ndarray:
    """[neurons] whether one feature holds at least `share` of a (used) neuron's squared input weight."""
    sq = np.maximum(W1, 0) ** 2  # a ReLU neuron is driven by positive weights
    total = sq.sum(-1)
    return np.where(total > 1e-6, sq.max(-1) >= share * np.maximum(total, 1e-12), False)


def _phase_models(cfg: SuperpositionConfig, device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            np.ndarray]:
    g = cfg.phase_grid
    rel_importance = np.geomspace(0.1, 10, g)
    density = np.geomspace(0.01, 1, g)
    imp = torch.tensor([[1.0, r] for r in rel_importance for _ in density], dtype=torch.float32)
    sparsity = torch.tensor([1 - d for _ in rel_importance for d in density], dtype=torch.float32)
    n, k = len(imp), cfg.phase_seeds  # every seed of the ReLU and the linear models in one batch
    model = ToyModel(2, 1, sparsity.repeat(2 * k), imp.repeat(2 * k, 1), kind=(["relu"] * n + ["linear"] * n) * k,
                     seeds=[cfg.seed * 1000 + i for i in range(2 * n * k)]).to(device)
    train_toy(model, cfg.phase_steps, 512, cfg.phase_lr, cfg.seed, desc=f"phase diagram ({2 * n * k} models)")
    best = instance_losses(model).view(k, 2, g, g).argmin(0).cpu()  # lowest-loss seed of each cell
    phases = classify_phase(model.W.detach().cpu()).view(k, 2, g, g).gather(0, best[None])[0].numpy()
    return phases[0], phases[1], rel_importance, density


def compute(device: torch.device, cfg: SuperpositionConfig) -> SuperpositionResult:
    """Train every sweep (batched), the phase diagram and the absolute-value task; measure them."""
    sweeps, first_model = [], None
    for toy in cfg.sweeps():
        model = ToyModel.from_config(toy).to(device)
        losses = train_toy(model, toy.n_steps, toy.batch_size, toy.lr, toy.seed,
                           desc=f"sweep n={toy.n_features} m={toy.n_hidden} ({toy.n_instances} instances)")
        sweeps.append(Sweep.from_model(model, losses[-1]))
        first_model = model if first_model is None else first_model
    exported = None
    if cfg.export:
        exported = str(export_ground_truth(first_model, list(range(first_model.n_instances)), Path(cfg.export),
                                           seed=cfg.seed))
        print(f"Wrote ground truth for {first_model.n_instances} instances (n={first_model.n_features}, "
              f"m={first_model.n_hidden}) to {exported}")
    phase_relu = phase_linear = None
    rel_importance, phase_density = np.zeros(0), np.zeros(0)
    if cfg.phase_diagram:
        phase_relu, phase_linear, rel_importance, phase_density = _phase_models(cfg, device)
    abs_W1, abs_density = None, 1 - np.asarray(cfg.abs_sparsities)
    if cfg.computation:
        sparsity = torch.tensor(cfg.abs_sparsities, dtype=torch.float32)
        imp = (0.8 ** torch.arange(cfg.abs_features, dtype=torch.float32)).expand(len(sparsity), -1)
        model = AbsModel(cfg.abs_features, cfg.abs_neurons, sparsity, imp.clone(),
                         seeds=[cfg.seed * 1000 + k for k in range(len(sparsity))]).to(device)
        train_toy(model, cfg.abs_steps, cfg.batch_size, cfg.lr, cfg.seed, desc="absolute-value task")
        abs_W1 = model.W1.detach().cpu().numpy()
    return SuperpositionResult(cfg, tuple(sweeps), phase_relu, phase_linear, rel_importance, phase_density,
                               abs_W1, abs_density, exported)


# -- figures: pure functions of the result ------------------------------------------------------------
def _grid(n_panels: int, per_row: int = 6) -> tuple[int, int]:
    cols = min(per_row, n_panels)
    return math.ceil(n_panels / cols), cols


def wtw_figure(s: Sweep) -> go.Figure:
    """WᵀW and b of every instance, and ‖W_i‖ coloured by superposition, across the sweep."""
    I = len(s.density)
    rows, cols = _grid(I)
    fig = make_subplots(rows=3 * rows, cols=cols, row_heights=[0.55, 0.1, 0.35] * rows, vertical_spacing=0.03,
                        subplot_titles=[f"1−S = {d:.3g}" if r == 0 else "" for blk in range(rows) for r in range(3)
                                        for d in s.density[blk * cols:(blk + 1) * cols].tolist()
                                        + [float("nan")] * (cols - len(s.density[blk * cols:(blk + 1) * cols]))])
    sup_max = max(float(s.superposition.max()), 1e-6)
    for k in range(I):
        blk, col = divmod(k, cols)
        W = s.W[k]
        fig.add_trace(go.Heatmap(z=W.T @ W, colorscale="RdBu", zmid=0, zmin=-1, zmax=1, showscale=k == 0,
                                 colorbar=dict(title="WᵀW (dot product)", len=0.3, y=0.85)),
                      row=3 * blk + 1, col=col + 1)
        fig.add_trace(go.Heatmap(z=s.b[k][None, :], colorscale="RdBu", zmid=0, zmin=-1, zmax=1, showscale=False),
                      row=3 * blk + 2, col=col + 1)
        fig.add_trace(go.Bar(y=s.norms[k], marker=dict(color=s.superposition[k], colorscale="Viridis", cmin=0,
                                                        cmax=sup_max, showscale=k == 0,
                                                        colorbar=dict(title="Σ(Ŵᵢ·Wⱼ)² (squared length)", len=0.3,
                                                                      y=0.2)),
                             showlegend=False, hovertemplate="feature %{x}: ‖W‖ %{y:.2f}<extra></extra>"),
                      row=3 * blk + 3, col=col + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    for blk in range(rows):
        for col in range(cols):
            fig.update_yaxes(autorange="reversed", row=3 * blk + 1, col=col + 1)
            fig.update_yaxes(range=[0, max(1.3, float(s.norms.max()) * 1.05)], row=3 * blk + 3, col=col + 1)
    fig.update_layout(title=f"n={s.n}, m={s.m}: WᵀW (top), b (strip) and ‖Wᵢ‖ coloured by superposition (bars)",
                      height=330 * rows + 80, **LAYOUT)
    return fig


def geometry_figure(s: Sweep) -> go.Figure:
    """Each m = 2 instance's feature directions as vectors in the plane."""
    I = len(s.density)
    rows, cols = _grid(I)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"1−S = {d:.3g}" for d in s.density])
    lim = max(1.3, float(s.norms.max()) * 1.1)
    colors = [f"hsl({int(300 * i / max(1, s.n - 1))},70%,45%)" for i in range(s.n)]
    for k in range(I):
        r, c = divmod(k, cols)
        for i in range(s.n):
            x, y = s.W[k][:, i]
            fig.add_trace(go.Scatter(x=[0, x], y=[0, y], mode="lines+markers", line=dict(color=colors[i], width=3),
                                     marker=dict(size=[0, 7]),
                                     name=f"feature {i} (importance {s.importance[k, i]:.2f})",
                                     legendgroup=str(i), showlegend=k == 0), row=r + 1, col=c + 1)
        fig.update_xaxes(range=[-lim, lim], row=r + 1, col=c + 1, showticklabels=False)
        fig.update_yaxes(range=[-lim, lim], row=r + 1, col=c + 1, showticklabels=False, scaleanchor=f"x{k + 1}")
    fig.update_layout(title=f"n={s.n}, m=2: feature directions Wᵢ in the hidden plane", height=260 * rows + 100,
                      **LAYOUT)
    return fig


def dimensionality_figure(s: Sweep) -> go.Figure:
    """Feature dimensionality D_i and dimensions per feature against 1/(1−S), with the sticky fractions."""
    x = 1 / s.density
    fig = go.Figure()
    xs = np.repeat(x, s.n) * np.exp(np.tile(np.linspace(-0.04, 0.04, s.n), len(x)))  # jitter to separate dots
    fig.add_trace(go.Scatter(x=xs, y=s.dimensionality.ravel(), mode="markers", name="feature dimensionality Dᵢ",
                             marker=dict(size=6, color=np.tile(np.arange(s.n), len(x)), colorscale="Viridis",
                                         opacity=0.7)))
    fig.add_trace(go.Scatter(x=x, y=s.dims_per_feature, mode="lines+markers", name="dimensions per feature m/‖W‖²",
                             line=dict(color="black", width=3)))
    for f in STICKY_FRACTIONS:
        fig.add_hline(y=f, line_dash="dot", line_color="gray", annotation_text=f"{f:.3g}",
                      annotation_position="right")
    fig.update_xaxes(type="log", title="1/(1−S)")
    fig.update_layout(title=f"n={s.n}, m={s.m}: dimensionality (dotted: the paper's sticky fractions 1, 3/4, 2/3, "
                      "1/2, 2/5, 3/8)", yaxis_title="dimensions", yaxis_range=[0, 1.1], **LAYOUT)
    return fig


def phase_figure(r: SuperpositionResult) -> go.Figure:
    """The phase diagram of the ReLU and linear models side by side."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["ReLU output model", "linear model"], horizontal_spacing=0.12)
    colors = ["#d9d9d9", "#4c78a8", "#e45756"]
    scale = [[0, colors[0]], [1 / 3, colors[0]], [1 / 3, colors[1]], [2 / 3, colors[1]], [2 / 3, colors[2]],
             [1, colors[2]]]
    xs = [f"{d:.2g}" for d in r.phase_density]
    ys = [f"{v:.2g}" for v in r.phase_importance]
    for col, z in ((1, r.phase_relu), (2, r.phase_linear)):
        fig.add_trace(go.Heatmap(z=z, x=xs, y=ys, zmin=-0.5, zmax=2.5, colorscale=scale, showscale=col == 1,
                                 colorbar=dict(title="phase of the extra feature", tickvals=[0, 1, 2],
                                               ticktext=list(PHASES)),
                                 customdata=np.array(PHASES)[z],
                                 hovertemplate="density %{x}, importance %{y}: %{customdata}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title="feature density 1−S", row=1, col=col)
        fig.update_yaxes(title="relative importance of the extra feature", row=1, col=col)
    fig.update_layout(title="Phase diagram: 2 features in 1 dimension; what happens to the extra feature", **LAYOUT)
    return fig


def computation_figure(r: SuperpositionResult) -> go.Figure:
    """Which features each neuron of the absolute-value model reads (W₁), per density."""
    I = len(r.abs_density)
    fig = make_subplots(rows=1, cols=I, subplot_titles=[
        f"1−S = {d:.3g}: {monosemantic(w).mean():.0%} monosemantic" for d, w in zip(r.abs_density, r.abs_W1)])
    lim = float(np.abs(r.abs_W1).max())
    for k in range(I):
        W1 = r.abs_W1[k]
        order = np.lexsort((-np.abs(W1).max(-1), np.abs(W1).argmax(-1)))  # neurons grouped by their main feature
        fig.add_trace(go.Heatmap(z=W1[order], colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim, showscale=k == 0,
                                 colorbar=dict(title="W₁ weight"),
                                 hovertemplate="neuron %{y}, feature %{x}: %{z:.2f}<extra></extra>"), row=1, col=k + 1)
        fig.update_xaxes(title="feature", row=1, col=k + 1)
        fig.update_yaxes(title="neuron" if k == 0 else "", autorange="reversed", row=1, col=k + 1)
    fig.update_layout(title="Computation in superposition (|x| task): W₁, neuron × feature, neurons sorted by their "
                      "main feature", height=420, **LAYOUT)
    return fig


def figures(r: SuperpositionResult) -> dict[str, go.Figure]:
    """Per sweep: WᵀW and norms, geometry (m = 2), dimensionality, superposition per feature; then the
    phase diagram and computation in superposition. Each with its caption."""
    figs: dict[str, go.Figure] = {}
    for s in r.sweeps:
        key = f"n={s.n}, m={s.m}"
        figs[f"{key}: WᵀW, b and feature norms"] = captioned(wtw_figure(s), (
            f"Each column is one model with {s.n} features in {s.m} dimensions, at the feature density 1−S in its "
            "title. Top: WᵀW, the features' dot products (off-diagonal colour is interference). Middle: the bias b. "
            "Bottom: each feature's norm ‖Wᵢ‖, coloured by how much it shares its direction. As features get "
            f"sparser, more than {s.m} get a non-zero norm: superposition."))
        if s.m == 2:
            figs[f"{key}: geometry"] = captioned(geometry_figure(s), (
                "Each feature's direction Wᵢ in the 2-dimensional hidden space, one panel per density. Dense: two "
                "orthogonal features and the rest dropped. Sparse: all of them, spread evenly around the circle (a "
                "pentagon for five), as in Toy Models of Superposition's first figure."))
        figs[f"{key}: dimensionality"] = captioned(dimensionality_figure(s), (
            "Feature dimensionality Dᵢ (the share of a dimension feature i gets) and the dimensions per feature "
            "against 1/(1−S), with dashed lines at the paper's sticky fractions (1, 3/4, 2/3, 1/2, 2/5, 3/8). "
            "Points pile up on those lines: features settle into regular geometric configurations."))
        figs[f"{key}: superposition per feature"] = captioned(heatmap(
            s.superposition, list(range(s.n)), [f"{d:.3g}" for d in s.density],
            "Σ_{j≠i}(Ŵᵢ·Wⱼ)² per feature and density", "feature", "density 1−S",
            colorbar="Σ_{j≠i}(Ŵᵢ·Wⱼ)² (squared length)", colorscale="Viridis"), (
            "How much each feature's direction overlaps the others (0: it has a dimension to itself). Rows go from "
            "dense (top) to sparse; overlap appears as features get sparser, first among the least important."))
    if r.phase_relu is not None:
        figs["phase diagram"] = captioned(phase_figure(r), (
            "Two features in one dimension, over the extra feature's relative importance and its density: whether "
            "it is dropped, gets the dimension, or shares it in superposition. The ReLU model superposes sparse "
            "features; the linear model never does (right)."))
    if r.abs_W1 is not None:
        figs["computation in superposition"] = captioned(computation_figure(r), (
            "The |x| task: W₁ (neuron × feature), neurons sorted by their main feature. Dense: most neurons read "
            "one feature (monosemantic). Sparse: neurons read several features at once (polysemantic), computing "
            "in superposition."))
    return figs


ANALYSIS = Analysis(
    name="superposition",
    description="Toy models of superposition: sparsity sweeps (batched), WᵀW, geometry, dimensionality, the "
                "phase diagram and computation in superposition.",
    config_cls=SuperpositionConfig, compute=None, compute_toys=compute, figures=figures,
    title="Superposition", order=40,
    intro="Models can represent more features than they have dimensions, by giving sparse features directions "
          "that overlap: superposition (Elhage et al., <i>Toy Models of Superposition</i>, 2022). These toy models "
          "compress n features into m &lt; n dimensions and reconstruct them through a ReLU; as features get "
          "sparser, more of them are represented, in regular geometric arrangements. This is why single neurons "
          "are often polysemantic, and what sparse autoencoders try to undo.",
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
