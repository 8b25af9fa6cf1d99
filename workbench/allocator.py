"""Keep large freed CPU buffers for reuse instead of handing them back to the OS.

glibc's malloc serves every block over its mmap threshold (at most 32 MB by default) with a fresh
`mmap` and returns it with `munmap` when freed. A [16, 8, 256, 256] attention pattern is 33.5 MB,
an SAE's [4096, 4096] pre-activations 67 MB: each new one costs about 8,000 page faults, and a
forward pass that makes a few of them spends more time faulting pages in than computing. On this
workbench's 2-core development machine (glibc 2.36), `run_with_cache` with every hook went from
1.78× a plain forward to 1.30× with this change alone, and a softmax over a 33.5 MB tensor from
17 ms to 3.5 ms (`python benchmarks/train_speed.py`, with and without WORKBENCH_MALLOC=default).

`tune()` raises the mmap and trim thresholds to 1 GiB with `mallopt`, which is what the
environment variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do, so blocks up to 1 GiB
come from the heap and freed ones are reused. The cost is that up to 1 GiB of freed memory stays
in the process. `import workbench` calls it once on Linux with glibc; set WORKBENCH_MALLOC=default
to leave malloc as it is. It changes nothing on macOS, Windows or musl, and never on CUDA memory.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
THRESHOLD = 1 << 30

_state = {"tuned": False}


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB; True when they were set (once per process)."""
    if _state["tuned"]:
        return True
    if os.environ.get("WORKBENCH_MALLOC", "").lower() == "default" or platform.libc_ver()[0] != "glibc":
        return False  # elsewhere (musl, macOS, Windows) mallopt is absent or means something else
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    _state["tuned"] = ok
    return ok


def tuned() -> bool:
    """Whether `tune()` changed malloc's thresholds in this process."""
    return _state["tuned"]
