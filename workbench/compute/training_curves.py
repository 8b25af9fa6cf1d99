"""Readings of curves over training: when a quantity first crosses a line, makes half its fall, or
changes fastest, and the three phases of grokking. Shape letter K: the logged steps or checkpoints,
oldest first.

    first_step(steps_K, test_acc_K > 0.5)                   the first step where a mask holds
    half_fall_step(steps_K, loss_K, after)                  half the log-fall after its peak
    steepest_change(steps, values, min_change)              the interval of the fastest rise (or fall)
    grokking_phases(steps_K, train_acc_K, test_acc_K, test_loss_K)
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def first_step(steps_K: np.ndarray, mask_K: np.ndarray) -> Optional[int]:
    """The first step at which `mask_K` holds (None: never)."""
    hit = np.flatnonzero(mask_K)
    return int(steps_K[hit[0]]) if len(hit) else None


def half_fall_step(steps_K: np.ndarray, loss_K: np.ndarray, after: int) -> Optional[int]:
    """The first step ≥ `after` at which log(loss) has made half its fall from its peak after `after` to
    its end (None: fewer than two steps after it, or no such step)."""
    keep = steps_K >= after
    if keep.sum() < 2:
        return None
    s, l = steps_K[keep], np.log(np.maximum(loss_K[keep], 1e-30))
    peak = int(np.argmax(l))
    target = (l[peak] + l[-1]) / 2
    hit = np.flatnonzero((np.arange(len(l)) >= peak) & (l <= target))
    return int(s[hit[0]]) if len(hit) else None


def steepest_change(steps: list[int], values: list[float], min_change: float, rising: bool = True,
                    min_fraction: float = 0.1) -> Optional[tuple[int, int]]:
    """The (start, end) step interval where `values` rise (or fall) fastest per step.

    None unless the values rise (fall) from their first value by at least `min_change` overall.
    Only intervals that carry at least `min_fraction` of that whole change compete, so the short
    gaps between the first, closely spaced checkpoints cannot win on noise.
    """
    v = np.asarray(values, dtype=float) * (1 if rising else -1)
    total = v.max() - v[0] if len(v) >= 2 else 0.0
    if not total >= min_change or total <= 0:  # also catches NaN
        return None
    deltas, widths = np.diff(v), np.diff(np.asarray(steps, dtype=float))
    rate = np.where(deltas >= min_fraction * total, deltas / widths, -np.inf)
    i = int(np.argmax(rate))
    return int(steps[i]), int(steps[i + 1])


def grokking_phases(steps_K: np.ndarray, train_acc_K: np.ndarray, test_acc_K: np.ndarray, test_loss_K: np.ndarray
                    ) -> dict[str, Optional[int]]:
    """The ends of the three phases of grokking (Nanda et al. 2023), from a training log:
    memorisation ends when every training pair is right; circuit formation ends (cleanup starts) when
    the test accuracy passes 50% after that; cleanup ends when the test loss has made 90% of its fall
    (on a log scale) from the start of cleanup to the end of training. None where the log never gets
    there."""
    t1 = first_step(steps_K, train_acc_K >= 1.0)
    t2 = first_step(steps_K, (test_acc_K > 0.5) & (steps_K >= (t1 or 0)))
    t3 = None
    if t2 is not None:
        after = steps_K >= t2
        l = np.log(np.maximum(test_loss_K[after], 1e-30))
        target = l[0] - 0.9 * (l[0] - l[-1])
        t3 = first_step(steps_K[after], l <= target) if l[0] > l[-1] else None
    return {"memorisation_end": t1, "circuit_formation_end": t2, "cleanup_end": t3}
