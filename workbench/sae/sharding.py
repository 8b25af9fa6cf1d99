"""Data parallel SAE training: what each process of a torchrun job reads. Either every process trains
every hook's SAE on its share of each batch (every world-th row or store batch), or, with spread hooks,
the SAEs are dealt over the processes and each reads whole batches for its own hooks only."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workbench.cache.activations import Batch
from workbench.errors import InputError
from workbench.train.distributed import Dist


@dataclass(frozen=True)
class RankShare:
    """What one process of a data-parallel SAE job trains on: the hooks whose SAEs it trains, its share
    of every batch, and which slice (every `world`-th row or store batch, from `rank`) it reads. With
    spread hooks a process reads everything, for its own hooks only."""

    hooks: list[str]
    batch_size: int
    rank: int = 0
    world: int = 1


def rank_share(dist: Dist, hooks: Sequence[str], batch_size: int, spread: bool = False) -> RankShare:
    """This process's share: the batch split over the processes (every hook's SAE on every rank), or,
    with `spread`, the hooks dealt over them (each SAE on one rank, whole batches)."""
    hooks = list(hooks)
    if spread and len(hooks) < dist.world:
        raise InputError(f"--spread-hooks deals {len(hooks)} hook(s) over {dist.world} processes; give at least as "
                         "many --hook as processes, or train data parallel (without --spread-hooks).")
    if spread:
        return RankShare(hooks[dist.rank::dist.world], batch_size)
    if batch_size % dist.world:
        raise InputError(f"--batch-size {batch_size} does not split over {dist.world} processes; use a multiple "
                         f"of {dist.world}.")
    return RankShare(hooks, batch_size // dist.world, dist.rank, dist.world)


def store_batches(store: Any, share: RankShare, seed: int) -> Iterator[Batch]:
    """This process's batches from an `ActivationStore`: every world-th of the shuffled stream."""
    return itertools.islice(store.batches(share.batch_size, seed=seed, hooks=share.hooks), share.rank, None,
                            share.world)


def text_batches(model: Any, token_rows: torch.Tensor, share: RankShare, seed: int, **stream: Any
                 ) -> Iterator[Batch]:
    """This process's batches streamed from `model` over its own rows (every world-th), with its own
    shuffling seed; `stream` goes to `stream_activations` (buffer_batches, exclude_special, skip_first)."""
    from workbench.cache.activations import stream_activations

    return stream_activations(model, token_rows[share.rank::share.world], share.hooks, batch_size=share.batch_size,
                              seed=seed + share.rank, **stream)
