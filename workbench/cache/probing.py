"""Activations for linear probes: every (hook site, probed position) of many prompts, streamed in
batches with one forward pass per batch, and a split of the prompts into train and test that never
puts one prompt (or one group of prompts) on both sides.

Shape letters: N prompts, S hook sites, Q probed positions, D the activation width (heads × d_head
for a per-head hook), B a batch of prompts, L tokens (the batch's longest prompt).

    acts = probe_activations(model, prompts, layer_hooks(model, "hook_resid_post"),
                             {"last subject token": subject_end_N, "last token": -1})
    split = split_prompts(acts, test_fraction=0.25, groups=subjects)    # held-out subjects
    acts.acts_SQND[s, q, split.train]                                   # what a probe trains on

A probe sweep over every layer and position needs every activation once: one pass over the prompts
fills all of them (a model that stops after the last site asked for, `run_collect(stop_early=True)`),
instead of one pass per layer. Prompts of different lengths are padded on the right: under causal
attention a token after a probed position cannot change the activation there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.cache.activations import check_hooks
from workbench.cache.collect import run_collect
from workbench.errors import InputError
from workbench.model.hooked import HookedModel

Prompts = Union[torch.Tensor, Sequence[Union[str, torch.Tensor, Sequence[int]]]]
"""[N, L] token ids, or N prompts: text (read with the model's `to_tokens`) or token ids of any length."""

Positions = Union[None, int, Mapping[str, Union[int, Sequence[int], torch.Tensor]]]
"""None: every position of prompts of one length; an int: that position of every prompt; or
{name: an int for every prompt, or one index per prompt [N]}. Negative indices count from each
prompt's own end (-1 is its last token)."""

NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")
"""Hooks whose activations are [B, H, L, L], not one vector per token: a probe does not apply."""


@dataclass(frozen=True, eq=False)
class ProbeActivations:
    """One activation vector per (site, probed position, prompt), and where each was read."""

    sites: tuple[str, ...]
    """Hook names, the S axis."""
    positions: tuple[str, ...]
    """Names of the probed positions, the Q axis."""
    acts_SQND: torch.Tensor
    """[S, Q, N, D] activations (per-head hooks flattened to heads × d_head)."""
    index_QN: torch.Tensor
    """[Q, N] the token position read in each prompt (negative indices resolved)."""
    tokens_QN: torch.Tensor
    """[Q, N] the token at that position (the "word type" of Hewitt and Liang's control task)."""
    prompt_key_N: np.ndarray
    """[N] int64, equal for prompts with equal tokens, so that a split can keep repeats together."""

    @property
    def n_prompts(self) -> int:
        return int(self.acts_SQND.shape[2])

    @property
    def d(self) -> int:
        return int(self.acts_SQND.shape[3])

    def at(self, site: str, position: str) -> torch.Tensor:
        """[N, D] the activations of one site and probed position."""
        for axis, names, name in (("site", self.sites, site), ("position", self.positions, position)):
            if name not in names:
                raise InputError(f"No probed {axis} {name!r}; the {axis}s are {list(names)}.")
        return self.acts_SQND[self.sites.index(site), self.positions.index(position)]


def _prompt_rows(model: HookedModel, prompts: Prompts) -> list[torch.Tensor]:
    """Each prompt as a 1-D tensor of token ids (on the CPU)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2:
            raise InputError(f"Token prompts must be [prompts, positions]; got shape {tuple(prompts.shape)}.")
        return list(prompts.cpu())
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not hasattr(model, "to_tokens"):
                raise InputError("Text prompts need a model with a tokenizer and to_tokens; pass token ids instead.")
            rows.append(model.to_tokens(p)[0].cpu())
        else:
            row = torch.as_tensor(p).cpu()
            if row.ndim == 2 and row.shape[0] == 1:
                row = row[0]
            if row.ndim != 1:
                raise InputError(f"Prompt {i} must be one row of token ids; got shape {tuple(row.shape)}.")
            rows.append(row.long())
    if not rows:
        raise InputError("There are no prompts to read activations from.")
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise InputError(f"Prompt {i} has no tokens.")
    return rows


def _position_index(positions: Positions, lengths: torch.Tensor) -> tuple[tuple[str, ...], torch.Tensor]:
    """(names, [Q, N] token positions with negative indices resolved), checked against each prompt's length."""
    N = len(lengths)
    if positions is None:
        if bool((lengths != lengths[0]).any()):
            raise InputError("positions=None probes every position, which needs prompts of one length; these have "
                             f"{int(lengths.min())} to {int(lengths.max())} tokens. Name the positions to probe.")
        positions = {str(p): p for p in range(int(lengths[0]))}
    elif isinstance(positions, int):
        positions = {str(positions): positions}
    if not isinstance(positions, Mapping) or not positions:
        raise InputError("positions must be None, an int, or a non-empty {name: index or [N] indices}.")
    names, rows = [], []
    for name, value in positions.items():
        idx = torch.as_tensor(value, dtype=torch.long).cpu()
        if idx.ndim == 0:
            idx = idx.expand(N)
        if idx.shape != (N,):
            raise InputError(f"Position {name!r}: one index per prompt ({N}) or one for all; got shape "
                             f"{tuple(idx.shape)}.")
        resolved = torch.where(idx < 0, idx + lengths, idx)
        bad = ((resolved < 0) | (resolved >= lengths)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise InputError(f"Position {name!r} is {int(idx[i])} in prompt {i}, which has {int(lengths[i])} tokens.")
        names.append(str(name))
        rows.append(resolved)
    return tuple(names), torch.stack(rows)


def _per_token(act: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """[B, L, D] from a hook's activation: per-head [B, L, H, K] flattened; OPT's [B·L, D] unflattened."""
    if act.ndim == 4:
        act = act.flatten(-2)
    elif act.ndim == 2 and act.shape[0] == B * L:
        act = act.view(B, L, -1)
    return act


def _prompt_keys(rows: list[torch.Tensor]) -> np.ndarray:
    digest = [hashlib.blake2b(r.numpy().astype(np.int64).tobytes(), digest_size=8).digest() for r in rows]
    return np.array([int.from_bytes(d, "little", signed=True) for d in digest], dtype=np.int64)


@torch.no_grad()
def probe_activations(model: HookedModel, prompts: Prompts, sites: Sequence[str], positions: Positions = None,
                      batch_size: int = 64, dtype: torch.dtype = torch.float32,
                      device: Union[None, str, torch.device] = None, hooks: Sequence = (),
                      progress: bool = False) -> ProbeActivations:
    """Activations at every site and probed position of every prompt, one forward pass per batch.

    prompts: [N, L] ids or N prompts (text or ids); sites: hook names; positions: see `Positions`.
    The activations are kept in `dtype` on `device` (default: the model's), [S, Q, N, D]: for GPT-2
    small's 12 residual streams and 64 positions, 10,000 prompts take 24 GB in float32, 12 GB in
    bfloat16. Prompts run sorted by length, padded on the right within a batch. `hooks`: (name, fn)
    forward hooks applied during the pass (an edit whose effect on the representation is probed)."""
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise InputError("probe_activations needs at least one hook site.")
    check_hooks(model, sites)
    for s in sites:
        if s.endswith(NOT_PER_TOKEN):
            raise InputError(f"{s} is [batch, heads, query, key], not one vector per token; probe a per-token hook "
                             "(hook_resid_post, hook_z, hook_mlp_out, ...).")
    if batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size}.")
    rows = _prompt_rows(model, prompts)
    lengths = torch.tensor([len(r) for r in rows])
    names, index_QN = _position_index(positions, lengths)
    if int(lengths.max()) > int(model.cfg.n_ctx):
        raise InputError(f"The longest prompt has {int(lengths.max())} tokens; the model's context is "
                         f"{model.cfg.n_ctx}.")
    model_device = next(model.parameters()).device
    store_device = torch.device(device) if device is not None else model_device
    N, Q, S = len(rows), len(names), len(sites)
    order = torch.argsort(lengths, stable=True)
    acts_SQND: Optional[torch.Tensor] = None
    tokens_QN = torch.zeros(Q, N, dtype=torch.long)
    for start in tqdm(range(0, N, batch_size), desc="probe activations", unit="batch", disable=not progress,
                      leave=False):
        batch = order[start:start + batch_size]
        L = int(lengths[batch].max())
        tokens_BL = torch.zeros(len(batch), L, dtype=torch.long)  # right padding: any id will do
        for j, i in enumerate(batch.tolist()):
            tokens_BL[j, :len(rows[i])] = rows[i]
        index_QB = index_QN[:, batch]
        tokens_QN[:, batch] = tokens_BL.gather(1, index_QB.T).T
        _, store = run_collect(model, tokens_BL.to(model_device), sites, hooks, stop_early=True)
        for s, site in enumerate(sites):
            act_BLD = _per_token(store[site], len(batch), L)
            if act_BLD.ndim != 3 or act_BLD.shape[:2] != (len(batch), L):
                raise InputError(f"{site} gives activations of shape {tuple(store[site].shape)}, not one vector per "
                                 "token; probe a per-token hook.")
            if acts_SQND is None:
                acts_SQND = torch.empty(S, Q, N, act_BLD.shape[-1], dtype=dtype, device=store_device)
            elif act_BLD.shape[-1] != acts_SQND.shape[-1]:
                raise InputError(f"{site} has width {act_BLD.shape[-1]} and {sites[0]} {acts_SQND.shape[-1]}; one "
                                 "sweep probes sites of one width.")
            picked_QBD = act_BLD[torch.arange(len(batch), device=act_BLD.device), index_QB.to(act_BLD.device)]
            acts_SQND[s][:, batch.to(store_device)] = picked_QBD.to(device=store_device, dtype=dtype)
    assert acts_SQND is not None
    return ProbeActivations(tuple(sites), names, acts_SQND, index_QN, tokens_QN, _prompt_keys(rows))


# -- splitting by prompt ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PromptSplit:
    """Which prompts a probe trains on and which it is scored on. A cluster (a group such as a
    subject, or a set of identical prompts) lies wholly on one side; the bootstrap of a held-out
    score resamples clusters."""

    train: np.ndarray
    """Indices of the training prompts, sorted."""
    test: np.ndarray
    """Indices of the held-out prompts, sorted."""
    cluster_N: np.ndarray
    """[N] the cluster of every prompt (int ids)."""
    grouped: bool
    """Whether the clusters are the caller's groups (True) or sets of identical prompts (False)."""

    def __post_init__(self) -> None:
        n = len(self.cluster_N)
        both = np.intersect1d(self.train, self.test)
        if len(both):
            raise InputError(f"Prompt {int(both[0])} is in both the train and the test split.")
        if len(self.train) == 0 or len(self.test) == 0:
            raise InputError(f"A split needs prompts on both sides; got {len(self.train)} train and {len(self.test)} "
                             "test.")
        if min(self.train.min(), self.test.min()) < 0 or max(self.train.max(), self.test.max()) >= n:
            raise InputError(f"Split indices must lie in [0, {n}).")
        shared = np.intersect1d(self.cluster_N[self.train], self.cluster_N[self.test])
        if len(shared):
            raise InputError(f"Cluster {int(shared[0])} has prompts in both the train and the test split.")


def _codes(values: Sequence) -> np.ndarray:
    """[N] int codes of hashable values, in first-seen order."""
    seen: dict = {}
    return np.array([seen.setdefault(v, len(seen)) for v in values], dtype=np.int64)


def split_prompts(data: Union[ProbeActivations, int], test_fraction: float = 0.25, groups: Optional[Sequence] = None,
                  seed: int = 0) -> PromptSplit:
    """Train and test prompts: `test_fraction` of the groups held out (a group, e.g. a subject, is
    never on both sides), or without groups, of the prompts, identical prompts kept together."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if isinstance(data, ProbeActivations):
        n, keys = data.n_prompts, data.prompt_key_N
    else:
        n, keys = int(data), np.arange(int(data))
    if groups is not None:
        groups = list(groups.tolist() if isinstance(groups, (np.ndarray, torch.Tensor)) else groups)
        if len(groups) != n:
            raise InputError(f"groups has {len(groups)} entries for {n} prompts; give one per prompt.")
        cluster = _codes(groups)
    else:
        cluster = _codes(keys.tolist())
    n_clusters = int(cluster.max()) + 1
    if n_clusters < 2:
        raise InputError("A split needs at least two groups (or two different prompts).")
    rng = np.random.default_rng(seed)
    n_test = min(n_clusters - 1, max(1, round(n_clusters * test_fraction)))
    test_clusters = rng.choice(n_clusters, size=n_test, replace=False)
    is_test = np.isin(cluster, test_clusters)
    return PromptSplit(np.flatnonzero(~is_test), np.flatnonzero(is_test), cluster, groups is not None)
