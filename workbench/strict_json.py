"""Numbers a report can stand behind: strict-JSON values (an undefined number is None, and the result
says why in a note), and ratios that are not printed when their denominator is noise.

    finite(x)                      float, or None for NaN and ±inf
    json_array(arr)                nested lists, rounded, None where undefined
    ratio(num, den, floor)         num / den, or None when |den| < floor
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np


def finite(x: Any) -> Optional[float]:
    """`x` as a float, or None when it is NaN or infinite (strict JSON has neither)."""
    value = float(x)
    return value if math.isfinite(value) else None


def json_array(arr: Any, decimals: int = 4) -> Any:
    """An array as nested lists of floats rounded to `decimals`, with None where it is NaN or ±inf."""
    a = np.asarray(arr, dtype=float)
    rounded = np.round(a, decimals)
    if a.ndim == 0:
        return finite(rounded)
    return [json_array(row, decimals) for row in rounded] if a.ndim > 1 else [finite(v) for v in rounded]


def ratio(num: float, den: float, floor: float) -> Optional[float]:
    """num / den, or None when |den| is below `floor`: a ratio over a denominator that small is noise."""
    return float(num) / float(den) if abs(float(den)) >= floor else None
