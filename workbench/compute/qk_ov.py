"""Weight-space circuits as low-rank `transformer_lens.FactoredMatrix` objects, and their statistics.

Per head (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"):

    full QK circuit        W_E W_Q W_K^T W_E^T       [V, V]  query token x key token
    positional QK circuit  W_pos W_Q W_K^T W_pos^T   [P, P]  query position x key position
    full OV circuit        W_E W_V W_O W_U           [V, V]  attended token x logit
    direct path            W_E W_U                   [V, V]  (once per model)

Each is kept factored (inner dimension d_head, or d_model for the direct path) and is never built
as a V x V matrix: statistics come from the small factors (eigenvalues and singular values) or
from rows computed a chunk at a time.

Norms are folded in as TransformerLens's fold_ln and center_writing_weights do: each norm's
learned scale (w, or 1 + w for Gemma's RMSNorm) goes into the matrices that read from it,
LayerNorm's centring goes into the matrices that write to the residual stream (W_E, W_pos, W_O),
and the per-token 1/σ, a positive scalar, is treated as a constant. Biases are left out of the
circuits. The weights come from `workbench.adapter.folded_weights`, the one place that knows each
architecture (grouped-query attention expanded, Gemma's embedding scale, BLOOM's embedding norm,
Gemma 2's post-norms), and that checks the fold reproduces the model's own queries and logits.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import composition_scores as tl_composition_scores

from workbench.adapter import FoldedWeights, folded_weights
from workbench.errors import InputError

__all__ = ["FoldedWeights", "folded_weights"]  # re-exported: the circuits' input type lives in the adapter


# -- circuits ---------------------------------------------------------------------------------------
def qk_circuit(w: FoldedWeights, layer: int) -> FactoredMatrix:
    """Full QK circuits of a layer's heads: [H, V, V], query token x key token."""
    return FactoredMatrix(w.W_E @ w.W_Q[layer], w.W_K[layer].transpose(-1, -2) @ w.W_E.T)


def pos_qk_circuit(w: FoldedWeights, layer: int) -> FactoredMatrix:
    """Positional QK circuits of a layer's heads: [H, P, P], query position x key position."""
    if w.W_pos is None:
        raise InputError("This model has no learned positional embedding (W_pos), so no positional QK circuit.")
    return FactoredMatrix(w.W_pos @ w.W_Q[layer], w.W_K[layer].transpose(-1, -2) @ w.W_pos.T)


def ov_circuit(w: FoldedWeights, layer: int) -> FactoredMatrix:
    """Full OV circuits of a layer's heads: [H, V, V]. Entry [h, s, d] is how much head h, attending
    to token s, raises the logit of token d (the direct path through the head only)."""
    return FactoredMatrix(w.W_E @ w.W_V[layer], w.W_O[layer] @ w.W_U)


def direct_path(w: FoldedWeights) -> FactoredMatrix:
    """The direct path W_E W_U: [V, V], current token x logit."""
    return FactoredMatrix(w.W_E, w.W_U)


def head_qk(w: FoldedWeights) -> FactoredMatrix:
    """W_Q W_K^T of every head: [L, H, D, D] (residual stream at the query x at the key)."""
    return FactoredMatrix(w.W_Q, w.W_K.transpose(-1, -2))


def head_ov(w: FoldedWeights) -> FactoredMatrix:
    """W_V W_O of every head: [L, H, D, D] (residual stream read x residual stream written)."""
    return FactoredMatrix(w.W_V, w.W_O)


# -- statistics ---------------------------------------------------------------------------------------
def copying_score(circuit: FactoredMatrix) -> torch.Tensor:
    """[...] sum(λ) / sum(|λ|) of each circuit's eigenvalues, real part: the share of eigenvalue
    magnitude that is positive, mapped to [-1, 1]. Near 1, the circuit maps a token to itself
    (copying for OV, attending to the same token for QK); near -1, it suppresses it. The
    eigenvalues of AB are those of the small BA, plus zeros."""
    eig = circuit.eigenvalues
    return eig.sum(dim=-1).real / eig.abs().sum(dim=-1).clamp_min(1e-12)


def singular_values(circuit: FactoredMatrix) -> torch.Tensor:
    """[..., M] the singular values of AB, largest first, from M x M Gram matrices: s² are the
    eigenvalues of G_A^½ G_B G_A^½ with G_A = AᵀA and G_B = BBᵀ. Two matmuls over the long side
    instead of an SVD of a [V, M] factor (which took most of the circuits analysis at a 50k
    vocabulary); computed in float64, as squaring the factors squares their condition number."""
    A, B = circuit.A.double(), circuit.B.double()
    evals, evecs = torch.linalg.eigh(A.transpose(-1, -2) @ A)
    root = evecs @ (evals.clamp_min(0).sqrt()[..., None] * evecs.transpose(-1, -2))  # G_A^½
    sym = root @ (B @ B.transpose(-1, -2)) @ root
    return torch.linalg.eigvalsh((sym + sym.transpose(-1, -2)) / 2).clamp_min(0).sqrt().flip(-1).to(circuit.A.dtype)


def effective_rank(circuit: FactoredMatrix) -> torch.Tensor:
    """[...] exp of the entropy of the normalised singular values (Roy & Vetterli 2007): 1 for a
    rank-1 matrix, the rank for a matrix whose singular values are all equal."""
    s = singular_values(circuit)
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1))


def sample_rows(n: int, max_rows: int, seed: int = 0) -> tuple[torch.Tensor, Optional[str]]:
    """(row indices, note): every row when n <= max_rows, else a seeded random sample of max_rows."""
    if n <= max_rows:
        return torch.arange(n), None
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    return idx, f"measured on a random sample of {max_rows:,} of {n:,} rows (seed {seed})"


def diagonal_fraction(circuit: FactoredMatrix, rows: torch.Tensor, causal: bool = False, offset: int = 0,
                      chunk_elems: int = 1 << 26) -> torch.Tensor:
    """[...] fraction of the given rows whose argmax column is row - offset (offset 0: the diagonal).

    Rows are computed a chunk at a time from the factors (at most `chunk_elems` numbers at once),
    so a 50k-token vocabulary never materialises. `causal`: only columns <= row compete (for
    positional QK circuits, where later keys are masked).
    """
    A, B = circuit.A, circuit.B  # [..., R, M], [..., M, C]
    n_cols = B.shape[-1]
    lead = int(torch.tensor(A.shape[:-2]).prod()) if A.ndim > 2 else 1
    step = max(1, chunk_elems // max(1, n_cols * lead))
    hits = []
    for start in range(0, len(rows), step):
        r = rows[start:start + step].to(A.device)
        block = A[..., r, :] @ B  # [..., r, C]
        if causal:
            cols = torch.arange(n_cols, device=A.device)
            block = block.masked_fill(cols[None, :] > r[:, None], float("-inf"))
        hits.append(block.argmax(dim=-1) == (r - offset))
    return torch.cat(hits, dim=-1).float().mean(dim=-1)


# -- composition ----------------------------------------------------------------------------------------
CompositionMode = Literal["Q", "K", "V"]


def _frobenius_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_A [..., K, K], R_B [..., K, K]) with A = Q_A R_A and B^T = Q_B R_B (reduced QR), so that
    ||A M B||_F = ||R_A M' R_B^T||_F for M' = the product squeezed between them: norms of D x D
    products computed from K x K matrices."""
    return torch.linalg.qr(A).R, torch.linalg.qr(B.transpose(-1, -2)).R


def composition_scores(w: FoldedWeights, mode: CompositionMode) -> torch.Tensor:
    """[L, H, L, H] ||W_A W_B||_F / (||W_A||_F ||W_B||_F) from every head A (its W_V W_O) into every
    head B of a later layer (its W_Q W_K^T for Q, W_K W_Q^T for K, W_V W_O for V); NaN where B is
    not in a later layer. The same numbers as TransformerLens's `composition_scores`, computed
    from d_head x d_head matrices, one sending layer at a time, so no [L, H, L, H, d_head, d_model]
    product is built (4 GB at GPT-2 small)."""
    L, H = w.shape
    left_A, left_B = w.W_V, w.W_O  # [L, H, D, K], [L, H, K, D]
    right_A, right_B = {"Q": (w.W_Q, w.W_K.transpose(-1, -2)), "K": (w.W_K, w.W_Q.transpose(-1, -2)),
                        "V": (w.W_V, w.W_O)}[mode]
    RlA, RlB = _frobenius_factors(left_A, left_B)
    RrA, RrB = _frobenius_factors(right_A, right_B)
    norm_left = torch.linalg.matrix_norm(RlA @ RlB.transpose(-1, -2))  # [L, H]
    norm_right = torch.linalg.matrix_norm(RrA @ RrB.transpose(-1, -2))
    scores = torch.full((L, H, L, H), float("nan"), device=w.W_Q.device)
    for la in range(L - 1):  # senders; receivers only in later layers
        middle = torch.einsum("hkd,lgdj->hlgkj", left_B[la], right_A[la + 1:])  # B_A A_B: [H, L', H, K, K]
        inner = RlA[la][:, None, None] @ middle @ RrB[la + 1:][None].transpose(-1, -2)
        product = torch.linalg.matrix_norm(inner)  # [H, L', H]
        scores[la, :, la + 1:] = product / (norm_left[la][:, None, None] * norm_right[la + 1:][None])
    return scores


def random_composition_baseline(d_model: int, d_head: int, mode: CompositionMode = "K", n_samples: int = 64,
                                seed: int = 0) -> float:
    """Mean composition score between random Gaussian heads of the given shapes (≈ 1/√d_model)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(n_samples, *shape, generator=gen)

    ov_a = FactoredMatrix(rand(d_model, d_head), rand(d_head, d_model))
    right = {"Q": FactoredMatrix(rand(d_model, d_head), rand(d_head, d_model)),
             "K": FactoredMatrix(rand(d_model, d_head), rand(d_head, d_model)).T,
             "V": FactoredMatrix(rand(d_model, d_head), rand(d_head, d_model))}[mode]
    return float(tl_composition_scores(ov_a, right, broadcast_dims=False).mean())
