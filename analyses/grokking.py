"""Grokking (Nanda et al. 2023, "Progress measures for grokking via mechanistic interpretability"): a
one-layer transformer trained on (a + b) mod p memorises, then generalises through a Fourier "clock"
circuit; this study reads that circuit out of the weights and follows it over the checkpoints.

    workbench run grokking                            # the shipped p = 53 model, about 10 s
    workbench run grokking --model runs/my-grokking --key-frequencies 4 11 17

Shape letters: P = p (inputs, answers and Fourier basis), A and Bb the two inputs, C the answer,
M MLP neurons, H heads, D d_model, K the checkpoints.

The Fourier basis over Z_p is the constant, then cos(w x) and sin(w x) for w = 2πk/p, k = 1 ... (p-1)/2,
each normalised. Everything below is a projection onto it:

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
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from workbench.artifacts import LOG_FILE, list_checkpoints, load_folder, read_log
from workbench.config import check_types
from workbench.errors import InputError, check_field
from workbench.model.hooked import HookedModel
from workbench.report.pipeline import Analysis
from workbench.report.plotting import LAYOUT, captioned, heatmap
from workbench.strict_json import finite, json_array
from workbench.train.modular import (
    ModularData,
    answer_logits,
    is_prime,
    modular_data,
    require_modular,
    warn_if_not_prime,
)

TERMS = ("a alone", "b alone", "a + b", "a − b", "other frequencies")
"""How the variance of an activation over the p² inputs splits up (constant removed)."""


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


# -- the Fourier basis over Z_p ------------------------------------------------------------------------
def fourier_basis(p: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(basis [P, P] with orthonormal rows over x = 0 ... p-1, row names, frequency k of each row; 0 = constant)."""
    x = torch.arange(p, dtype=torch.float64)
    rows, names, freq = [torch.ones(p, dtype=torch.float64)], ["const"], [0]
    for k in range(1, p // 2 + 1):
        w = 2 * math.pi * k / p
        rows.append(torch.cos(w * x)), names.append(f"cos {k}"), freq.append(k)
        if 2 * k != p:  # for an even p, sin(πx) is zero everywhere
            rows.append(torch.sin(w * x)), names.append(f"sin {k}"), freq.append(k)
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True), names, np.asarray(freq)


def frequency_energy(values_PX: torch.Tensor, p: int) -> np.ndarray:
    """Energy (squared norm) of each frequency 0 ... p//2 of values over Z_p (first axis) [P, ...] -> [p//2 + 1]."""
    basis, _, freq = fourier_basis(p)
    coef = basis @ values_PX.double().reshape(p, -1)
    per_row = (coef ** 2).sum(-1).numpy()
    return np.bincount(freq, weights=per_row, minlength=p // 2 + 1)


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, near 1 when one holds everything."""
    x = np.sort(np.asarray(x, dtype=float))
    n = len(x)
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * x.sum())) if x.sum() > 0 else 0.0


def find_key_frequencies(share_K: np.ndarray, max_n: int) -> list[int]:
    """Frequencies k ≥ 1 with the most energy, cut at the largest gap (ratio) between consecutive sorted shares."""
    order = np.argsort(-share_K[1:]) + 1
    sorted_share = np.maximum(share_K[order], 1e-30)
    n_max = min(max_n, len(order) - 1)
    gaps = np.log(sorted_share[:n_max]) - np.log(sorted_share[1:n_max + 1])
    n = int(np.argmax(gaps)) + 1
    return sorted(int(k) for k in order[:n])


def _term_masks(p: int, keys: list[int]) -> dict[str, np.ndarray]:
    """For a 2-D Fourier transform over (a, b) [P, P]: which coefficients belong to each entry of TERMS.
    The four product terms cos/sin(w a)·cos/sin(w b) of one frequency are rotated into a + b and a − b
    by `_plus_minus`, so the masks for those are on the product block."""
    _, _, freq = fourier_basis(p)
    fa, fb = freq[:, None], freq[None, :]
    is_key = np.isin(freq, keys)
    return {"a alone": (fb == 0) & is_key[:, None], "b alone": (fa == 0) & is_key[None, :],
            "product": (fa == fb) & is_key[:, None] & (fa > 0)}


def _plus_minus(coef_PPX: torch.Tensor, p: int, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy [X] in cos/sin(w(a + b)) and in cos/sin(w(a − b)) over key w, from 2-D Fourier coefficients.

    cos(w(a±b)) = cos wa cos wb ∓ sin wa sin wb and sin(w(a±b)) = sin wa cos wb ± cos wa sin wb, so with
    unit-norm basis rows the a + b pair is ((cc − ss)/√2, (sc + cs)/√2) and the a − b pair ((cc + ss)/√2,
    (sc − cs)/√2)."""
    _, names, _ = fourier_basis(p)
    idx = {n: i for i, n in enumerate(names)}
    plus = torch.zeros(coef_PPX.shape[-1], dtype=torch.float64)
    minus = torch.zeros_like(plus)
    for k in keys:
        c, s = idx[f"cos {k}"], idx.get(f"sin {k}")
        if s is None:  # k = p/2 for an even p: only cos·cos, which is both at once
            plus += coef_PPX[c, c] ** 2
            continue
        cc, ss, sc, cs = coef_PPX[c, c], coef_PPX[s, s], coef_PPX[s, c], coef_PPX[c, s]
        plus += ((cc - ss) ** 2 + (sc + cs) ** 2) / 2
        minus += ((cc + ss) ** 2 + (sc - cs) ** 2) / 2
    return plus, minus


def term_shares(values_ABX: torch.Tensor, p: int, keys: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """How the variance over (a, b) of each of X activations [P, P, X] splits into TERMS.

    Returns (shares [X, len(TERMS)], variance [X]); the shares of a row sum to 1."""
    basis, _, _ = fourier_basis(p)
    coef = torch.einsum("ia,jb,abx->ijx", basis, basis, values_ABX.double())
    energy = coef ** 2
    energy[0, 0] = 0  # the mean is not variance
    total = energy.sum((0, 1))
    masks = {k: torch.from_numpy(v) for k, v in _term_masks(p, keys).items()}
    plus, minus = _plus_minus(coef, p, keys)
    parts = torch.stack([energy[masks["a alone"]].sum(0), energy[masks["b alone"]].sum(0), plus, minus])
    other = (total - parts.sum(0)).clamp(min=0)
    shares = torch.cat([parts, other[None]]) / total.clamp(min=1e-30)
    return shares.T.numpy(), total.numpy()


def dominant_frequency(values_ABX: torch.Tensor, p: int) -> tuple[np.ndarray, np.ndarray]:
    """For each activation [P, P, X]: the frequency whose 1, a, b and a·b terms hold most of its variance, and
    that share. A neuron of the clock circuit is (nearly) a function of one frequency."""
    basis, _, freq = fourier_basis(p)
    coef = torch.einsum("ia,jb,abx->ijx", basis, basis, values_ABX.double())
    energy = (coef ** 2).numpy()
    energy[0, 0] = 0
    total = energy.sum((0, 1))
    K = p // 2 + 1
    per_k = np.zeros((K, energy.shape[-1]))
    for k in range(1, K):
        rows = freq == k
        block = (rows[:, None] | (freq == 0)[:, None]) & (rows[None, :] | (freq == 0)[None, :])
        block[0, 0] = False
        per_k[k] = energy[block].sum(0)
    best = per_k.argmax(0)
    return best, per_k.max(0) / np.maximum(total, 1e-30)


def logit_decomposition(logits_ABC: torch.Tensor, p: int) -> np.ndarray:
    """Share of the variance of the logits (centred over the answer c) held by cos(w_k(a + b − c)), k = 0 ... p//2."""
    L = logits_ABC.double()
    L = L - L.mean(-1, keepdim=True)
    total = float((L ** 2).sum())
    a = torch.arange(p, dtype=torch.float64)
    s = a[:, None, None] + a[None, :, None] - a[None, None, :]
    out = np.zeros(p // 2 + 1)
    for k in range(1, p // 2 + 1):
        v = torch.cos(2 * math.pi * k / p * s)
        out[k] = float((L * v).sum()) ** 2 / float((v ** 2).sum()) / max(total, 1e-30)
    return out


def key_projection(logits_NC: torch.Tensor, p: int, keys: list[int]) -> torch.Tensor:
    """The logits [p², C] projected onto cos(w(a + b)) and sin(w(a + b)) over (a, b) for key w (per answer c)."""
    a = torch.arange(p, dtype=torch.float64)
    s = (a[:, None] + a[None, :]).reshape(-1)
    out = torch.zeros_like(logits_NC, dtype=torch.float64)
    for k in keys:
        for u in (torch.cos(2 * math.pi * k / p * s), torch.sin(2 * math.pi * k / p * s)):
            if u.norm() < 1e-9:
                continue
            u = u / u.norm()
            out += u[:, None] * (u @ logits_NC.double())[None, :]
    return out


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
        return {"test_acc_above_half_step": _first(c.steps, c.test_acc > 0.5),
                "test_acc_one_step": _first(c.steps, c.test_acc >= 1.0)}

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
        out["restricted_loss_half_fall_step"] = _half_fall(g.steps, g.restricted_loss, t1)
        out["test_loss_half_fall_step"] = _half_fall(g.steps, g.test_loss, t1)
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


def _first(steps: np.ndarray, mask: np.ndarray) -> Optional[int]:
    hit = np.flatnonzero(mask)
    return int(steps[hit[0]]) if len(hit) else None


def _half_fall(steps: np.ndarray, loss: np.ndarray, after: int) -> Optional[int]:
    """The first step ≥ `after` at which log(loss) has made half its fall from its peak after `after` to its end."""
    keep = steps >= after
    if keep.sum() < 2:
        return None
    s, l = steps[keep], np.log(np.maximum(loss[keep], 1e-30))
    peak = int(np.argmax(l))
    target = (l[peak] + l[-1]) / 2
    hit = np.flatnonzero((np.arange(len(l)) >= peak) & (l <= target))
    return int(s[hit[0]]) if len(hit) else None


def find_phases(c: Curves) -> dict[str, Optional[int]]:
    """Phase boundaries from the training log (see the module docstring)."""
    t1 = _first(c.steps, c.train_acc >= 1.0)
    t2 = _first(c.steps, (c.test_acc > 0.5) & (c.steps >= (t1 or 0)))
    t3 = None
    if t2 is not None:
        after = c.steps >= t2
        l = np.log(np.maximum(c.test_loss[after], 1e-30))
        target = l[0] - 0.9 * (l[0] - l[-1])
        t3 = _first(c.steps[after], l <= target) if l[0] > l[-1] else None
    return {"memorisation_end": t1, "circuit_formation_end": t2, "cleanup_end": t3}


# -- compute -----------------------------------------------------------------------------------------------
@torch.no_grad()
def _activations(model: HookedModel, data: ModularData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Answer logits [p², p], MLP neurons at `=` [p², M] and each head's attention from `=` to `a` [p², H]."""
    tokens = data.tokens_N3.to(model.W_E.device)
    names = ["blocks.0.mlp.hook_post", "blocks.0.attn.hook_pattern"]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    p = data.p
    return (logits[:, -1, :p].double().cpu(), cache["blocks.0.mlp.hook_post"][:, -1].double().cpu(),
            cache["blocks.0.attn.hook_pattern"][:, :, -1, 0].double().cpu())


@torch.no_grad()
def progress_at(model: HookedModel, data: ModularData, keys: list[int]) -> dict[str, float]:
    """The progress measures of one model (a checkpoint)."""
    p = data.p
    logits = answer_logits(model, data.tokens_N3.to(model.W_E.device)).double().cpu()
    labels = data.labels_N
    proj = key_projection(logits, p, keys)
    tr, te = data.train_idx, data.test_idx
    W_E = model.W_E[:p].detach().double().cpu()
    W_L = (model.blocks[0].mlp.W_out @ model.W_U[:, :p]).detach().double().cpu()  # [M, C]
    return {"train_loss": float(F.cross_entropy(logits[tr], labels[tr])),
            "test_loss": float(F.cross_entropy(logits[te], labels[te])),
            "restricted_loss": float(F.cross_entropy(proj, labels)),
            "excluded_loss": float(F.cross_entropy((logits - proj)[tr], labels[tr])),
            "gini_embed": gini(np.sqrt(frequency_energy(W_E, p)[1:])),
            "gini_neuron_logit": gini(np.sqrt(frequency_energy(W_L.T, p)[1:])),
            "weights_sq": float(sum((q.detach().double() ** 2).sum() for q in model.parameters()))}


def _curves(model: HookedModel) -> Optional[Curves]:
    if model.folder is None or not (model.folder / LOG_FILE).exists():
        return None
    rows = [r for r in read_log(model.folder / LOG_FILE) if "test_acc" in r]
    if not rows:
        return None

    def col(key: str) -> np.ndarray:
        return np.asarray([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)

    return Curves(col("step").astype(int), col("train_loss"), col("test_loss"), col("train_acc"), col("test_acc"),
                  col("weight_norm") ** 2)


def compute(model: HookedModel, cfg: GrokkingConfig) -> GrokkingResult:
    """Read the Fourier circuit out of a modular-addition model and, over its checkpoints, the progress measures."""
    train_cfg = require_modular(model)
    p = train_cfg.p
    notes: list[str] = []
    if not is_prime(p):
        warn_if_not_prime(p, "grokking")
        notes.append(f"p={p} is not prime: the Fourier analysis assumes a prime, so read these numbers with care")
    data = modular_data(p, train_cfg.train_fraction, train_cfg.data_seed)
    saved_split = model.meta.get("split_sha256")
    if saved_split is not None and saved_split != data.split_sha256:
        raise InputError(f"The train/test split rebuilt from {model.folder}'s config differs from the one it was "
                         "trained on (another torch version can permute differently). Re-train the model with this "
                         "workbench, or analyse it where it was trained.")
    K = p // 2
    bad = [k for k in cfg.key_frequencies if k > K]
    if bad:
        raise InputError(f"key_frequencies {bad} exceed p // 2 = {K}; frequencies k run from 1 to {K} for p={p}.")
    energy = frequency_energy(model.W_E[:p].detach().cpu(), p)
    embed_share = energy / energy.sum()
    keys = sorted(set(cfg.key_frequencies)) or find_key_frequencies(embed_share, cfg.max_key_frequencies)
    logits, neurons, heads = _activations(model, data)
    grid = lambda t: t.reshape(p, p, -1)  # noqa: E731  [p², X] -> [A, B, X]
    neuron_terms, neuron_var = term_shares(grid(neurons), p, keys)
    neuron_freq, neuron_freq_share = dominant_frequency(grid(neurons), p)
    head_terms, _ = term_shares(grid(heads), p, keys)
    shown = []  # the neuron with the most variance in each key frequency, then the next, ...
    for rank in range(len(neuron_var)):
        for k in keys:
            mine = np.flatnonzero(neuron_freq == k)
            mine = mine[np.argsort(-neuron_var[mine])]
            if rank < len(mine) and len(shown) < cfg.neurons_shown:
                shown.append(int(mine[rank]))
        if len(shown) >= cfg.neurons_shown or rank > cfg.neurons_shown:
            break
    logit_share = logit_decomposition(logits.reshape(p, p, p), p)
    loss_all = F.cross_entropy(logits, data.labels_N, reduction="none")
    correct = (logits.argmax(-1) == data.labels_N).double()
    final = {"train_loss": float(loss_all[data.train_idx].mean()), "test_loss": float(loss_all[data.test_idx].mean()),
             "train_acc": float(correct[data.train_idx].mean()), "test_acc": float(correct[data.test_idx].mean())}
    curves = _curves(model)
    progress = None
    if cfg.progress_measures and model.folder is not None:
        found = list_checkpoints(model.folder)
        if found:
            rows = []
            for _, folder in tqdm(found, desc=f"grokking: progress measures over {len(found)} checkpoints",
                                  unit="checkpoint", dynamic_ncols=True):
                rows.append(progress_at(load_folder(folder, model.W_E.device), data, keys))
            progress = Progress(np.asarray([s for s, _ in found]),
                                *(np.asarray([r[k] for r in rows]) for k in ("train_loss", "test_loss",
                                                                               "restricted_loss", "excluded_loss",
                                                                               "gini_embed", "gini_neuron_logit",
                                                                               "weights_sq")))
        else:
            notes.append("the model's folder has no checkpoints, so there are no progress measures over training")
    if curves is None:
        notes.append("no training log (log.jsonl) beside the model: no curves over training and no phases")
    basis, names, _ = fourier_basis(p)
    return GrokkingResult(cfg, p, train_cfg.train_fraction, is_prime(p), basis.numpy(), names, embed_share, keys,
                          not cfg.key_frequencies, neuron_terms, neuron_var, neuron_freq, neuron_freq_share,
                          grid(neurons)[:, :, shown].permute(2, 0, 1).numpy(), shown, head_terms, logit_share, final,
                          curves, progress, find_phases(curves) if curves is not None else {}, notes)


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
