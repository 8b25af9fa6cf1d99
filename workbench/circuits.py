"""Weight-space circuits as low-rank `transformer_lens.FactoredMatrix` objects.

A head's full OV circuit W_E W_V W_O W_U [V, V] says what it writes to the logits when it attends
to each token; it has rank d_head, so it is kept factored as (W_E W_V) (W_O W_U) and never built
as a V x V matrix. LayerNorm is folded in the usual way (as TransformerLens's fold_ln and
center_writing_weights do): centring and the learned scale go into the factors, and the per-token
1/σ, a positive scalar, is dropped. Works on workbench models and on TransformerBridge models.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformer_lens import FactoredMatrix


def ln_weight(norm: Any) -> Optional[torch.Tensor]:
    """The learned scale [D] of a LayerNorm module (workbench or Hugging Face), or None."""
    for owner in (norm, getattr(norm, "_original_component", None)):
        for attr in ("w", "weight"):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, torch.Tensor):
                return value
    return None


def _centre_rows(X_ND: torch.Tensor) -> torch.Tensor:
    """Subtract each row's mean over d_model: what LayerNorm does to its input."""
    return X_ND - X_ND.mean(dim=-1, keepdim=True)


def ov_circuit(model: Any, layer: int) -> FactoredMatrix:
    """Full OV circuits of every head in `layer`: FactoredMatrix [H, V, V] with inner dim d_head.

    Entry [h, s, d] is how much head h, attending to source token s, raises the logit of token d
    (direct path only: embedding -> this head -> unembedding).
    """
    block = model.blocks[layer]
    W_E = model.W_E.detach().float()  # [V, D]
    W_V = model.W_V[layer].detach().float()  # [H, D, K]
    W_O = model.W_O[layer].detach().float()  # [H, K, D]
    W_U = model.W_U.detach().float()  # [D, V]
    w_in, w_out = ln_weight(getattr(block, "ln1", None)), ln_weight(getattr(model, "ln_final", None))
    if w_in is not None:  # ln1(x) = centre(x) / σ * w + b; the bias adds the same to every token
        W_E, W_V = _centre_rows(W_E), w_in.detach().float()[None, :, None] * W_V
    if w_out is not None:  # ln_final: the head's output is centred, then scaled, before W_U
        W_O, W_U = _centre_rows(W_O), w_out.detach().float()[:, None] * W_U
    return FactoredMatrix(W_E @ W_V, W_O @ W_U)


def copying_score(circuit: FactoredMatrix) -> torch.Tensor:
    """[...] sum(λ) / sum(|λ|) of each circuit's eigenvalues, real part (Elhage et al. 2021).

    Near 1: the circuit raises the logit of the token attended to (copying); near -1: it
    suppresses it; near 0: neither. Eigenvalues of AB equal those of the small BA.
    """
    eig = circuit.eigenvalues
    return eig.sum(dim=-1).real / eig.abs().sum(dim=-1).clamp_min(1e-12)
