"""The logit lens (nostalgebraist, 2020): read the residual stream after each layer through the model's own
final norm and unembedding, as if the model stopped there, to see what it would predict.

    lens = logit_lens(model, tokens_1S)   # LogitLens: top tokens and probabilities per (layer, position)

Shapes: R readouts (the embedding, then after each of the L layers), S positions, K top tokens.
The readout after the last layer must reproduce the model's own logits; if it does not (a final norm
or unembedding this code cannot apply), `logit_lens` refuses instead of showing a wrong lens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workbench.errors import InputError, WorkbenchError
from workbench.model.hooked import HookedModel


class LensMismatchError(WorkbenchError):
    """The lens after the last layer does not reproduce the model's logits."""


@dataclass(frozen=True, eq=False)
class LogitLens:
    """What the residual stream predicts after each layer, at each position of one prompt."""

    readouts: list[str]
    """'embed', then 'after L0', 'after L1', ...: R names."""
    top_ids_RSK: np.ndarray
    """The K most likely next tokens at each readout and position."""
    top_probs_RSK: np.ndarray
    """Their probabilities."""
    next_prob_RS: np.ndarray
    """The probability given to the token that really comes next (NaN at the last position)."""
    max_error: float
    """|lens after the last layer − the model's logits|, max over the prompt (the check)."""


@torch.no_grad()
def logit_lens(model: HookedModel, tokens_1S: torch.Tensor, k: int = 5, tol: float = 1e-3) -> LogitLens:
    """The logit lens of one prompt [1, S] on a workbench Transformer or a TransformerBridge."""
    if tokens_1S.ndim != 2 or tokens_1S.shape[0] != 1:
        raise InputError(f"logit_lens takes one prompt of shape [1, S], got {tuple(tokens_1S.shape)}.")
    L = int(model.cfg.n_layers)
    names = ["blocks.0.hook_resid_pre", *(f"blocks.{l}.hook_resid_post" for l in range(L))]
    logits, cache = model.run_with_cache(tokens_1S, names_filter=lambda n: n in names)
    resid_RSD = torch.stack([cache[n][0] for n in names])  # [R, S, D]
    lens_RSV = model.unembed(model.ln_final(resid_RSD)).float()
    final = logits[0].float()
    error = float((lens_RSV[-1] - final).abs().max())
    if not error <= tol * max(1.0, float(final.abs().max())):
        raise LensMismatchError(f"The logit lens of this {type(model).__name__} does not reproduce its logits (off by "
                                f"{error:.3g}); its final norm or unembedding works differently, so no lens is shown.")
    probs_RSV = lens_RSV.softmax(-1)
    top_p, top_i = probs_RSV.topk(min(k, probs_RSV.shape[-1]), dim=-1)
    nxt = torch.full(probs_RSV.shape[:2], float("nan"))
    nxt[:, :-1] = probs_RSV[:, :-1].gather(-1, tokens_1S[0, 1:].to(probs_RSV.device).expand(len(names), -1)[..., None]
                                           )[..., 0].cpu()
    return LogitLens(["embed", *(f"after L{l}" for l in range(L))], top_i.cpu().numpy(), top_p.cpu().numpy(),
                     nxt.numpy(), error)
