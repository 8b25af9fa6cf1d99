"""The attention knockout edit itself, by a method named by the caller: -inf at hook_attn_scores, or,
where a model reports its pattern only after using it (OPT and GPT-J bridges), z recomputed from
the reported pattern and values. `workbench.adapter.probe` verifies which method takes effect;
`workbench.adapter.edits.run_with_knockout` runs the verified one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from workbench.adapter.architecture import KnockoutMethod
from workbench.errors import InputError
from workbench.model.hooked import HookedModel


@torch.no_grad()
def _knock_out(model: HookedModel, tokens_BS: torch.Tensor, blocked: dict[int, torch.Tensor],
               method: Optional[KnockoutMethod], fwd_hooks: Sequence = ()) -> torch.Tensor:
    """Logits [B, S, V] of a run in which, at each layer l of `blocked`, query s does not attend to key
    t where `blocked[l][b, s, t]` is True, by `method` (None: recompute z); `fwd_hooks` run after
    the knockout's own."""
    B, S = tokens_BS.shape
    for l, mask in blocked.items():
        if tuple(mask.shape) != (B, S, S) or mask.all(-1).any():
            raise InputError(f"The knockout mask of layer {l} must be [batch, query, key] = {(B, S, S)} and leave "
                             f"every query at least one key; got shape {tuple(mask.shape)}.")
    if method == "attn_scores":
        def block(scores, hook, mask):
            return scores.masked_fill(mask[:, None].to(scores.device), float("-inf"))

        hooks = [(f"blocks.{l}.attn.hook_attn_scores", lambda s, hook, m=m: block(s, hook, m))
                 for l, m in blocked.items()]
        return model.run_with_hooks(tokens_BS, fwd_hooks=[*hooks, *fwd_hooks])
    return _knockout_by_recomputing_z(model, tokens_BS, blocked, list(fwd_hooks))


def _knockout_by_recomputing_z(model: HookedModel, tokens_BS: torch.Tensor, blocked: dict[int, torch.Tensor],
                               fwd_hooks: list) -> torch.Tensor:
    """The knockout where the model reports its pattern only after using it (OPT and GPT-J bridges).

    z at a blocked query is recomputed from the pattern (blocked keys removed, rows renormalised) and
    the values. A layer's pattern depends on the edits at earlier layers, so the runs go in rounds:
    each round edits every (row, layer) whose pattern is known and learns the patterns of the layers
    whose earlier edits were all in place. A row blocked at n layers is done after n + 1 runs."""
    B = tokens_BS.shape[0]
    layers = sorted(blocked)
    rows_of = {l: blocked[l].any(-1).any(-1).cpu() for l in layers}  # [B] rows blocked at l
    known: dict[int, torch.Tensor] = {}  # layer -> pattern [B, H, S, T], valid on rows `done[l]`
    done = {l: torch.zeros(B, dtype=torch.bool) for l in layers}
    for _ in range(len(layers) + 1):
        seen, values = {}, {}

        def keep(act, hook, store, l):
            store[l] = act.detach()
            return act

        def recompute(z_BSHK, hook, l, values):
            rows = done[l] & rows_of[l]
            if not rows.any():
                return z_BSHK
            r = rows.nonzero().flatten().to(z_BSHK.device)
            mask_BST = blocked[l][r].to(z_BSHK.device)
            pattern = known[l][r].float().masked_fill(mask_BST[:, None], 0.0)
            pattern = pattern / pattern.sum(-1, keepdim=True)
            v_BTHK = values[l][r].float()
            v_BTHK = v_BTHK.repeat_interleave(z_BSHK.shape[2] // v_BTHK.shape[2], dim=2)
            z_new = torch.einsum("bhst,bthk->bshk", pattern, v_BTHK).to(z_BSHK.dtype)
            queries = mask_BST.any(-1)  # [r, S]: only queries that lost a key are recomputed
            z_BSHK = z_BSHK.clone()
            z_BSHK[r] = torch.where(queries[..., None, None], z_new, z_BSHK[r])
            return z_BSHK

        hooks = []
        for l in layers:
            hooks += [(f"blocks.{l}.attn.hook_v", lambda a, hook, l=l, store=values: keep(a, hook, store, l)),
                      (f"blocks.{l}.attn.hook_z", lambda z, hook, l=l, store=values: recompute(z, hook, l, store)),
                      (f"blocks.{l}.attn.hook_pattern", lambda a, hook, l=l, store=seen: keep(a, hook, store, l))]
        pending = [l for l in layers if not bool(done[l][rows_of[l]].all())]
        logits = model.run_with_hooks(tokens_BS, fwd_hooks=[*hooks, *(fwd_hooks if not pending else [])])
        if not pending:
            return logits
        # a row's pattern at l is valid when all its blocked layers before l were edited in this run
        applied = {l: done[l].clone() for l in layers}
        for l in layers:
            ready = torch.ones(B, dtype=torch.bool)
            for earlier in layers:
                if earlier < l:
                    ready &= applied[earlier] | ~rows_of[earlier]
            new = ready & ~done[l]
            if new.any():
                if l not in known:
                    known[l] = seen[l].clone()
                else:
                    known[l][new] = seen[l][new]
                done[l] |= new
    raise AssertionError("knockout rounds did not converge")  # unreachable: each round completes a layer
