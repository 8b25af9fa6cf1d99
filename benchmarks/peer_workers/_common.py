"""What every peers-mode worker shares. Imports torch only, so it runs in any of the venvs.

A worker builds its model or SAE, warms up, then (with --serve) times --steps steps each time a line
`time` arrives on stdin, printing one JSON line per round; without --serve it times once and exits.
Only those JSON lines go to stdout: anything a library prints is sent to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, TextIO

import torch

_OUT: TextIO = sys.stdout


def quiet_stdout() -> None:
    """Keep the real stdout for the JSON lines; send everything else written to fd 1 to stderr."""
    global _OUT
    _OUT = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def emit(record: dict[str, Any]) -> None:
    _OUT.write(json.dumps(record) + "\n")
    _OUT.flush()


def base_parser(doc: str, sides: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--side", required=True, choices=sides)
    parser.add_argument("--steps", type=int, default=3, help="steps (or forward passes) timed per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after building")
    parser.add_argument("--dead-fraction", type=float, default=0.25, help="latents held dead (TopK SAEs)")
    parser.add_argument("--serve", action="store_true", help="time a round for each `time` line on stdin")
    return parser


def timed(fn: Callable[[], Any], steps: int) -> float:
    """Seconds for `steps` calls of fn (CPU only: nothing to synchronise)."""
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def dead_mask(d_sae: int, fraction: float) -> torch.Tensor:
    """The same fixed random latents on every side: a bool mask [d_sae] with round(fraction · d_sae) set."""
    idx = torch.randperm(d_sae, generator=torch.Generator().manual_seed(1234))[: round(fraction * d_sae)]
    mask = torch.zeros(d_sae, dtype=torch.bool)
    mask[idx] = True
    return mask


def versions(*packages: str) -> str:
    from importlib import metadata

    found = [f"torch {torch.__version__}"]
    for p in packages:
        try:
            found.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            found.append(f"{p} (not installed)")
    return ", ".join(found)


def serve(measure: Callable[[], dict[str, Any]], info: dict[str, Any], serve_mode: bool) -> None:
    """Print `info` (ready), then one measurement per `time` line on stdin (or just one)."""
    info = {"ready": True, "threads": torch.get_num_threads(), "python": sys.version.split()[0], **info}
    if not serve_mode:
        emit({**info, **measure()})
        return
    emit(info)
    for line in sys.stdin:
        if line.strip() == "time":
            emit(measure())
        elif line.strip():
            raise SystemExit(f"unknown command {line.strip()!r}")


def sae_batches(d_in: int, batch: int, n: int = 4) -> list[torch.Tensor]:
    """n fixed random batches [batch, d_in] (seed 0), cycled through, as benchmarks/sae_speed.py does."""
    return list(torch.randn(n * batch, d_in, generator=torch.Generator().manual_seed(0)).split(batch))


def serve_sae(step: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], args: argparse.Namespace,
              info: dict[str, Any]) -> None:
    """Warm up (at least one step: a trainer's first step sets itself up from the batch), then serve
    rounds of args.steps steps, cycling through the batches."""
    count = [0]

    def one() -> None:
        step(batches[count[0] % len(batches)])
        count[0] += 1

    timed(one, max(args.warmup, 1))
    tokens = len(batches[0]) * args.steps
    serve(lambda: {"tok_s": tokens / timed(one, args.steps)}, info, args.serve)
