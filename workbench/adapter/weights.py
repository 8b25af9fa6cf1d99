"""A model's weights as the analyses read them: norm scales and biases, per-head W_Q/W_K/W_V/W_O
(key/value heads expanded), the effective embedding, positional embedding and unembedding, and the
weights with every norm folded in, which `folded_weights` returns only where the probe verified the
fold (`workbench.adapter.probe`)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from workbench.adapter.folding import (
    FoldedWeights,
    HeadWeights,
    _embedding_matrix,
    _fold,
    _head_weights,
    _norm_affine,
    _norm_scale,
    _positional_matrix,
    _unembed,
)
from workbench.adapter.probe import describe
from workbench.model.hooked import HookedModel


def norm_scale(model: HookedModel, norm: Any) -> Optional[torch.Tensor]:
    """[D] the effective scale of a norm module (w, or 1 + w under an RMSNorm offset), fp32; None
    for no norm."""
    weight, _ = _norm_affine(norm)
    if weight is None:
        return None
    return _norm_scale(norm, describe(model))


def head_weights(model: HookedModel) -> HeadWeights:
    """Every head's W_Q, W_K, W_V, W_O and biases, unfolded; see HeadWeights."""
    return _head_weights(model, describe(model))


def embedding_matrix(model: HookedModel) -> torch.Tensor:
    """[V, D] what each token writes into the residual stream before the first block (positions
    aside): W_E, through BLOOM's embedding LayerNorm, times Gemma's √d_model; fp32."""
    return _embedding_matrix(model, describe(model))


def positional_matrix(model: HookedModel) -> Optional[torch.Tensor]:
    """[P, D] the learned positional embedding, fp32, or None for rotary, ALiBi and no positions."""
    return _positional_matrix(model, describe(model))


def unembed(model: HookedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_U [D, V], b_U [V]) with ln_final folded in; fp32."""
    return _unembed(model, describe(model))


def folded_weights(model: HookedModel) -> FoldedWeights:
    """The model's weights with its norms folded in; an error where the fold does not reproduce the
    model's own queries, keys, values and logits (see `workbench.adapter`)."""
    arch = describe(model)
    arch.require("fold", "weight-space circuits (folded W_Q, W_K, W_V, W_O, W_U)")
    arch.require("embedding", "weight-space circuits over tokens (the effective embedding)")
    return _fold(model, arch)


def effective_embedding_std(model: HookedModel) -> float:
    """Standard deviation of the entries of what tokens write into the residual stream (the scale
    fact-recall's corruption noise is measured in)."""
    return float(embedding_matrix(model).std())
