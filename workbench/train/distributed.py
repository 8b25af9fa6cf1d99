"""Several processes, one training run: `torch.distributed` as `torchrun` sets it up.

    dist = init_from_env(device)      # gloo on CPU, nccl on CUDA; a single process when not under torchrun
    dist.rank, dist.world             # this process, and how many there are
    dist.sum_(t)                      # in place: the sum over every rank (a no-op with one process)
    dist.cat(t)                       # every rank's t, concatenated in rank order
    dist.mean_grads_(params)          # one flat all-reduce of every gradient, averaged
    check_same_settings(dist, command_settings(argv))   # every rank was started with the same command

The ranks of one job must run one command: a node started with another --hook or --d-sae would
otherwise train half on other data, or abort inside a collective. `workbench` compares a hash of the
command line of every rank before it does anything, and stops them all with the setting that differs.

Every collective waits at most `timeout_s` (default 300 s): a rank that died makes the others stop
with a message naming the likely cause, instead of hanging. `torchrun` itself also stops the other
workers when one fails, and with `--max-restarts N` starts them again, and they resume from the
newest checkpoint.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import os
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as torch_dist

from workbench.errors import WorkbenchError


class DistributedError(WorkbenchError):
    """A collective failed: another rank died or the network between them broke."""


@dataclass
class Dist:
    """This process's place in the run. With world = 1 every method is a no-op."""

    rank: int = 0
    world: int = 1
    backend: Optional[str] = None
    bytes_reduced: int = 0
    """Bytes this rank has sent through all-reduce so far (for the scaling benchmark)."""

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except RuntimeError as err:  # gloo and nccl raise RuntimeError for a peer that is gone or a timeout
            raise DistributedError(f"Rank {self.rank} of {self.world}: {what} failed ({err}). Another rank probably "
                                   "died (out of memory, killed, or an error it printed above). Nothing was "
                                   "overwritten; rerun with --resume (or let torchrun --max-restarts do it) to "
                                   "continue from the newest checkpoint.") from err

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over every rank, in place."""
        if self.active:
            self._guard("all-reduce", torch_dist.all_reduce, t)
            self.bytes_reduced += t.numel() * t.element_size()
        return t

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t (the same shape on each), concatenated along dim 0 in rank order."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self._guard("all-gather", torch_dist.all_gather, parts, t.contiguous())
        return torch.cat(parts)

    def mean_grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average every gradient over the ranks with one all-reduce of one flat buffer."""
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        self.sum_(flat).div_(self.world)
        start = 0
        for g in grads:
            g.copy_(flat[start:start + g.numel()].view_as(g))
            start += g.numel()

    @property
    def device(self) -> torch.device:
        """Where the backend's collectives take their tensors (nccl has no CPU tensors)."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def any_(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (one all-reduce)."""
        if not self.active:
            return flag
        return bool(self.sum_(torch.tensor([float(flag)], device=self.device))[0] > 0)

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data` (any length), in rank order: an all-gather of the lengths, then one of the
        bytes padded to the longest."""
        if not self.active:
            return [data]
        sizes = [int(n) for n in self.cat(torch.tensor([len(data)], dtype=torch.long, device=self.device))]
        padded = torch.zeros(1, max(sizes), dtype=torch.uint8)
        padded[0, :len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        every = self.cat(padded.to(self.device)).cpu()
        return [bytes(every[r, :n].tolist()) for r, n in enumerate(sizes)]

    def barrier(self) -> None:
        if self.active:
            self._guard("barrier", torch_dist.barrier)


_STORE: list = []


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restart_count() -> int:
    """Which torchrun attempt this is: 0 for the first, n after n restarts (--max-restarts), which
    resume from the newest checkpoint."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_from_env(device: Optional[torch.device] = None, timeout_s: float = 300.0) -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...),
    gloo on a CPU and nccl on CUDA; a one-process Dist when not under torchrun."""
    if not under_torchrun():
        return Dist()
    cuda = device is not None and torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if not torch_dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s)
        attempt = restart_count()
        if attempt == 0:
            torch_dist.init_process_group(backend, timeout=timeout)
        else:  # a restart: a fresh key prefix, so no worker reads a dead worker's address from the store
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                        is_master=rank == 0 and not agent_store, timeout=timeout, use_libuv=False)
            _STORE.append(store)  # kept alive while the group uses it
            torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f"workbench-attempt-{attempt}", store),
                                          rank=rank, world_size=world, timeout=timeout)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), backend)


def shutdown() -> None:
    """Leave the process group. On a clean exit the ranks first meet at a barrier, so that none tears
    down its connections while another still uses them (a worker could abort on exit otherwise); while
    an exception is on its way out (a `finally`), the others may be inside another collective, so
    this rank just leaves and they get a clear error."""
    if torch_dist.is_initialized():
        if sys.exc_info()[1] is None:
            try:
                torch_dist.barrier()
            except RuntimeError:  # a peer is already gone: nothing to wait for
                pass
        torch_dist.destroy_process_group()
        _STORE.clear()
        # Release, while the interpreter is whole, anything that still holds the group's work (a cycle
        # the collector has not reached): gloo's threads destroyed at interpreter teardown can abort the
        # process ("terminate called without an active exception") after a finished run, intermittently.
        gc.collect()


# -- one command on every rank --------------------------------------------------------------------
MAY_DIFFER = ("--device", "--no-progress", "--wandb")
"""Options a rank may be given on its own: where it runs, its progress bar, and logging (rank 0's only)."""
HASHED_FILE_BYTES = 1 << 20
"""A value naming a file up to this size (a config JSON) stands for the file's contents too."""


def command_settings(argv: list[str], may_differ: Collection[str] = MAY_DIFFER) -> dict[str, list[str]]:
    """A command line as {option: its values}, to compare between ranks: `--hook a --hook b --k=4` gives
    {'--hook': ['a', 'b'], '--k': ['4']}; the words before the first option are under 'command'. A value
    that names a small file (a config JSON) is followed by its SHA-256, so two nodes whose files of the
    same name differ, differ here too."""
    settings: dict[str, list[str]] = {"command": []}
    key = "command"
    for word in argv:
        if word.startswith("--"):
            key, _, value = word.partition("=")
            settings.setdefault(key, [])
            if not value:
                continue
            word = value
        settings[key].append(word)
        try:
            path = Path(word)
            if path.is_file() and path.stat().st_size <= HASHED_FILE_BYTES:
                settings[key].append(f"(contents sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})")
        except OSError:  # a word that is no readable path (too long, no permission): its text alone counts
            pass
    return {k: v for k, v in settings.items() if k not in may_differ}


def check_same_settings(dist: Dist, settings: dict[str, list[str]]) -> None:
    """Stop every rank with a DistributedError naming each setting that differs between them, and its
    value on each rank, unless all were given the same `settings`. One all-gather of a hash; only when
    the hashes differ, a second of the settings themselves (as JSON), for the message."""
    if not dist.active:
        return
    text = json.dumps(settings, sort_keys=True).encode()
    digest = hashlib.sha256(text).digest()
    mine = torch.tensor([int.from_bytes(digest[i:i + 8], "little", signed=True) for i in range(0, 32, 8)],
                        dtype=torch.long, device=dist.device)
    every = dist.cat(mine).view(dist.world, -1)
    if bool((every == every[0]).all()):
        return
    ranks = [json.loads(t) for t in dist.gather_bytes(text)]
    differ = [k for k in sorted(set().union(*ranks)) if len({json.dumps(r.get(k)) for r in ranks}) > 1]
    parts = []
    for key in differ:
        by_value: dict[str, list[int]] = {}
        for rank, r in enumerate(ranks):
            shown = " ".join(r[key]) if r.get(key) else "given" if key in r else "not given"
            by_value.setdefault(shown, []).append(rank)
        where = "; ".join(f"{value!r} on rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"
                          for value, rs in by_value.items())
        parts.append(f"{key}: {where}")
    raise DistributedError(f"The {dist.world} processes of this job were started with different settings "
                           f"({' | '.join(parts)}). Every rank must run the same command (only "
                           f"{', '.join(MAY_DIFFER)} may differ); start them again with the same settings. "
                           "Nothing was trained or written.")
