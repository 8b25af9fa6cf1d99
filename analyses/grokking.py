# Over 500 lines for its Result and nine captioned figures; its computation is in workbench.compute.fourier.
"""Grokking (Nanda et al. 2023, "Progress measures for grokking via mechanistic interpretability"): a
one-layer transformer trained on (a + b) mod p memorises, then generalises through a Fourier "clock"
circuit; this study reads that circuit out of the weights and follows it over the checkpoints.

    workbench run grokking                            # the shipped p = 53 model, about 10 s
    workbench run grokking --model runs/my-grokking --key-frequencies 4 11 17

Shape letters: P = p (inputs, answers and Fourier basis), A and Bb the two inputs, C the answer,
M MLP neurons, H heads, D d_model, K the checkpoints.

The Fourier basis over Z_p is the constant, then cos(w x) and sin(w x) for w = 2πk/p, k = 1 ... (p-1)/2,
each normalised. Everything below is a projection onto it (computed in workbench.compute.fourier; the
phases in workbench.compute.training_curves):

- the embedding's energy per frequency k, and the key frequencies: the few with the most energy,
  cut at the largest gap in the sorted energies (or given with --key-frequencies);
- how much of each MLP neuron's and each head's activation over the p² inputs is a function of the
  key frequencies: the span of 1, cos/sin(w a), cos/sin(w b) and cos/sin(w(a ± b)) for key w;
- the logits as a sum of cos(w(a + b − c)), with the share of their variance the key terms hold;
- over the checkpoints, the paper's progress measures: restricted loss (logits projected onto
  cos/sin(w(a + b)) for key w, on every pair), excluded loss (those directions removed, on the
  training pairs), the sum of squared weights and the Gini coefficient of the Fourier spectrum of
  the embedding and of the neuron-to-logit map. The three phases are marked from the training log:
  memorisation ends when every training pair is right, circuit formation ends (cleanup starts)
  when the test accuracy passes 50%, and cleanup ends when the test loss has made 90% of its fall
  (on a log scale) from the start of cleanup to the end of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import plotly.graph_objects as go
import torch.nn.functional as F
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from workbench.adapter.provenance import checkpoints, run_folder, training_log
from workbench.compute.fourier import (
    TERMS,
    dominant_frequency,
    find_key_frequencies,
    fourier_basis,
    frequency_energy,
    logit_decomposition,
    modular_activations,
    progress_measures,
    strongest_per_frequency,
    term_shares,
)
from workbench.compute.training_curves import first_step, grokking_phases, half_fall_step
from workbench.config import check_types
from workbench.data.modular import ModularData, is_prime, modular_data, warn_if_not_prime
from workbench.errors import InputError, check_field
from workbench.model.hooked import HookedModel
from workbench.report.pipeline import Analysis
from workbench.report.plotting import LAYOUT, captioned, heatmap
from workbench.strict_json import finite, json_array
from workbench.train.modular import require_modular


@dataclass(frozen=True)
class GrokkingConfig:
    """Settings of the grokking study."""

    key_frequencies: tuple[int, ...] = ()
    """The key frequencies k (w = 2πk/p); empty: found from the embedding's Fourier spectrum."""
    max_key_frequencies: int = 10
    """At most this many key frequencies are found automatically."""
    progress_measures: bool = True
    """Compute the progress measures at every checkpoint of the model's folder (when it has checkpoints)."""
    neurons_shown: int = 4
    """MLP neurons whose activation over (a, b) is drawn."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "GrokkingConfig"
        check_field(all(k >= 1 for k in self.key_frequencies), own, "key_frequencies", self.key_frequencies,
                    "frequencies k ≥ 1 (w = 2πk/p), or empty to find them automatically")
        check_field(self.max_key_frequencies >= 1, own, "max_key_frequencies", self.max_key_frequencies,
                    "a positive integer")
        check_field(self.neurons_shown >= 1, own, "neurons_shown", self.neurons_shown, "a positive integer")


# -- the result ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Progress:
    """The progress measures at each checkpoint ([K] arrays)."""

    steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    restricted_loss: np.ndarray
    """Loss on every pair with only the key frequencies' cos/sin(w(a + b)) directions of the logits kept."""
    excluded_loss: np.ndarray
    """Loss on the training pairs with those directions removed."""
    gini_embed: np.ndarray
    """Gini coefficient of the per-frequency norms of W_E."""
    gini_neuron_logit: np.ndarray
    """Gini coefficient of the per-frequency norms of the neuron-to-logit map W_out W_U (over the answer)."""
    weights_sq: np.ndarray
    """Sum of squared weights."""


@dataclass(frozen=True, eq=False)
class Curves:
    """The training log: train and test loss and accuracy, and the sum of squared weights, at every eval step."""

    steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    weights_sq: np.ndarray


@dataclass(frozen=True, eq=False)
class GrokkingResult:
    config: GrokkingConfig
    p: int
    train_fraction: float
    prime: bool
    basis_PP: np.ndarray
    basis_names: list[str]
    embed_share: np.ndarray
    """[p//2 + 1] share of W_E's energy (its rows 0 ... p-1) in each frequency; index 0 is the constant."""
    key_frequencies: list[int]
    keys_found: bool
    """Whether the key frequencies were found automatically (not given)."""
    neuron_terms: np.ndarray
    """[M, len(TERMS)] how each MLP neuron's variance splits up."""
    neuron_variance: np.ndarray
    """[M]"""
    neuron_frequency: np.ndarray
    """[M] the frequency that explains each neuron best."""
    neuron_frequency_share: np.ndarray
    """[M] the share of the neuron's variance that frequency explains."""
    neuron_examples: np.ndarray
    """[neurons_shown, P, P] activations of the strongest neuron of each key frequency (then the next ones)."""
    neuron_example_ids: list[int]
    head_terms: np.ndarray
    """[H, len(TERMS)] how the attention weight from `=` to `a` of each head splits up."""
    logit_share: np.ndarray
    """[p//2 + 1] share of centred logit variance in cos(w_k(a + b − c))."""
    final: dict[str, float]
    curves: Optional[Curves]
    progress: Optional[Progress]
    phases: dict[str, Optional[int]]
    notes: list[str]

    @property
    def neuron_fve(self) -> float:
        """Share of all MLP-neuron variance that the key-frequency terms explain."""
        explained = (self.neuron_terms[:, :4] * self.neuron_variance[:, None]).sum()
        return float(explained / max(self.neuron_variance.sum(), 1e-30))

    @property
    def key_embed_share(self) -> float:
        return float(self.embed_share[self.key_frequencies].sum())

    @property
    def key_logit_share(self) -> float:
        return float(self.logit_share[self.key_frequencies].sum())

    def test_acc_marks(self) -> dict[str, Optional[int]]:
        """Steps at which the test accuracy first passes 0.5 and first reaches 1.0 (None: never in the log)."""
        c = self.curves
        if c is None:
            return {"test_acc_above_half_step": None, "test_acc_one_step": None}
        return {"test_acc_above_half_step": first_step(c.steps, c.test_acc > 0.5),
                "test_acc_one_step": first_step(c.steps, c.test_acc >= 1.0)}

    def progress_checks(self) -> dict[str, Any]:
        """The paper's qualitative claims, measured: when restricted and test loss fall, and whether
        excluded loss rises during circuit formation."""
        g, ph = self.progress, self.phases
        out: dict[str, Any] = {"restricted_loss_half_fall_step": None, "test_loss_half_fall_step": None,
                               "restricted_falls_before_test": None, "excluded_loss_at_memorised": None,
                               "excluded_loss_at_circuit_formed": None, "excluded_rises_in_circuit_formation": None}
        if g is None or ph.get("memorisation_end") is None:
            return out
        t1 = ph["memorisation_end"]
        out["restricted_loss_half_fall_step"] = half_fall_step(g.steps, g.restricted_loss, t1)
        out["test_loss_half_fall_step"] = half_fall_step(g.steps, g.test_loss, t1)
        if out["restricted_loss_half_fall_step"] is not None and out["test_loss_half_fall_step"] is not None:
            r_step, t_step = out["restricted_loss_half_fall_step"], out["test_loss_half_fall_step"]
            out["restricted_falls_before_test"] = r_step < t_step
        t2 = ph.get("circuit_formation_end")
        if t2 is not None:
            e1, e2 = np.interp(np.log([t1, t2]), np.log(np.maximum(g.steps, 1)), np.log(g.excluded_loss))
            out["excluded_loss_at_memorised"], out["excluded_loss_at_circuit_formed"] = math.exp(e1), math.exp(e2)
            out["excluded_rises_in_circuit_formation"] = bool(e2 > e1)
        return out

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"p": self.p, "p_is_prime": self.prime, "train_fraction": self.train_fraction,
                               "key_frequencies": self.key_frequencies, "key_frequencies_found": self.keys_found,
                               "n_key_frequencies": len(self.key_frequencies),
                               "key_embedding_energy_share": self.key_embed_share,
                               "embedding_energy_share": json_array(self.embed_share),
                               "neuron_variance_explained_by_key_terms": self.neuron_fve,
                               "neuron_variance_by_term": dict(zip(TERMS, json_array(
                                   (self.neuron_terms * self.neuron_variance[:, None]).sum(0)
                                   / max(self.neuron_variance.sum(), 1e-30)))),
                               "neurons_with_a_key_frequency": float(np.isin(self.neuron_frequency,
                                                                             self.key_frequencies).mean()),
                               "neurons_mostly_one_frequency": float((self.neuron_frequency_share > 0.8).mean()),
                               "head_variance_explained_by_key_terms": json_array(self.head_terms[:, :4].sum(1)),
                               "logit_variance_explained_by_key_cos_terms": self.key_logit_share,
                               "logit_variance_share_by_frequency": json_array(self.logit_share),
                               **{f"final_{k}": finite(v) for k, v in self.final.items()},
                               **self.test_acc_marks(), **{f"phase_{k}_step": v for k, v in self.phases.items()},
                               **self.progress_checks()}
        g = self.progress
        if g is not None:
            out["progress"] = {"steps": g.steps.tolist(), "train_loss": json_array(g.train_loss, 8),
                               "test_loss": json_array(g.test_loss, 8),
                               "restricted_loss": json_array(g.restricted_loss, 8),
                               "excluded_loss": json_array(g.excluded_loss, 8),
                               "gini_embedding": json_array(g.gini_embed),
                               "gini_neuron_logit": json_array(g.gini_neuron_logit),
                               "sum_squared_weights": json_array(g.weights_sq, 2)}
        out["notes"] = self.notes
        return out

    def headlines(self) -> list[str]:
        out = []
        marks = self.test_acc_marks()
        if marks["test_acc_one_step"] is not None:
            out.append(f"p={self.p}, {self.train_fraction:.0%} of pairs for training: test accuracy passes 50% at step "
                       f"{marks['test_acc_above_half_step']} and reaches 100% at step {marks['test_acc_one_step']} "
                       f"(every training pair right from step {self.phases.get('memorisation_end')})")
        elif marks["test_acc_above_half_step"] is not None:
            out.append(f"p={self.p}: test accuracy passes 50% at step {marks['test_acc_above_half_step']} but never "
                       f"reaches 100% (final {self.final.get('test_acc', float('nan')):.3f})")
        out.append(f"{len(self.key_frequencies)} key frequencies {self.key_frequencies} hold "
                   f"{self.key_embed_share:.0%} of the embedding's energy; the key terms explain {self.neuron_fve:.0%} "
                   f"of MLP neuron variance and cos(w(a+b−c)) for them {self.key_logit_share:.0%} of logit variance")
        ph = self.phases
        if ph.get("memorisation_end") is not None:
            out.append(f"phases: memorisation to step {ph['memorisation_end']}, circuit formation to "
                       f"{ph.get('circuit_formation_end')}, cleanup to {ph.get('cleanup_end')}")
        checks = self.progress_checks()
        if checks["restricted_falls_before_test"] is not None:
            out.append(f"restricted loss makes half its fall by step {checks['restricted_loss_half_fall_step']}, test "
                       f"loss by step {checks['test_loss_half_fall_step']}; excluded loss "
                       f"{checks['excluded_loss_at_memorised']:.3g} → {checks['excluded_loss_at_circuit_formed']:.3g} "
                       "during circuit formation")
        return out + self.notes


# -- compute -----------------------------------------------------------------------------------------------
def _curves(model: HookedModel) -> Optional[Curves]:
    log, _ = training_log(model)
    rows = [r for r in log if "test_acc" in r]
    if not rows:
        return None

    def col(key: str) -> np.ndarray:
        return np.asarray([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)

    return Curves(col("step").astype(int), col("train_loss"), col("test_loss"), col("train_acc"), col("test_acc"),
                  col("weight_norm") ** 2)


def _progress(model: HookedModel, data: ModularData, keys: list[int]) -> Optional[Progress]:
    """The progress measures at every checkpoint of the model's folder (None: it has none)."""
    found, _ = checkpoints(model)
    if not found:
        return None
    rows = [progress_measures(ckpt.load(model.W_E.device), data, keys)
            for ckpt in tqdm(found, desc=f"grokking: progress measures over {len(found)} checkpoints",
                             unit="checkpoint", dynamic_ncols=True)]
    keys_in_order = ("train_loss", "test_loss", "restricted_loss", "excluded_loss", "gini_embed", "gini_neuron_logit",
                     "weights_sq")
    return Progress(np.asarray([c.step for c in found]), *(np.asarray([r[k] for r in rows]) for k in keys_in_order))


def compute(model: HookedModel, cfg: GrokkingConfig) -> GrokkingResult:
    """Read the Fourier circuit out of a modular-addition model and, over its checkpoints, the progress measures."""
    train_cfg = require_modular(model)
    p = train_cfg.p
    notes: list[str] = []
    if not is_prime(p):
        warn_if_not_prime(p, "grokking")
        notes.append(f"p={p} is not prime: the Fourier analysis assumes a prime, so read these numbers with care")
    data = modular_data(p, train_cfg.train_fraction, train_cfg.data_seed)
    folder, _ = run_folder(model)
    saved_split = model.meta.get("split_sha256")
    if saved_split is not None and saved_split != data.split_sha256:
        raise InputError(f"The train/test split rebuilt from {folder}'s config differs from the one it was "
                         "trained on (another torch version can permute differently). Re-train the model with this "
                         "workbench, or analyse it where it was trained.")
    K = p // 2
    bad = [k for k in cfg.key_frequencies if k > K]
    if bad:
        raise InputError(f"key_frequencies {bad} exceed p // 2 = {K}; frequencies k run from 1 to {K} for p={p}.")
    energy = frequency_energy(model.W_E[:p].detach().cpu(), p)
    embed_share = energy / energy.sum()
    keys = sorted(set(cfg.key_frequencies)) or find_key_frequencies(embed_share, cfg.max_key_frequencies)
    logits, neurons, heads = modular_activations(model, data)
    grid = lambda t: t.reshape(p, p, -1)  # noqa: E731  [p², X] -> [A, B, X]
    neuron_terms, neuron_var = term_shares(grid(neurons), p, keys)
    neuron_freq, neuron_freq_share = dominant_frequency(grid(neurons), p)
    head_terms, _ = term_shares(grid(heads), p, keys)
    shown = strongest_per_frequency(neuron_freq, neuron_var, keys, cfg.neurons_shown)
    logit_share = logit_decomposition(logits.reshape(p, p, p), p)
    loss_all = F.cross_entropy(logits, data.labels_N, reduction="none")
    correct = (logits.argmax(-1) == data.labels_N).double()
    final = {"train_loss": float(loss_all[data.train_idx].mean()), "test_loss": float(loss_all[data.test_idx].mean()),
             "train_acc": float(correct[data.train_idx].mean()), "test_acc": float(correct[data.test_idx].mean())}
    curves = _curves(model)
    progress = None
    if cfg.progress_measures and folder is not None:
        progress = _progress(model, data, keys)
        if progress is None:
            notes.append("the model's folder has no checkpoints, so there are no progress measures over training")
    if curves is None:
        notes.append("no training log (log.jsonl) beside the model: no curves over training and no phases")
    phases = {} if curves is None else grokking_phases(curves.steps, curves.train_acc, curves.test_acc,
                                                       curves.test_loss)
    basis, names, _ = fourier_basis(p)
    return GrokkingResult(cfg, p, train_cfg.train_fraction, is_prime(p), basis.numpy(), names, embed_share, keys,
                          not cfg.key_frequencies, neuron_terms, neuron_var, neuron_freq, neuron_freq_share,
                          grid(neurons)[:, :, shown].permute(2, 0, 1).numpy(), shown, head_terms, logit_share, final,
                          curves, progress, phases, notes)


# -- figures: pure functions of the result ---------------------------------------------------------------
PHASE_COLOURS = {"memorisation": "rgba(120,120,120,0.10)", "circuit formation": "rgba(76,120,168,0.12)",
                 "cleanup": "rgba(228,87,86,0.12)"}


def _mark_phases(fig: go.Figure, r: GrokkingResult, rows: int = 1, cols: int = 1) -> None:
    """Shade the three phases (log x axis) on every panel."""
    ph = r.phases
    t1, t2, t3 = ph.get("memorisation_end"), ph.get("circuit_formation_end"), ph.get("cleanup_end")
    last = max(int(x.steps.max()) for x in (r.curves, r.progress) if x is not None)
    # a fixed range: plotly's autorange mis-reads shapes on a log axis
    fig.update_xaxes(range=[-0.05, math.log10(max(last, 2)) + 0.05])
    if t1 is None:
        return
    spans = [("memorisation", 1, t1), ("circuit formation", t1, t2), ("cleanup", t2, t3)]
    for n, (label, x0, x1) in enumerate(spans):
        if x0 is None or x1 is None or x1 <= x0:
            continue
        for row in range(1, rows + 1):
            for col in range(1, cols + 1):
                kw = dict(row=row, col=col) if rows * cols > 1 else {}
                fig.add_vrect(x0=max(x0, 1), x1=x1, fillcolor=PHASE_COLOURS[label], line_width=0, layer="below", **kw)
        # shapes take data values on a log axis, annotations its log10
        fig.add_annotation(x=math.log10(max(x0, 1)), y=0.99 - 0.06 * n, xref="x", yref="y domain", text=label,
                           showarrow=False, xanchor="left", yanchor="top", font=dict(size=10))


def curves_figure(r: GrokkingResult) -> go.Figure:
    """Train and test loss (log-log) and accuracy (log x) from the training log, phases shaded."""
    c = r.curves
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "accuracy"], horizontal_spacing=0.1)
    x = np.maximum(c.steps, 1)
    for name, loss, acc, colour in (("train", c.train_loss, c.train_acc, "#4c78a8"),
                                    ("test", c.test_loss, c.test_acc, "#e45756")):
        fig.add_trace(go.Scatter(x=x, y=loss, name=f"{name} loss", line=dict(color=colour)), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=acc, name=f"{name} accuracy", line=dict(color=colour, dash="dot")),
                      row=1, col=2)
    _mark_phases(fig, r, 1, 2)
    for n, (key, label) in enumerate((("test_acc_above_half_step", "test accuracy > 50%"),
                                      ("test_acc_one_step", "test accuracy 100%"))):
        step = r.test_acc_marks()[key]
        if step is not None:
            fig.add_vline(x=step, line_dash="dot", line_color="#e45756", row=1, col=2)
            fig.add_annotation(x=math.log10(step), y=0.06 + 0.07 * n, xref="x2", yref="y2 domain",
                               text=f"{label}: step {step}", showarrow=False, xanchor="right", font=dict(size=10))
    fig.update_xaxes(type="log", title="training step (full-batch epoch; step 0 drawn at 1)")
    fig.update_yaxes(type="log", title="cross-entropy loss (nats)", row=1, col=1)
    fig.update_yaxes(title="accuracy (share of pairs)", range=[0, 1.05], row=1, col=2)
    fig.update_layout(title=f"p={r.p}: train and test loss and accuracy over training", height=420, **LAYOUT)
    return fig


def basis_figure(r: GrokkingResult) -> go.Figure:
    """The Fourier basis over Z_p: one row per basis function."""
    return heatmap(r.basis_PP, list(range(r.p)), r.basis_names, f"The Fourier basis over Z_{r.p}", "x",
                   "basis function (k: w = 2πk/p)", colorbar="value (unit-norm rows)", colorscale="RdBu", zmid=0,
                   text_fmt=None).update_layout(height=max(400, 9 * r.p))


def embedding_figure(r: GrokkingResult) -> go.Figure:
    """Share of the embedding's energy in each frequency, key frequencies highlighted."""
    ks = list(range(len(r.embed_share)))
    colours = ["#e45756" if k in r.key_frequencies else "#9ecae1" for k in ks]
    labels = ["const"] + [str(k) for k in ks[1:]]
    fig = go.Figure(go.Bar(x=labels, y=r.embed_share, marker_color=colours,
                           hovertemplate="frequency %{x}: %{y:.1%} of the energy<extra></extra>"))
    fig.update_layout(title=f"W_E in the Fourier basis: share of energy per frequency (red: the key frequencies "
                      f"{r.key_frequencies})", xaxis_title="frequency k (w = 2πk/p)",
                      yaxis_title="share of ‖W_E‖² (fraction)", **LAYOUT)
    return fig


def terms_figure(r: GrokkingResult) -> go.Figure:
    """How MLP-neuron and attention variance over (a, b) splits into a, b, a + b, a − b and other terms."""
    neuron = (r.neuron_terms * r.neuron_variance[:, None]).sum(0) / max(r.neuron_variance.sum(), 1e-30)
    rows = {"all MLP neurons (variance-weighted)": neuron,
            **{f"head {h}: attention = → a": r.head_terms[h] for h in range(len(r.head_terms))}}
    fig = go.Figure([go.Bar(name=term, y=list(rows), x=[v[i] for v in rows.values()], orientation="h")
                     for i, term in enumerate(TERMS)])
    fig.update_layout(title=f"Activations as functions of cos/sin of the key frequencies {r.key_frequencies}",
                      barmode="stack", xaxis_title="share of variance over the p² inputs (fraction)",
                      xaxis_range=[0, 1], height=320 + 20 * len(rows), **LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def neuron_clusters_figure(r: GrokkingResult) -> go.Figure:
    """Each neuron's best frequency and the share of its variance it explains."""
    K = len(r.embed_share)
    counts = np.bincount(r.neuron_frequency, minlength=K)
    mean_share = np.array([r.neuron_frequency_share[r.neuron_frequency == k].mean() if counts[k] else 0
                           for k in range(K)])
    live = counts > 0
    fig = go.Figure(go.Bar(x=[str(k) for k in np.flatnonzero(live)], y=counts[live],
                           marker=dict(color=mean_share[live], colorscale="Viridis", cmin=0, cmax=1,
                                       colorbar=dict(title="mean share of variance it explains")),
                           hovertemplate="frequency %{x}: %{y} neurons<extra></extra>"))
    fig.update_layout(title="MLP neurons grouped by the frequency that explains most of their activation",
                      xaxis_title="frequency k", yaxis_title="neurons (count)", **LAYOUT)
    return fig


def neuron_examples_figure(r: GrokkingResult) -> go.Figure:
    """Example neurons over the (a, b) grid, each with the residues in the order of k·x mod p for its frequency k."""
    n = len(r.neuron_example_ids)
    fig = make_subplots(rows=1, cols=n, horizontal_spacing=0.05, subplot_titles=[
        f"neuron {i}: k={r.neuron_frequency[i]} ({r.neuron_frequency_share[i]:.0%})" for i in r.neuron_example_ids])
    for j, i in enumerate(r.neuron_example_ids):
        k = int(r.neuron_frequency[i])
        # x = j·k⁻¹ mod p puts cos(2πk x/p) = cos(2πj/p) at place j: one slow wave instead of k fast ones
        order = [(j2 * pow(k, -1, r.p)) % r.p for j2 in range(r.p)] if k and math.gcd(k, r.p) == 1 else \
            list(range(r.p))
        z = r.neuron_examples[j][np.ix_(order, order)]
        fig.add_trace(go.Heatmap(z=z, x=order, y=order, colorscale="Viridis", showscale=j == n - 1,
                                 colorbar=dict(title="ReLU output (activation)"),
                                 hovertemplate="a=%{y}, b=%{x}: %{z:.2f}<extra></extra>"), row=1, col=j + 1)
        fig.update_xaxes(title="b, in order of k·b mod p", type="category", showticklabels=False, row=1, col=j + 1)
        fig.update_yaxes(title="a, in order of k·a mod p" if j == 0 else "", type="category", showticklabels=False,
                         autorange="reversed", row=1, col=j + 1)
    fig.update_annotations(font_size=12)
    fig.update_layout(title="MLP neurons over every input (a, b), residues reordered by the neuron's frequency",
                      height=400, **LAYOUT)
    return fig


def logits_figure(r: GrokkingResult) -> go.Figure:
    """Share of the centred logits' variance in cos(w_k(a + b − c)) per frequency."""
    ks = list(range(1, len(r.logit_share)))
    colours = ["#e45756" if k in r.key_frequencies else "#9ecae1" for k in ks]
    fig = go.Figure(go.Bar(x=[str(k) for k in ks], y=r.logit_share[1:], marker_color=colours))
    fig.update_layout(title=f"Logits as a sum of cos(w(a+b−c)): the key frequencies hold {r.key_logit_share:.0%} "
                      "of the logit variance", xaxis_title="frequency k (w = 2πk/p)",
                      yaxis_title="share of logit variance (fraction)", **LAYOUT)
    return fig


def progress_figure(r: GrokkingResult) -> go.Figure:
    """Restricted, excluded, train and test loss over the checkpoints, phases shaded."""
    g = r.progress
    x = np.maximum(g.steps, 1)
    fig = go.Figure()
    for name, y, colour, dash in (("train loss", g.train_loss, "#4c78a8", "solid"),
                                  ("test loss", g.test_loss, "#e45756", "solid"),
                                  ("restricted loss (key frequencies only, all pairs)", g.restricted_loss, "#54a24b",
                                   "dash"),
                                  ("excluded loss (key frequencies removed, training pairs)", g.excluded_loss,
                                   "#b279a2", "dash")):
        fig.add_trace(go.Scatter(x=x, y=y, name=name, mode="lines+markers", line=dict(color=colour, dash=dash),
                                 marker=dict(size=5)))
    _mark_phases(fig, r)
    fig.update_xaxes(type="log", title="training step (checkpoint; step 0 drawn at 1)")
    fig.update_yaxes(type="log", title="cross-entropy loss (nats)")
    fig.update_layout(title="Progress measures over training: restricted and excluded loss", height=460, **LAYOUT)
    return fig


def sparsity_figure(r: GrokkingResult) -> go.Figure:
    """Gini coefficients of the Fourier spectra (checkpoints) and the sum of squared weights (log), phases shaded."""
    g = r.progress
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Gini coefficient of the Fourier spectrum",
                                                        "sum of squared weights"], horizontal_spacing=0.1)
    x = np.maximum(g.steps, 1)
    fig.add_trace(go.Scatter(x=x, y=g.gini_embed, name="W_E", mode="lines+markers"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=g.gini_neuron_logit, name="W_out W_U (neuron → logit)", mode="lines+markers"),
                  row=1, col=1)
    if r.curves is not None:
        fig.add_trace(go.Scatter(x=np.maximum(r.curves.steps, 1), y=r.curves.weights_sq, name="Σ w² (training log)",
                                 line=dict(color="black")), row=1, col=2)
    else:
        fig.add_trace(go.Scatter(x=x, y=g.weights_sq, name="Σ w² (checkpoints)", line=dict(color="black")), row=1,
                      col=2)
    _mark_phases(fig, r, 1, 2)
    fig.update_xaxes(type="log", title="training step")
    fig.update_yaxes(title="Gini coefficient (0 = even, 1 = one frequency)", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title="Σ w² over all parameters", row=1, col=2)
    fig.update_layout(title="Progress measures: a sparser Fourier spectrum and smaller weights", height=420, **LAYOUT)
    return fig


def figures(r: GrokkingResult) -> dict[str, go.Figure]:
    """Training curves, the Fourier basis and spectrum, activations and logits in it, and the progress measures."""
    figs: dict[str, go.Figure] = {}
    marks = r.test_acc_marks()
    if r.curves is not None:
        figs["loss and accuracy over training"] = captioned(curves_figure(r), (
            f"Train (blue) and test (red) loss and accuracy on a log step axis. The model gets every training pair "
            f"right by step {r.phases.get('memorisation_end')} while the test set is still mostly wrong; test accuracy "
            f"passes 50% at step {marks['test_acc_above_half_step']} and reaches 100% at step "
            f"{marks['test_acc_one_step']}. Shading: memorisation, circuit formation, cleanup."))
    if r.progress is not None:
        checks = r.progress_checks()
        figs["progress measures: restricted and excluded loss"] = captioned(progress_figure(r), (
            "Restricted loss keeps only the key frequencies' directions of the logits; it falls "
            f"(half-way by step {checks['restricted_loss_half_fall_step']}) before the test loss does "
            f"(step {checks['test_loss_half_fall_step']}): the generalising circuit is there before it shows. "
            "Excluded loss removes those directions: it rises during circuit formation, as the model comes to rely "
            "on them even for the training pairs."))
        figs["progress measures: Fourier sparsity and weight norm"] = captioned(sparsity_figure(r), (
            "Left: the Gini coefficient of the per-frequency norms of the embedding and of the neuron-to-logit map; "
            "it rises as a few frequencies take over. Right: the sum of squared weights, which weight decay drives "
            "down once the memorising parts are no longer needed (cleanup)."))
    figs["the Fourier basis"] = captioned(basis_figure(r), (
        f"The {r.p} orthonormal functions on Z_{r.p} everything here is projected onto: the constant, then cos and sin "
        "of w x for w = 2πk/p. A function of a residue is a vector over x = 0 … p−1; this basis rotates it."))
    figs["embedding spectrum"] = captioned(embedding_figure(r), (
        f"How the embedding's energy spreads over frequencies. A few key frequencies ({r.key_frequencies}, found at "
        f"the largest gap in the sorted energies) hold {r.key_embed_share:.0%} of it: the model embeds each residue "
        "as points on a few circles."))
    figs["activations in the key frequencies"] = captioned(terms_figure(r), (
        "How the variance of each activation over all p² inputs splits into terms of the key frequencies: "
        "cos/sin(w a), cos/sin(w b), cos/sin(w(a+b)), cos/sin(w(a−b)), and everything else. MLP neurons are "
        f"almost entirely functions of the key frequencies ({r.neuron_fve:.0%}); the attention weight on a is "
        "a function of cos/sin(w a) and cos/sin(w b)."))
    figs["neurons by frequency"] = captioned(neuron_clusters_figure(r), (
        "Each MLP neuron grouped by the frequency whose terms explain most of its activation (colour: how much). "
        "The neurons fall into clusters, one per key frequency."))
    figs["example neurons"] = captioned(neuron_examples_figure(r), (
        "The strongest neuron of each key frequency k over every input a (rows) and b (columns), with the residues "
        "in the order of k·x mod p, so that a wave of frequency k becomes one slow wave. Each neuron is then one "
        "smooth periodic bump: a ReLU of waves in a and b, whose products are the cos/sin(w(a±b)) terms above. "
        "Title: the share of its variance that frequency explains."))
    figs["logits in cos(w(a+b−c))"] = captioned(logits_figure(r), (
        "The share of the logits' variance (centred over the answer c) that each term cos(w(a+b−c)) explains. The "
        "key frequencies together hold most of it: the model adds up waves that all peak at c = a + b mod p."))
    return figs


ANALYSIS = Analysis(
    name="grokking",
    description="Modular addition: train/test curves, the Fourier circuit (key frequencies, neurons, logits) and the "
                "progress measures over checkpoints with the phases marked.",
    config_cls=GrokkingConfig, compute=compute, figures=figures, default_models=("modular-addition",),
    title="Grokking and the Fourier circuit", order=70, key_figure="progress measures: restricted and excluded loss",
    intro="A one-layer transformer trained on (a + b) mod p with strong weight decay first memorises its training "
          "pairs, and only much later generalises: it groks (Power et al. 2022). Nanda et al. (<i>Progress measures "
          "for grokking via mechanistic interpretability</i>, 2023) read the algorithm out of the weights: the model "
          "embeds a and b as rotations by a few key frequencies w, multiplies them in the MLP into cos and sin of "
          "w(a + b), and reads the answer off as a sum of cos(w(a + b − c)). Progress measures built from that "
          "circuit show it forming long before the test loss moves, in three phases: memorisation, circuit "
          "formation and cleanup.",
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
