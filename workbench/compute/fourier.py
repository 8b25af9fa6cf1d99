"""The Fourier analysis of a model trained on (a + b) mod p (Nanda et al. 2023, "Progress measures for
grokking via mechanistic interpretability"): the Fourier basis over Z_p, the spectra of embeddings,
neurons and logits in it, the key frequencies, and the progress measures (restricted and excluded
loss, Gini coefficients of the spectra, the sum of squared weights).

Shape letters: P = p (inputs, answers and the Fourier basis), A and B the two inputs, C the answer,
N = p² the pairs (a-major: pair i = a·p + b), M MLP neurons, H heads, X any trailing axis,
K = p//2 + 1 the frequencies 0 … p//2 (0 is the constant), T the entries of TERMS.

The basis is the constant, then cos(w x) and sin(w x) for w = 2πk/p, k = 1 … p//2, each normalised
(for an even p, sin(πx) is zero and left out), so that it has p orthonormal rows.

    basis_PP, names, freq_P = fourier_basis(p)
    energy_K = frequency_energy(W_E[:p], p)                      # the embedding's spectrum
    keys = find_key_frequencies(energy_K / energy_K.sum(), 10)   # the few with most energy
    shares_XT, variance_X = term_shares(neurons_ABX, p, keys)    # a, b, a + b, a − b, other
    logits_NP, neurons_NM, heads_NH = modular_activations(model, data)   # data: workbench.data.modular
    measures = progress_measures(checkpoint, data, keys)         # restricted/excluded loss, Gini, Σw²
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from workbench.data.modular import ModularData
from workbench.model.hooked import HookedModel
from workbench.model.modular import answer_logits

TERMS = ("a alone", "b alone", "a + b", "a − b", "other frequencies")
"""How the variance of an activation over the p² inputs splits up (constant removed)."""


# -- the basis and spectra -------------------------------------------------------------------------------
def fourier_basis(p: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(basis [P, P] with orthonormal rows over x = 0 ... p-1, row names, frequency k of each row [P];
    0 = constant). Float64."""
    x_P = torch.arange(p, dtype=torch.float64)
    rows, names, freq = [torch.ones(p, dtype=torch.float64)], ["const"], [0]
    for k in range(1, p // 2 + 1):
        w = 2 * math.pi * k / p
        rows.append(torch.cos(w * x_P)), names.append(f"cos {k}"), freq.append(k)
        if 2 * k != p:  # for an even p, sin(πx) is zero everywhere
            rows.append(torch.sin(w * x_P)), names.append(f"sin {k}"), freq.append(k)
    basis_PP = torch.stack(rows)
    return basis_PP / basis_PP.norm(dim=1, keepdim=True), names, np.asarray(freq)


def frequency_energy(values_PX: torch.Tensor, p: int) -> np.ndarray:
    """Energy (squared norm) of each frequency 0 ... p//2 of values over Z_p (first axis) [P, ...] -> [K]."""
    basis_PP, _, freq_P = fourier_basis(p)
    coef_PX = basis_PP @ values_PX.double().reshape(p, -1)
    per_row_P = (coef_PX ** 2).sum(-1).numpy()
    return np.bincount(freq_P, weights=per_row_P, minlength=p // 2 + 1)


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, near 1 when one holds everything."""
    x = np.sort(np.asarray(x, dtype=float))
    n = len(x)
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * x.sum())) if x.sum() > 0 else 0.0


def find_key_frequencies(share_K: np.ndarray, max_n: int) -> list[int]:
    """Frequencies k ≥ 1 with the most energy, cut at the largest gap (ratio) between consecutive sorted
    shares, at most `max_n` of them; sorted."""
    order = np.argsort(-share_K[1:]) + 1
    sorted_share = np.maximum(share_K[order], 1e-30)
    n_max = min(max_n, len(order) - 1)
    gaps = np.log(sorted_share[:n_max]) - np.log(sorted_share[1:n_max + 1])
    n = int(np.argmax(gaps)) + 1
    return sorted(int(k) for k in order[:n])


# -- activations over (a, b) as terms of the key frequencies ----------------------------------------------
def _term_masks(p: int, keys: list[int]) -> dict[str, np.ndarray]:
    """For a 2-D Fourier transform over (a, b) [P, P]: which coefficients belong to 'a alone', 'b alone'
    and the product block of the key frequencies. The four product terms cos/sin(w a)·cos/sin(w b) of one
    frequency are rotated into a + b and a − b by `_plus_minus`."""
    _, _, freq_P = fourier_basis(p)
    fa, fb = freq_P[:, None], freq_P[None, :]
    is_key = np.isin(freq_P, keys)
    return {"a alone": (fb == 0) & is_key[:, None], "b alone": (fa == 0) & is_key[None, :],
            "product": (fa == fb) & is_key[:, None] & (fa > 0)}


def _plus_minus(coef_PPX: torch.Tensor, p: int, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy [X] in cos/sin(w(a + b)) and in cos/sin(w(a − b)) over key w, from 2-D Fourier coefficients.

    cos(w(a±b)) = cos wa cos wb ∓ sin wa sin wb and sin(w(a±b)) = sin wa cos wb ± cos wa sin wb, so with
    unit-norm basis rows the a + b pair is ((cc − ss)/√2, (sc + cs)/√2) and the a − b pair ((cc + ss)/√2,
    (sc − cs)/√2)."""
    _, names, _ = fourier_basis(p)
    idx = {n: i for i, n in enumerate(names)}
    plus_X = torch.zeros(coef_PPX.shape[-1], dtype=torch.float64)
    minus_X = torch.zeros_like(plus_X)
    for k in keys:
        c, s = idx[f"cos {k}"], idx.get(f"sin {k}")
        if s is None:  # k = p/2 for an even p: only cos·cos, which is both at once
            plus_X += coef_PPX[c, c] ** 2
            continue
        cc, ss, sc, cs = coef_PPX[c, c], coef_PPX[s, s], coef_PPX[s, c], coef_PPX[c, s]
        plus_X += ((cc - ss) ** 2 + (sc + cs) ** 2) / 2
        minus_X += ((cc + ss) ** 2 + (sc - cs) ** 2) / 2
    return plus_X, minus_X


def term_shares(values_ABX: torch.Tensor, p: int, keys: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """How the variance over (a, b) of each of X activations [P, P, X] splits into TERMS.

    Returns (shares [X, T], variance [X]); the shares of a row sum to 1."""
    basis_PP, _, _ = fourier_basis(p)
    coef_PPX = torch.einsum("ia,jb,abx->ijx", basis_PP, basis_PP, values_ABX.double())
    energy_PPX = coef_PPX ** 2
    energy_PPX[0, 0] = 0  # the mean is not variance
    total_X = energy_PPX.sum((0, 1))
    masks = {k: torch.from_numpy(v) for k, v in _term_masks(p, keys).items()}
    plus_X, minus_X = _plus_minus(coef_PPX, p, keys)
    parts_4X = torch.stack([energy_PPX[masks["a alone"]].sum(0), energy_PPX[masks["b alone"]].sum(0), plus_X,
                            minus_X])
    other_X = (total_X - parts_4X.sum(0)).clamp(min=0)
    shares_TX = torch.cat([parts_4X, other_X[None]]) / total_X.clamp(min=1e-30)
    return shares_TX.T.numpy(), total_X.numpy()


def dominant_frequency(values_ABX: torch.Tensor, p: int) -> tuple[np.ndarray, np.ndarray]:
    """For each activation [P, P, X]: the frequency [X] whose 1, a, b and a·b terms hold most of its
    variance, and that share [X]. A neuron of the clock circuit is (nearly) a function of one frequency."""
    basis_PP, _, freq_P = fourier_basis(p)
    coef_PPX = torch.einsum("ia,jb,abx->ijx", basis_PP, basis_PP, values_ABX.double())
    energy_PPX = (coef_PPX ** 2).numpy()
    energy_PPX[0, 0] = 0
    total_X = energy_PPX.sum((0, 1))
    K = p // 2 + 1
    per_k_KX = np.zeros((K, energy_PPX.shape[-1]))
    for k in range(1, K):
        rows = freq_P == k
        block = (rows[:, None] | (freq_P == 0)[:, None]) & (rows[None, :] | (freq_P == 0)[None, :])
        block[0, 0] = False
        per_k_KX[k] = energy_PPX[block].sum(0)
    return per_k_KX.argmax(0), per_k_KX.max(0) / np.maximum(total_X, 1e-30)


def strongest_per_frequency(freq_M: np.ndarray, variance_M: np.ndarray, keys: list[int], n: int) -> list[int]:
    """Up to `n` neuron ids: the neuron with the most variance among those of each key frequency (its
    `dominant_frequency`), then the next of each, and so on."""
    shown: list[int] = []
    for rank in range(len(variance_M)):
        for k in keys:
            mine = np.flatnonzero(freq_M == k)
            mine = mine[np.argsort(-variance_M[mine])]
            if rank < len(mine) and len(shown) < n:
                shown.append(int(mine[rank]))
        if len(shown) >= n or rank > n:
            break
    return shown


# -- logits ---------------------------------------------------------------------------------------------
def logit_decomposition(logits_ABC: torch.Tensor, p: int) -> np.ndarray:
    """Share [K] of the variance of the logits (centred over the answer c) held by cos(w_k(a + b − c)),
    k = 0 ... p//2 (index 0 stays 0)."""
    L_ABC = logits_ABC.double()
    L_ABC = L_ABC - L_ABC.mean(-1, keepdim=True)
    total = float((L_ABC ** 2).sum())
    x_P = torch.arange(p, dtype=torch.float64)
    s_ABC = x_P[:, None, None] + x_P[None, :, None] - x_P[None, None, :]
    out_K = np.zeros(p // 2 + 1)
    for k in range(1, p // 2 + 1):
        v_ABC = torch.cos(2 * math.pi * k / p * s_ABC)
        out_K[k] = float((L_ABC * v_ABC).sum()) ** 2 / float((v_ABC ** 2).sum()) / max(total, 1e-30)
    return out_K


def key_projection(logits_NC: torch.Tensor, p: int, keys: list[int]) -> torch.Tensor:
    """The logits [p², C] projected onto cos(w(a + b)) and sin(w(a + b)) over (a, b) for key w (per answer
    c); float64."""
    x_P = torch.arange(p, dtype=torch.float64)
    s_N = (x_P[:, None] + x_P[None, :]).reshape(-1)
    out_NC = torch.zeros_like(logits_NC, dtype=torch.float64)
    for k in keys:
        for u_N in (torch.cos(2 * math.pi * k / p * s_N), torch.sin(2 * math.pi * k / p * s_N)):
            if u_N.norm() < 1e-9:
                continue
            u_N = u_N / u_N.norm()
            out_NC += u_N[:, None] * (u_N @ logits_NC.double())[None, :]
    return out_NC


# -- the model: activations over every pair, and the progress measures -------------------------------------
@torch.no_grad()
def modular_activations(model: HookedModel, data: ModularData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cached forward pass of a one-layer modular-addition model over every pair `a b =` of the task,
    read at `=`: (the logits of the p answers [p², P], MLP neurons [p², M], each head's attention from `=`
    to `a` [p², H]); float64, on the CPU."""
    tokens_N3 = data.tokens_N3.to(model.W_E.device)
    names = ["blocks.0.mlp.hook_post", "blocks.0.attn.hook_pattern"]
    logits, cache = model.run_with_cache(tokens_N3, names_filter=names)
    return (logits[:, -1, :data.p].double().cpu(), cache["blocks.0.mlp.hook_post"][:, -1].double().cpu(),
            cache["blocks.0.attn.hook_pattern"][:, :, -1, 0].double().cpu())


@torch.no_grad()
def progress_measures(model: HookedModel, data: ModularData, keys: list[int]) -> dict[str, float]:
    """The progress measures of one model (a checkpoint) on the task's pairs: train and test loss;
    restricted loss (every pair, only the key frequencies' cos/sin(w(a + b)) directions of the answer
    logits kept); excluded loss (the training pairs, those directions removed); the Gini coefficients of
    the per-frequency norms of W_E and of the neuron-to-logit map W_out W_U; the sum of squared weights."""
    p = data.p
    logits_NP = answer_logits(model, data.tokens_N3.to(model.W_E.device)).double().cpu()
    labels_N = data.labels_N
    proj_NP = key_projection(logits_NP, p, keys)
    tr, te = data.train_idx, data.test_idx
    W_E_PD = model.W_E[:p].detach().double().cpu()
    W_L_MP = (model.blocks[0].mlp.W_out @ model.W_U[:, :p]).detach().double().cpu()
    return {"train_loss": float(F.cross_entropy(logits_NP[tr], labels_N[tr])),
            "test_loss": float(F.cross_entropy(logits_NP[te], labels_N[te])),
            "restricted_loss": float(F.cross_entropy(proj_NP, labels_N)),
            "excluded_loss": float(F.cross_entropy((logits_NP - proj_NP)[tr], labels_N[tr])),
            "gini_embed": gini(np.sqrt(frequency_energy(W_E_PD, p)[1:])),
            "gini_neuron_logit": gini(np.sqrt(frequency_energy(W_L_MP.T, p)[1:])),
            "weights_sq": float(sum((q.detach().double() ** 2).sum() for q in model.parameters()))}
