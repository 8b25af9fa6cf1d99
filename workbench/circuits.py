"""Weight-space circuits as low-rank `transformer_lens.FactoredMatrix` objects, and their statistics.

Per head (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"):

    full QK circuit        W_E W_Q W_K^T W_E^T       [V, V]  query token x key token
    positional QK circuit  W_pos W_Q W_K^T W_pos^T   [P, P]  query position x key position
    full OV circuit        W_E W_V W_O W_U           [V, V]  attended token x logit
    direct path            W_E W_U                   [V, V]  (once per model)

Each is kept factored (inner dimension d_head, or d_model for the direct path) and is never built
as a V x V matrix: statistics come from the small factors (eigenvalues and singular values) or
from rows computed a chunk at a time.

LayerNorm is folded in as TransformerLens's fold_ln and center_writing_weights do: each norm's
learned scale goes into the matrices that read from it, LayerNorm's centring goes into the
matrices that write to the residual stream (W_E, W_pos, W_O), and the per-token 1/σ, a positive
scalar, is treated as a constant. Biases are left out of the circuits. Works on workbench models
and on TransformerBridge models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import composition_scores as tl_composition_scores


def _norm_param(norm: Any, names: tuple[str, ...]) -> Optional[torch.Tensor]:
    for owner in (norm, getattr(norm, "_original_component", None)):
        for attr in names:
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, torch.Tensor):
                return value
    return None


def ln_weight(norm: Any) -> Optional[torch.Tensor]:
    """The learned scale [D] of a normalization module (workbench or Hugging Face), or None."""
    return _norm_param(norm, ("w", "weight"))


def ln_bias(norm: Any) -> Optional[torch.Tensor]:
    """The learned bias [D] of a normalization module, or None."""
    return _norm_param(norm, ("b", "bias"))


def centres(model: Any) -> bool:
    """Whether the model's normalization subtracts the mean (LayerNorm does; RMSNorm does not)."""
    return str(getattr(model.cfg, "normalization_type", None) or "").upper().startswith("LN")


def _centre(W_ND: torch.Tensor) -> torch.Tensor:
    return W_ND - W_ND.mean(dim=-1, keepdim=True)


@dataclass(frozen=True)
class FoldedWeights:
    """A model's weights with its normalization folded in (fp32, detached). Shapes as in TransformerLens."""

    W_E: torch.Tensor
    """[V, D]"""
    W_pos: Optional[torch.Tensor]
    """[P, D], or None for a model without learned positions (e.g. rotary)."""
    W_Q: torch.Tensor
    """[L, H, D, K]"""
    W_K: torch.Tensor
    """[L, H, D, K]"""
    W_V: torch.Tensor
    """[L, H, D, K]"""
    W_O: torch.Tensor
    """[L, H, K, D]"""
    W_U: torch.Tensor
    """[D, V]"""

    @property
    def shape(self) -> tuple[int, int]:
        """(n_layers, n_heads)"""
        return self.W_Q.shape[0], self.W_Q.shape[1]


def folded_weights(model: Any) -> FoldedWeights:
    """Fold each layer's ln1 scale into its W_Q, W_K, W_V, ln_final's scale into W_U, and (for
    LayerNorm) centre W_E, W_pos and W_O."""
    def get(name: str) -> torch.Tensor:
        return getattr(model, name).detach().float()

    W_Q, W_K, W_V, W_O, W_E, W_U = (get(n) for n in ("W_Q", "W_K", "W_V", "W_O", "W_E", "W_U"))
    try:
        W_pos: Optional[torch.Tensor] = get("W_pos")
    except (AttributeError, NotImplementedError, KeyError):
        W_pos = None
    scales = [ln_weight(getattr(block, "ln1", None)) for block in model.blocks]
    if all(s is not None for s in scales):
        scale_L1D1 = torch.stack([s.detach().float() for s in scales])[:, None, :, None]
        W_Q, W_K, W_V = W_Q * scale_L1D1, W_K * scale_L1D1, W_V * scale_L1D1
    final = ln_weight(getattr(model, "ln_final", None))
    if final is not None:
        W_U = final.detach().float()[:, None] * W_U
    if centres(model):
        W_E, W_O = _centre(W_E), _centre(W_O)
        W_pos = _centre(W_pos) if W_pos is not None else None
    return FoldedWeights(W_E, W_pos, W_Q, W_K, W_V, W_O, W_U)


# -- circuits ---------------------------------------------------------------------------------------
def qk_circuit(w: FoldedWeights, layer: int) -> FactoredMatrix:
    """Full QK circuits of a layer's heads: [H, V, V], query token x key token."""
    return FactoredMatrix(w.W_E @ w.W_Q[layer], w.W_K[layer].transpose(-1, -2) @ w.W_E.T)


def pos_qk_circuit(w: FoldedWeights, layer: int) -> FactoredMatrix:
    """Positional QK circuits of a layer's heads: [H, P, P], query position x key position."""
    if w.W_pos is None:
        raise ValueError("This model has no learned positional embedding (W_pos), so no positional QK circuit.")
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


def effective_rank(circuit: FactoredMatrix) -> torch.Tensor:
    """[...] exp of the entropy of the normalised singular values (Roy & Vetterli 2007): 1 for a
    rank-1 matrix, the rank for a matrix whose singular values are all equal."""
    s = circuit.S
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1))


def sample_rows(n: int, max_rows: int, seed: int = 0) -> tuple[torch.Tensor, Optional[str]]:
    """(row indices, note): every row when n <= max_rows, else a seeded random sample of max_rows."""
    if n <= max_rows:
        return torch.arange(n), None
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    return idx, f"measured on a random sample of {max_rows:,} of {n:,} rows (seed {seed})"


def diagonal_fraction(circuit: FactoredMatrix, rows: torch.Tensor, causal: bool = False, offset: int = 0,
                      chunk_elems: int = 1 << 24) -> torch.Tensor:
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


def composition_scores(w: FoldedWeights, mode: CompositionMode) -> torch.Tensor:
    """[L, H, L, H] ||W_A W_B||_F / (||W_A||_F ||W_B||_F) from every head A (its W_V W_O) into every
    head B of a later layer (its W_Q W_K^T for Q, W_K W_Q^T for K, W_V W_O for V); NaN where B is
    not in a later layer."""
    ov = head_ov(w)
    right = {"Q": head_qk(w), "K": head_qk(w).T, "V": ov}[mode]
    scores = tl_composition_scores(ov, right, broadcast_dims=True)  # [L, H, L, H]
    L = w.shape[0]
    later = torch.arange(L)[None, :] > torch.arange(L)[:, None]  # [L_A, L_B]
    return scores.masked_fill(~later[:, None, :, None], float("nan"))


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
