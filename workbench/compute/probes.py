"""Linear probes on streamed activations, with the controls that tell a readable feature from an
artefact, and the causal test of a probe's direction.

    acts = probe_activations(model, prompts, sites, positions)         # workbench.cache.probing
    split = split_prompts(acts, 0.25, groups=subjects)
    sweep = fit_probes(acts, labels, split, ProbeConfig(kind="logistic"))
    sweep.score_SQ, sweep.low_SQ, sweep.high_SQ      # held-out accuracy (or R²) and its interval
    sweep.control_SQ, sweep.selectivity_SQ           # Hewitt and Liang's control task, and score − control
    sweep.shuffled_SQ                                # the same probe fitted on shuffled labels
    u = sweep.direction(site, position, " Paris")    # a unit vector in the activation space
    ablate_direction(model, task, site, u)           # the metric with u projected out, against random directions

Every probe of a sweep (all sites × positions) is fitted as one batched problem in torch, and beside
each, on the same activations, its control task and its shuffled-label baseline: logistic regression
(binary or multi-class) by L-BFGS on the sum of the probes' losses (they share no parameters, so
the sum's minimum is every probe's own), and linear regression by closed-form ridge. Kept because
it was the faster against scikit-learn's `LogisticRegression` (lbfgs, the same penalty and scaling)
probe by probe, on 2 CPU threads: the `facts` model's sweep (6 layers × 2 positions, each probe
with its 2 baselines, 300 × 128 activations) in 0.20 s against 0.27 s; a random 6-layer width-128
model's 192 probes on 2,000 prompts (benchmarks/probe_speed.py) at 0.004 s a probe against 0.017 s;
held-out accuracies within 0.01 in both. Not everywhere: with fewer training prompts than
dimensions (GPT-2 small's width 768, 225 training prompts) scikit-learn took 0.014 s a probe
against 0.022 s (benchmarks/probe_speed.py --prompts 300 --n-ctx 32); the batched fit is kept for
streaming every site at once and for running on a GPU.

Activations are centred and divided by one scale per probe (their RMS), never per coordinate, so the
L2 penalty treats every direction alike and a probe's weight is a direction of the activation space
itself: `weight_SQCD` maps raw activations to logits (`x @ w + b`), `directions_SQCD` are its unit
vectors.

Shape letters: S hook sites, Q probed positions, N prompts, D the activation width, C a probe's
outputs (1 for a binary probe, the classes of a multi-class one, the targets of a regression),
P probes fitted together, K the tasks fitted beside each other (TASKS), R bootstrap resamples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from workbench import adapter
from workbench.cache.probing import ProbeActivations, PromptSplit
from workbench.cache.tasks import PatchingTask
from workbench.compute.patching.metrics import Metric, resolve_metric
from workbench.config import check_types
from workbench.errors import InputError, check_field
from workbench.model.hooked import HookedModel
from workbench.strict_json import finite, json_array

TASKS = ("labels", "control task", "shuffled labels")
"""What each probe is fitted on: the real labels; Hewitt and Liang's control task (each type, e.g. a
subject or a token, given a label drawn from the real labels' distribution); the labels shuffled
across prompts."""


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of a probe sweep."""

    kind: Literal["logistic", "linear"] = "logistic"
    """'logistic': classification (binary or multi-class), scored by accuracy; 'linear': regression
    of one or more real targets, scored by R² (averaged over the targets)."""
    l2: float = 1e-2
    """L2 penalty on the weights, per prompt: loss = mean loss + l2/2·|w|², with the activations
    scaled to RMS 1."""
    max_iter: int = 200
    """L-BFGS iterations of a logistic fit (a linear fit is closed-form)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of the held-out prompts (or groups) for the confidence interval."""
    confidence: float = 0.95
    """Coverage of the confidence interval."""
    seed: int = 0
    """Seed of the control task, the shuffled labels and the bootstrap."""
    chunk_elements: int = 2 ** 26
    """At most this many activation numbers (probes × prompts × width) are fitted at once."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "ProbeConfig"
        check_field(self.kind in ("logistic", "linear"), own, "kind", self.kind, "'logistic' or 'linear'")
        check_field(math.isfinite(self.l2) and self.l2 > 0, own, "l2", self.l2, "a positive number")
        check_field(self.max_iter >= 1, own, "max_iter", self.max_iter, "a positive integer")
        check_field(self.n_bootstrap >= 10, own, "n_bootstrap", self.n_bootstrap, "an integer of at least 10")
        check_field(0 < self.confidence < 1, own, "confidence", self.confidence, "in (0, 1)")
        check_field(self.chunk_elements >= 1, own, "chunk_elements", self.chunk_elements, "a positive integer")

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "logistic" else "r2"


@dataclass(frozen=True, eq=False)
class ProbeSweep:
    """Probes at every (site, position): held-out score with its interval, the control task and the
    shuffled-label baseline beside it, and each probe's weights in the activation space."""

    config: ProbeConfig
    sites: tuple[str, ...]
    """The S axis: hook names."""
    positions: tuple[str, ...]
    """The Q axis: names of the probed positions."""
    outputs: tuple[str, ...]
    """The C axis of the weights: 'B vs A' for a binary probe (positive towards B), the classes of
    a multi-class probe, the targets of a regression."""
    classes: tuple[str, ...]
    """The label values of a logistic probe, sorted; empty for a regression."""
    score_SQ: np.ndarray
    """Held-out accuracy (logistic) or R² (linear)."""
    low_SQ: np.ndarray
    """Lower end of the bootstrap confidence interval of the held-out score."""
    high_SQ: np.ndarray
    """Upper end of the interval."""
    control_SQ: np.ndarray
    """Held-out score of the same probe on the control task (NaN where it is undefined: a constant target)."""
    shuffled_SQ: np.ndarray
    """Held-out score of the same probe fitted and scored on labels shuffled across prompts."""
    train_SQ: np.ndarray
    """Score on the training prompts (far above the held-out score: the probe memorises)."""
    chance_Q: np.ndarray
    """Accuracy of always answering the training set's most common label (0 for R²)."""
    weight_SQCD: torch.Tensor = field(repr=False)
    """Raw weights: output c of probe (s, q) is x @ weight_SQCD[s, q, c] + bias_SQC[s, q, c]."""
    bias_SQC: torch.Tensor = field(repr=False)
    n_train: int
    n_test: int
    grouped: bool
    """Whether the split held out whole groups (e.g. subjects) rather than prompts."""

    axes = ("site", "position")

    @property
    def metric(self) -> str:
        return self.config.metric

    @property
    def selectivity_SQ(self) -> np.ndarray:
        """Held-out score minus the control task's (Hewitt and Liang's selectivity)."""
        return self.score_SQ - self.control_SQ

    @property
    def directions_SQCD(self) -> torch.Tensor:
        """Unit vectors of the weights."""
        return self.weight_SQCD / self.weight_SQCD.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    def _index(self, site: str, position: str, output: Optional[str]) -> tuple[int, int, int]:
        for axis, names, name in (("site", self.sites, site), ("position", self.positions, position)):
            if name not in names:
                raise InputError(f"The sweep has no {axis} {name!r}; its {axis}s are {list(names)}.")
        if output is None:
            if len(self.outputs) != 1:
                raise InputError(f"This probe has {len(self.outputs)} outputs; name one of {list(self.outputs)}.")
            c = 0
        elif output in self.outputs:
            c = self.outputs.index(output)
        else:
            raise InputError(f"The probe has no output {output!r}; its outputs are {list(self.outputs)}.")
        return self.sites.index(site), self.positions.index(position), c

    def weight(self, site: str, position: str, output: Optional[str] = None) -> torch.Tensor:
        """[D] the raw weight of one output of one probe (a logit or a target per unit of activation)."""
        s, q, c = self._index(site, position, output)
        return self.weight_SQCD[s, q, c]

    def direction(self, site: str, position: str, output: Optional[str] = None) -> torch.Tensor:
        """[D] the unit vector of one probe output's weight: for steering along it or ablating it.
        A binary probe's points towards its second class; a multi-class probe's weights sum to zero
        over the classes, so `direction(..., "b") - direction(..., "a")` leads from a to b."""
        s, q, c = self._index(site, position, output)
        return self.directions_SQCD[s, q, c]

    def best(self, position: str) -> tuple[str, float]:
        """(site, held-out score) of the best site at one position."""
        if position not in self.positions:
            raise InputError(f"The sweep has no position {position!r}; its positions are {list(self.positions)}.")
        q = self.positions.index(position)
        s = int(np.nanargmax(self.score_SQ[:, q]))
        return self.sites[s], float(self.score_SQ[s, q])

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (NaN and ±inf as null): the scores by (site, position), not the weights."""
        arrays = {"score": self.score_SQ, "low": self.low_SQ, "high": self.high_SQ, "control": self.control_SQ,
                  "selectivity": self.selectivity_SQ, "shuffled": self.shuffled_SQ, "train": self.train_SQ}
        return {"kind": self.config.kind, "metric": self.metric, "axes": list(self.axes), "sites": list(self.sites),
                "positions": list(self.positions), "outputs": list(self.outputs), "classes": list(self.classes),
                **{k: json_array(v) for k, v in arrays.items()}, "chance": json_array(self.chance_Q),
                "n_train": self.n_train, "n_test": self.n_test, "grouped": self.grouped,
                "confidence": self.config.confidence, "l2": self.config.l2}


# -- labels and the two baselines ------------------------------------------------------------------------
def _as_array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _labels(labels: Any, kind: str, Q: int, N: int) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """(y [Q, N] class indices (logistic) or [Q, N, T] targets (linear), classes, outputs)."""
    y = _as_array(labels)
    if kind == "logistic":
        if y.ndim == 1 and len(y) == N:
            y = np.broadcast_to(y, (Q, N))
        if y.shape != (Q, N):
            raise InputError(f"Logistic probes take one label per prompt [{N}] or per position and prompt [{Q}, {N}]; "
                             f"got shape {y.shape}.")
        values, codes = np.unique(y, return_inverse=True)
        if len(values) < 2:
            raise InputError(f"The labels have one value ({values[0]!r}); a probe needs at least two classes.")
        classes = tuple(str(v) for v in values)
        outputs = (f"{classes[1]} vs {classes[0]}",) if len(classes) == 2 else classes
        return codes.reshape(Q, N).astype(np.int64), classes, outputs
    y = y.astype(np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim == 2 and len(y) == N:
        y = np.broadcast_to(y, (Q, *y.shape))
    if y.ndim != 3 or y.shape[:2] != (Q, N):
        raise InputError(f"Linear probes take targets [{N}], [{N}, T] or per position [{Q}, {N}, T]; got shape "
                         f"{_as_array(labels).shape}.")
    if not np.isfinite(y).all():
        raise InputError("The regression targets have NaN or infinite values.")
    return np.ascontiguousarray(y), (), tuple(f"target {t}" for t in range(y.shape[-1]))


def _types(types: Any, acts: ProbeActivations, split: PromptSplit) -> np.ndarray:
    """[Q, N] int codes of the control task's types: given, else the split's groups, else the token read."""
    Q, N = len(acts.positions), acts.n_prompts
    if types is None:
        t = np.broadcast_to(split.cluster_N, (Q, N)) if split.grouped else acts.tokens_QN.numpy()
    else:
        t = _as_array(types)
        if t.ndim == 1 and len(t) == N:
            t = np.broadcast_to(t, (Q, N))
        if t.shape != (Q, N):
            raise InputError(f"types must be one per prompt [{N}] or per position and prompt [{Q}, {N}]; got "
                             f"{t.shape}.")
    return np.stack([np.unique(row, return_inverse=True)[1].reshape(N) for row in t])


def control_labels(y: np.ndarray, types_QN: np.ndarray, seed: int) -> np.ndarray:
    """Hewitt and Liang's control task: each type gets the label (or target) of a prompt drawn at
    random, so labels follow the real distribution but depend on nothing but the type. [Q, N, ...]."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(y)
    for q in range(y.shape[0]):
        n_types = int(types_QN[q].max()) + 1
        source = rng.integers(0, y.shape[1], size=n_types)
        out[q] = y[q][source[types_QN[q]]]
    return out


# -- the batched fit -------------------------------------------------------------------------------------
PROBES_PER_FIT = 32
"""Probes fitted together in one batched L-BFGS run."""

def _fit_logistic(X_PND: torch.Tensor, Y: torch.Tensor, C: int, cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [P, D, K·C], b [P, 1, K·C]) minimising Σ_probes (mean cross-entropy + l2/2·|W|²) by L-BFGS.
    Y: [P, N, K] class indices (C > 1) or 0/1 (C = 1).

    Preconditioned: L-BFGS runs on V = Lᵀ W, where L Lᵀ = s·XᵀX/N + l2·I is Böhning's bound on the
    Hessian (s = 1/4 binary, 1/2 multi-class), so the problem it sees has a Hessian between about s
    and 1 in every direction however anisotropic the activations are (a residual stream's outlier
    dimensions would otherwise cost hundreds of iterations)."""
    P, N, D = X_PND.shape
    K = Y.shape[-1]
    s = 0.25 if C == 1 else 0.5
    eye = torch.eye(D, device=X_PND.device)
    L = torch.linalg.cholesky(s * (X_PND.transpose(1, 2) @ X_PND) / N + cfg.l2 * eye)  # [P, D, D]
    Xw_PND = torch.linalg.solve_triangular(L, X_PND.transpose(1, 2), upper=False).transpose(1, 2)  # X L^-T
    Lt = L.transpose(1, 2)
    V = torch.zeros(P, D, K * C, device=X_PND.device, requires_grad=True)
    b = torch.zeros(P, 1, K * C, device=X_PND.device, requires_grad=True)
    target = Y.float() if C == 1 else Y.long()
    opt = torch.optim.LBFGS([V, b], lr=1.0, max_iter=cfg.max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-5, tolerance_change=1e-9)

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.baddbmm(b, Xw_PND, V)  # [P, N, K·C], = X W + b
        if C == 1:
            loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / N
        else:
            loss = F.cross_entropy(logits.view(P * N * K, C), target.reshape(-1), reduction="sum") / N
        W = torch.linalg.solve_triangular(Lt, V, upper=True)
        loss = loss + 0.5 * cfg.l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(loss_fn)
    return torch.linalg.solve_triangular(Lt, V.detach(), upper=True), b.detach()


def _fit_ridge(X_PND: torch.Tensor, Y_PNO: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [P, D, O], b [P, 1, O]) of ridge regression on centred X, closed form: the primal when
    prompts outnumber dimensions, the dual (an N × N system) otherwise."""
    P, N, D = X_PND.shape
    mean_P1O = Y_PNO.mean(1, keepdim=True)
    Yc = (Y_PNO - mean_P1O) / N
    if N >= D:
        A = X_PND.transpose(1, 2) @ X_PND / N + l2 * torch.eye(D, device=X_PND.device)
        W = torch.cholesky_solve(X_PND.transpose(1, 2) @ Yc, torch.linalg.cholesky(A))
    else:
        G = X_PND @ X_PND.transpose(1, 2) / N + l2 * torch.eye(N, device=X_PND.device)
        W = X_PND.transpose(1, 2) @ torch.cholesky_solve(Yc, torch.linalg.cholesky(G))
    return W, mean_P1O


def _cluster_weights(split: PromptSplit, n: int, seed: int) -> torch.Tensor:
    """[N_test, R] how often each held-out prompt is drawn in each bootstrap resample of its clusters."""
    clusters, inverse = np.unique(split.cluster_N[split.test], return_inverse=True)
    rng = np.random.default_rng(seed + 1)
    counts_RG = np.stack([np.bincount(rng.integers(0, len(clusters), len(clusters)), minlength=len(clusters))
                          for _ in range(n)])
    return torch.as_tensor(counts_RG[:, inverse].T, dtype=torch.float32)


def _r2(pred: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
    """R² averaged over targets: pred, y [P, N, T]; with w [N, R], one value per resample [P, R]."""
    if w is None:
        sse = ((pred - y) ** 2).sum(1)
        sst = ((y - y.mean(1, keepdim=True)) ** 2).sum(1)
    else:  # weighted sums over prompts, one set of weights per resample
        sse = torch.einsum("pnt,nr->prt", (pred - y) ** 2, w)
        total = w.sum(0)[None, :, None]
        mean = torch.einsum("pnt,nr->prt", y, w) / total
        sst = torch.einsum("pnt,nr->prt", y * y, w) - total * mean ** 2
    r2 = 1 - sse / sst
    r2 = torch.where(sst > 1e-12 * (sse.abs() + 1), r2, torch.full_like(r2, float("nan")))
    return r2.mean(-1)


def _scores(out_PNKC: torch.Tensor, y_PNK: torch.Tensor, kind: str, C: int,
            weights_NR: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(score [P, K], bootstrap scores of the first task [P, R] when weights are given)."""
    if kind == "logistic":
        pred = (out_PNKC[..., 0] > 0).long() if C == 1 else out_PNKC.argmax(-1)
        correct = (pred == y_PNK.long()).float()  # [P, N, K]
        boot = None if weights_NR is None else (correct[..., 0] @ weights_NR) / weights_NR.sum(0)
        return correct.mean(1), boot
    scores = torch.stack([_r2(out_PNKC[:, :, k], y_PNK[:, :, k]) for k in range(out_PNKC.shape[2])], -1)
    boot = None if weights_NR is None else _r2(out_PNKC[:, :, 0], y_PNK[:, :, 0], weights_NR)
    return scores, boot


@torch.no_grad()
def fit_probes(acts: ProbeActivations, labels: Any, split: PromptSplit, config: ProbeConfig = ProbeConfig(),
               types: Any = None, device: Union[None, str, torch.device] = None) -> ProbeSweep:
    """A probe at every (site, position) of `acts`, trained on `split.train` and scored on `split.test`,
    each beside its control task and shuffled-label baseline, all fitted as one batched problem.

    labels: logistic: [N] or [Q, N] (any values; classes are their sorted set); linear: [N], [N, T]
    or [Q, N, T] numbers. types: what the control task assigns labels to, [N] or [Q, N]; default
    the split's groups (e.g. subjects), else the token at the probed position."""
    S, Q, N, D = acts.acts_SQND.shape
    if len(split.cluster_N) != N:
        raise InputError(f"The split is of {len(split.cluster_N)} prompts and the activations of {N}.")
    cfg = config
    y, classes, outputs = _labels(labels, cfg.kind, Q, N)
    types_QN = _types(types, acts, split)
    perm = np.random.default_rng(cfg.seed + 2).permutation(N)
    y_K = np.stack([y, control_labels(y, types_QN, cfg.seed), y[:, perm]], 2)  # [Q, N, K(, T)]
    K = len(TASKS)
    C = 1 if (cfg.kind == "logistic" and len(classes) == 2) else (len(classes) or y.shape[-1])
    device = torch.device(device) if device is not None else acts.acts_SQND.device
    tr, te = torch.as_tensor(split.train), torch.as_tensor(split.test)
    y_t = torch.as_tensor(y_K, device=device, dtype=torch.float32 if cfg.kind == "linear" else torch.long)
    weights_NR = _cluster_weights(split, cfg.n_bootstrap, cfg.seed).to(device)
    flat_PND = acts.acts_SQND.reshape(S * Q, N, D)
    # at most PROBES_PER_FIT probes share one L-BFGS run: its line search and stopping rule are joint,
    # so a larger batch of independent probes needs more iterations (384 at once fitted 2.7x slower
    # than 12 batches of 32, benchmarks/probe_speed.py)
    per_chunk = max(1, min(PROBES_PER_FIT, cfg.chunk_elements // (N * D)))
    score, boot, train = torch.empty(S * Q, K), torch.empty(S * Q, cfg.n_bootstrap), torch.empty(S * Q, K)
    weight, bias = torch.empty(S * Q, D, C), torch.empty(S * Q, C)
    for start in range(0, S * Q, per_chunk):
        p = torch.arange(start, min(start + per_chunk, S * Q))
        q = p % Q
        # 1. centre and scale each probe's activations by its training prompts
        X_tr = flat_PND[p.to(flat_PND.device)[:, None], tr.to(flat_PND.device)[None]].to(device, torch.float32)
        mean_P1D = X_tr.mean(1, keepdim=True)
        X_tr -= mean_P1D
        scale_P11 = X_tr.pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-12)
        X_tr /= scale_P11
        Y_tr = y_t[q.to(device)][:, tr.to(device)]  # [P, Ntr, K(, T)]
        # 2. fit every probe of the chunk and its two baselines
        if cfg.kind == "logistic":
            W, b = _fit_logistic(X_tr, Y_tr, C, cfg)
        else:
            W, b = _fit_ridge(X_tr, Y_tr.flatten(2), cfg.l2)
        # 3. score on the held-out prompts (with the bootstrap) and on the training prompts
        X_te = (flat_PND[p.to(flat_PND.device)[:, None], te.to(flat_PND.device)[None]].to(device, torch.float32)
                - mean_P1D) / scale_P11
        Y_te = y_t[q.to(device)][:, te.to(device)]
        out_te = torch.baddbmm(b, X_te, W).view(len(p), len(te), K, C)
        s_te, boot_te = _scores(out_te, Y_te, cfg.kind, C, weights_NR)
        out_tr = torch.baddbmm(b, X_tr, W).view(len(p), len(tr), K, C)
        s_tr, _ = _scores(out_tr, Y_tr, cfg.kind, C)
        score[p], boot[p], train[p] = s_te.cpu(), boot_te.cpu(), s_tr.cpu()
        # 4. the real task's weights back in raw activation coordinates (a multi-class probe's centred
        # over its classes, which changes no prediction)
        W_PDC, b_PC = W.view(len(p), D, K, C)[:, :, 0] / scale_P11, b.view(len(p), K, C)[:, 0]
        if cfg.kind == "logistic" and C > 1:
            W_PDC, b_PC = W_PDC - W_PDC.mean(-1, keepdim=True), b_PC - b_PC.mean(-1, keepdim=True)
        weight[p] = W_PDC.cpu()
        bias[p] = (b_PC - (mean_P1D @ W_PDC)[:, 0]).cpu()
    alpha = (1 - cfg.confidence) / 2
    boot_np = boot.numpy().astype(np.float64)
    with warnings.catch_warnings():  # an undefined R² (constant targets) has no interval
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = (np.nanquantile(boot_np, a, axis=1) if np.isfinite(boot_np).any() else np.full(S * Q, np.nan)
                     for a in (alpha, 1 - alpha))
    if cfg.kind == "logistic":
        chance = np.array([np.mean(y[q, split.test] == np.bincount(y[q, split.train]).argmax()) for q in range(Q)])
    else:
        chance = np.zeros(Q)

    def grid(a: Any) -> np.ndarray:
        return np.asarray(a, dtype=np.float64).reshape(S, Q)

    score_np = score.numpy().astype(np.float64)
    return ProbeSweep(cfg, acts.sites, acts.positions, outputs, classes, grid(score_np[:, 0]), grid(low), grid(high),
                      grid(score_np[:, 1]), grid(score_np[:, 2]), grid(train.numpy()[:, 0]), chance,
                      weight.permute(0, 2, 1).reshape(S, Q, C, D).contiguous(), bias.reshape(S, Q, C),
                      len(split.train), len(split.test), split.grouped)


# -- the causal test -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DirectionAblation:
    """A behaviour metric with a direction (or a subspace) projected out of one hook site's
    activations, against random directions (subspaces of the same dimension, unit vectors like the
    probe's) projected out of the same activations."""

    site: str
    metric: str
    positions: str
    """'all' (every token) or 'read' (the task's read positions)."""
    rank: int
    """Dimension of what was projected out: 1 for a direction, k for k directions (a multi-class probe)."""
    clean: float
    """The metric without an edit (mean over the task's prompts)."""
    ablated: float
    """With the direction projected out."""
    random: float
    """Mean over the random directions."""
    random_values: tuple[float, ...]
    removed: float
    """RMS over the edited tokens of the norm of the component removed (|x · u| for one direction)."""
    removed_random: float
    """The same for the random directions (in high dimension a random direction holds a small share)."""

    @property
    def effect(self) -> float:
        """Change of the metric by ablating the direction."""
        return self.ablated - self.clean

    @property
    def random_effect(self) -> float:
        """Mean change of the metric by ablating a random direction."""
        return self.random - self.clean

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "metric": self.metric, "positions": self.positions, "rank": self.rank,
                "clean": finite(self.clean), "ablated": finite(self.ablated), "random": finite(self.random),
                "effect": finite(self.effect), "random_effect": finite(self.random_effect),
                "random_values": [finite(v) for v in self.random_values], "removed": finite(self.removed),
                "removed_random": finite(self.removed_random)}


def _orthonormal(vectors_kD: torch.Tensor) -> torch.Tensor:
    """[k', D] an orthonormal basis of the span of the rows (k' ≤ k: dependent rows, such as a
    multi-class probe's weights, which sum to zero, are dropped)."""
    Q, R = torch.linalg.qr(vectors_kD.T.double())
    keep = R.diagonal().abs() > 1e-4 * R.diagonal().abs().max()
    return Q.T[keep].float()


def _projector(U_kD: torch.Tensor, mask_BL: Optional[torch.Tensor], removed: list) -> Callable:
    """A hook that removes the span of U's (orthonormal) rows from every token's activation, or from
    the tokens where `mask_BL` is 1, and records the mean squared norm of what it removed."""
    def project(act: torch.Tensor, hook: Any) -> torch.Tensor:
        shape = act.shape
        x = act.reshape(*shape[:2], -1) if act.ndim == 4 else act  # per-head [B, L, H, K]: one vector per token
        U = U_kD.to(x.device)
        coef = x.float() @ U.T  # [B, L, k] (or [B·L, k] where a bridge flattens tokens)
        n_tokens = coef[..., 0].numel()
        if mask_BL is not None:
            coef = coef * mask_BL.to(coef.device).view(coef.shape[:-1])[..., None]
            n_tokens = int(mask_BL.sum())
        removed.append(coef.pow(2).sum() / n_tokens)
        return (x - (coef @ U).to(x.dtype)).reshape(shape)
    return project


@torch.no_grad()
def ablate_direction(model: HookedModel, task: PatchingTask, site: str, direction: torch.Tensor,
                     metric: Union[Metric, str] = "auto", positions: Literal["all", "read"] = "all",
                     n_random: int = 8, seed: int = 0) -> DirectionAblation:
    """Project `direction` ([D], any norm; or [k, D], their span) out of `site`'s activations on the
    task's clean prompts, at every token or only at the read positions, and measure the metric
    (a name of `workbench.compute.patching.metrics` or a function); then the same for `n_random`
    random directions (random subspaces of the same dimension), the norm-matched control. The edit
    is checked to take effect at `site` (`adapter.require_edit`)."""
    if positions not in ("all", "read"):
        raise InputError(f"positions must be 'all' or 'read', got {positions!r}.")
    if n_random < 1:
        raise InputError(f"n_random must be at least 1, got {n_random}.")
    adapter.require_edit(model, site, "ablating a direction")
    device = next(model.parameters()).device
    task = task.to(device)
    fn, name = resolve_metric(metric, task)
    vectors = torch.as_tensor(direction, dtype=torch.float32).detach().cpu()
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or not torch.isfinite(vectors).all() or float(vectors.norm()) == 0:
        raise InputError(f"The direction to ablate must be a finite, non-zero [D] or [k, D] tensor; got shape "
                         f"{tuple(vectors.shape)}.")
    U = _orthonormal(vectors)
    mask = None
    if positions == "read":
        mask = torch.zeros(task.clean.shape, device=device)
        mask.scatter_(1, task.position, 1.0)
    gen = torch.Generator().manual_seed(seed)
    randoms = [_orthonormal(torch.randn(len(U), U.shape[1], generator=gen)) for _ in range(n_random)]

    def run(basis: torch.Tensor) -> tuple[float, float]:
        removed: list = []
        logits = model.run_with_hooks(task.clean, fwd_hooks=[(site, _projector(basis.to(device), mask, removed))])
        return float(fn(logits, task).float().mean()), float(torch.stack(removed).mean().sqrt())

    try:  # the width is checked on the first run
        ablated, removed = run(U)
    except RuntimeError as err:
        raise InputError(f"The direction has {U.shape[1]} entries; {site}'s activations do not match it "
                         f"({err}).") from None
    clean = float(fn(model(task.clean), task).float().mean())
    rand = [run(r) for r in randoms]
    return DirectionAblation(site, name, positions, len(U), clean, ablated, float(np.mean([r[0] for r in rand])),
                             tuple(r[0] for r in rand), removed, float(np.sqrt(np.mean([r[1] ** 2 for r in rand]))))
