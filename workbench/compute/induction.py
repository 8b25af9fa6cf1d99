"""Every attention head probed on a repeated sequence: its attention scores (workbench.compute.
attention_scores), the loss on each copy, what ablating heads at hook_z does to it, and the
in-context-learning score of Olsson et al. (2022). Shape letters as in workbench.model.transformer;
N the sequences of a probe.

    probe = RepeatedProbe(model, tokens, pm_tokens, prefix, pm_prefix, seq_len, prefix_seq_len)
    probe.scores["induction"]            [L, H], one array per entry of ATTENTION_SCORES
    probe.ablate([(1, 3)], "mean")       (Δ loss on the first copy, on the second, per-token loss)
    icl_score(model, rows_NS, early, late)
"""

from __future__ import annotations

from typing import Optional

import torch

from workbench.cache.collect import half_losses, layer_hooks, per_token_loss, run_collect
from workbench.compute.attention_scores import (
    duplicate_token_score,
    first_token_score,
    induction_score,
    prefix_matching_score,
    previous_token_score,
)
from workbench.model.hooked import HookedModel

ATTENTION_SCORES = ("induction", "prefix matching", "previous token", "duplicate token", "first token")
"""The scores read from attention patterns, measured on every kind of sequence."""


def loss_and_activations(model: HookedModel, tokens: torch.Tensor, keep: tuple[str, ...] = (), hooks: list = ()
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss [B, S-1] and the activations blocks.<l>.<suffix> for each suffix in `keep`."""
    logits, store = run_collect(model, tokens, layer_hooks(model, *keep), hooks)
    return per_token_loss(logits, tokens), store


def _ablate(layer: int, heads: list[int], mean_z: Optional[torch.Tensor]):
    """A hook_z hook replacing heads' outputs with zero (mean_z None) or their batch mean."""
    def hook(z, hook):
        z = z.clone()
        z[:, :, heads] = 0 if mean_z is None else mean_z[:, :, heads].to(z.dtype)
        return z

    return (f"blocks.{layer}.attn.hook_z", hook)


def head_ablation_hooks(heads: list[tuple[int, int]], mode: str, z_mean: dict[int, torch.Tensor]) -> list:
    """Hooks at hook_z that ablate the (layer, head) pairs `heads` together: mode 'zero' writes zeros,
    'mean' each head's batch mean from `z_mean` (layer -> [1, S, H, d_head])."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    return [_ablate(l, hs, None if mode == "zero" else z_mean[l]) for l, hs in by_layer.items()]


def induction_scores_LH(store: dict[str, torch.Tensor], n_layers: int, seq_len: int, prefix: int) -> torch.Tensor:
    """[L, H] induction scores from the patterns in `store` (a sequence of `seq_len` tokens after `prefix`
    ones, repeated once)."""
    return torch.stack([induction_score(store[f"blocks.{l}.attn.hook_pattern"].float(), seq_len, prefix)
                        for l in range(n_layers)])


class RepeatedProbe:
    """A sequence of `seq_len` tokens after `prefix` ones, repeated once ([N, S] `tokens`), run clean: every
    head's attention scores on it, the loss on each copy and the mean hook_z; and head ablation on it.
    Prefix matching is read from `pm_tokens`, `prefix_seq_len` tokens after `pm_prefix` ones repeated
    several times (Olsson et al.: 25 tokens, 4 copies)."""

    def __init__(self, model: HookedModel, tokens: torch.Tensor, pm_tokens: torch.Tensor, prefix: int, pm_prefix: int,
                 seq_len: int, prefix_seq_len: int) -> None:
        self.model, self.tokens, self.prefix, self.seq_len = model, tokens, prefix, seq_len
        L = model.cfg.n_layers
        self.loss, store = loss_and_activations(model, tokens, keep=("attn.hook_pattern", "attn.hook_z"))  # [B, S-1]
        pats = [store[f"blocks.{l}.attn.hook_pattern"].float() for l in range(L)]  # each [B, H, S, S]
        _, pm_store = loss_and_activations(model, pm_tokens, keep=("attn.hook_pattern",))
        per_layer = {
            "induction": [induction_score(p, seq_len, prefix) for p in pats],
            "prefix matching": [prefix_matching_score(pm_store[f"blocks.{l}.attn.hook_pattern"].float(), pm_tokens,
                                                      pm_prefix + prefix_seq_len) for l in range(L)],
            "previous token": [previous_token_score(p) for p in pats],
            "duplicate token": [duplicate_token_score(p, seq_len, prefix) for p in pats],
            "first token": [first_token_score(p, start=1) for p in pats],
        }
        self.scores = {k: torch.stack(v).cpu().numpy() for k, v in per_layer.items()}
        """One [L, H] array per entry of ATTENTION_SCORES."""
        self.first_row_patterns_LHSS = torch.stack([p[0] for p in pats]).cpu().numpy()  # for the viewers only
        self.z_mean = {l: store[f"blocks.{l}.attn.hook_z"].float().mean(0, keepdim=True) for l in range(L)}
        self.first, self.second = half_losses(self.loss, prefix, seq_len)

    def ablate(self, heads: list[tuple[int, int]], mode: str) -> tuple[float, float, torch.Tensor]:
        """(first-copy, second-copy loss increase, per-token loss [B, S-1]) with `heads` zero- or mean-ablated."""
        ablated, _ = loss_and_activations(self.model, self.tokens, hooks=head_ablation_hooks(heads, mode, self.z_mean))
        first, second = half_losses(ablated, self.prefix, self.seq_len)
        return first - self.first, second - self.second, ablated


@torch.no_grad()
def icl_score(model: HookedModel, rows_NS: torch.Tensor, early: int, late: int) -> float:
    """Olsson et al.'s in-context-learning score on the rows: the mean loss at token `late` minus the mean
    loss at token `early` (negative when later tokens, with more context, are predicted better)."""
    loss = per_token_loss(model(rows_NS), rows_NS)
    return float(loss[:, late - 1].mean() - loss[:, early - 1].mean())
