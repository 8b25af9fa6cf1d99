"""Running a model and keeping its activations: one forward pass that returns the activations asked
for (`run_collect`), the per-token loss, and the head names every head-level analysis uses. The token
rows these run on are made in `workbench.cache.rows`.

Model-agnostic: works on workbench models and on TransformerBridge models (which may report a
hook under an alias, so activations are stored under the name that was asked for).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from workbench.adapter import DoesNotApplyError, describe
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.model.transformer import lm_loss


def head_names(n_layers: int, n_heads: int) -> list[str]:
    """'L<layer>H<head>' for every head, layer-major (the order of a flattened [L, H] array)."""
    return [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)]


def parse_head(model: HookedModel, head: str) -> tuple[int, int]:
    """(layer, head) of a name like 'L1H3', checked against the model's shape."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    match = re.fullmatch(r"\s*L(\d+)\s*H(\d+)\s*", str(head), flags=re.IGNORECASE)
    if match is None:
        raise InputError(f"Head {head!r} is not of the form 'L<layer>H<head>', e.g. 'L1H3'.")
    layer, index = int(match[1]), int(match[2])
    if layer >= L or index >= H:
        raise InputError(f"Head {head!r} is out of range: the model has layers 0–{L - 1} and heads 0–{H - 1} "
                         f"in each (L0H0 … L{L - 1}H{H - 1}).")
    return layer, index


def require_attention(model: HookedModel) -> None:
    """A clear error for a model with no attention heads to analyse."""
    if int(getattr(model.cfg, "n_heads", 0) or 0) < 1 or not any(
            name.endswith("attn.hook_pattern") for name in model.hook_dict):
        raise InputError(f"{type(model).__name__} has no attention layers (no blocks.<l>.attn.hook_pattern hook), "
                         "so it has no heads to analyse; use a model with attention.")


class _Collected(Exception):
    """Raised by the last hook `run_collect(..., stop_early=True)` needs, to end the forward pass there."""


def run_collect(model: HookedModel, tokens: torch.Tensor, keep: Sequence[str] = (), hooks: Sequence = (),
                stop_early: bool = False) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """(logits, {hook name: activation}) for the hook names in `keep`, with `hooks` applied.

    `stop_early`: end the forward pass as soon as every hook in `keep` has fired, and return no
    logits. Activations at an early layer then cost that layer, not the whole model and its
    unembedding (12× less for blocks.0 of GPT-2 small)."""
    store: dict[str, torch.Tensor] = {}
    wanted = set(keep)

    def saver(name: str):
        def save(act, hook):
            store[name] = act.detach()
            if stop_early and wanted <= store.keys():
                raise _Collected
        return save

    try:
        logits = model.run_with_hooks(tokens, fwd_hooks=[*((n, saver(n)) for n in keep), *hooks])
    except _Collected:
        logits = None
    missing = [n for n in keep if n not in store]
    if missing:  # a registered hook is not a hook that fires (a bridge's hook_pos_embed on a rotary model)
        raise DoesNotApplyError(f"{describe(model).label}: this needs {', '.join(missing[:3])}, which the model "
                                "registers but never fires.")
    return logits, store


def layer_hooks(model: HookedModel, *suffixes: str) -> list[str]:
    """blocks.<l>.<suffix> for every layer and suffix, e.g. layer_hooks(model, 'attn.hook_z')."""
    return [f"blocks.{l}.{s}" for l in range(model.cfg.n_layers) for s in suffixes]


def per_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S-1] next-token loss in fp32 (index p - 1 predicts position p)."""
    return lm_loss(logits.float(), tokens, per_token=True)


def half_losses(loss_BP: torch.Tensor, prefix: int, seq_len: int) -> tuple[float, float]:
    """(mean loss predicting tokens 2..L of the first copy, the same tokens of the second copy)."""
    loss_BP = loss_BP.detach()
    first = loss_BP[:, prefix: prefix + seq_len - 1]
    second = loss_BP[:, prefix + seq_len: prefix + 2 * seq_len - 1]
    return float(first.mean()), float(second.mean())
