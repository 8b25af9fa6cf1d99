"""What a patching method returns: `PatchingResult`, the metric of every patch on labelled axes, and,
for an approximation, `ApproximationCheck`, its error against exact patching on a sample."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from workbench.strict_json import finite


@dataclass(frozen=True, eq=False)
class ApproximationCheck:
    """An estimate set beside exact patching of the same `n` patches (labels), in the result's units."""

    labels: tuple[tuple[str, ...], ...]
    estimate: np.ndarray
    exact: np.ndarray
    correlation: float
    """Pearson correlation of estimate and exact (NaN where either is constant: see to_dict)."""
    max_abs_error: float
    mean_abs_error: float

    @classmethod
    def of(cls, labels: Sequence[tuple[str, ...]], estimate: np.ndarray, exact: np.ndarray) -> "ApproximationCheck":
        """The check of `estimate` against `exact` on the same patches."""
        estimate, exact = np.asarray(estimate, dtype=np.float64), np.asarray(exact, dtype=np.float64)
        err = np.abs(estimate - exact)
        corr = float(np.corrcoef(estimate, exact)[0, 1]) if len(err) > 1 and estimate.std() > 0 and exact.std() > 0 \
            else float("nan")
        return cls(tuple(labels), estimate, exact, corr, float(err.max()), float(err.mean()))

    def summary(self) -> str:
        corr = "undefined" if not np.isfinite(self.correlation) else f"{self.correlation:.3f}"
        return (f"against exact patching of {len(self.labels)} patches: correlation {corr}, "
                f"worst error {self.max_abs_error:.3g}, mean error {self.mean_abs_error:.3g}")

    def to_dict(self) -> dict[str, Any]:
        return {"n": len(self.labels), "correlation": finite(self.correlation),
                "max_abs_error": finite(self.max_abs_error), "mean_abs_error": finite(self.mean_abs_error),
                "labels": [list(lab) for lab in self.labels],
                "estimate": [finite(v) for v in self.estimate.tolist()],
                "exact": [finite(v) for v in self.exact.tolist()]}


@dataclass(frozen=True, eq=False)
class PatchingResult:
    """The metric after each patch, on axes such as ("layer", "position") or ("layer", "head").

    With `normalized`, 1 is the clean run's metric and 0 the corrupt run's: denoising shows how
    much of the clean behaviour one patch restores, noising how much is left after one patch."""

    method: str
    """'activation patching' or 'attribution patching' (the linear estimate)."""
    task: str
    site: str
    by: str
    direction: str
    """'denoise' (clean activations into the corrupt run) or 'noise' (corrupt into the clean run)."""
    metric: str
    normalized: bool
    clean: float
    """The metric on the clean prompts (mean over prompts), unpatched."""
    corrupt: float
    values: np.ndarray
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    """Tick labels of each axis."""
    check: Optional[ApproximationCheck] = None
    """For an estimate: its error against exact patching on a sample."""

    def __post_init__(self) -> None:
        shape = tuple(len(lab) for lab in self.labels)
        if self.values.shape != shape or len(self.axes) != len(shape):
            raise ValueError(f"values {self.values.shape} do not match the axes {self.axes} of sizes {shape}")

    @property
    def effects(self) -> np.ndarray:
        """The change each patch makes to the base run (denoise: from corrupt, noise: from clean)."""
        base = (0.0 if self.direction == "denoise" else 1.0) if self.normalized else \
            (self.corrupt if self.direction == "denoise" else self.clean)
        return self.values - base

    def top(self, k: int = 10) -> list[tuple[tuple[str, ...], float]]:
        """The k patches of largest effect on the metric, as (labels, value)."""
        flat = self.effects.reshape(-1)
        order = np.argsort(-np.abs(flat), kind="stable")[:k]
        out = []
        for i in order:
            idx = np.unravel_index(int(i), self.values.shape)
            out.append((tuple(self.labels[a][j] for a, j in enumerate(idx)), float(self.values[idx])))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "task": self.task, "site": self.site, "by": self.by,
                "direction": self.direction, "metric": self.metric, "normalized": self.normalized,
                "clean": finite(self.clean), "corrupt": finite(self.corrupt), "axes": list(self.axes),
                "labels": [list(lab) for lab in self.labels],
                "values": np.vectorize(finite, otypes=[object])(self.values).tolist() if self.values.size else [],
                "check": None if self.check is None else self.check.to_dict()}


def sample_for_check(effects: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices of `effects` to check an estimate on: the n//2 of largest |estimated effect| (the
    ones a reader acts on), then random others (how it does elsewhere); sorted."""
    n = min(n, len(effects))
    top = np.argsort(-np.abs(effects), kind="stable")[: n // 2].astype(int)
    rest = np.setdiff1d(np.arange(len(effects)), top)
    extra = np.random.default_rng(seed).choice(rest, size=n - len(top), replace=False).astype(int)
    return np.sort(np.concatenate([top, extra]))
