"""import workbench tunes glibc's malloc on Linux, and WORKBENCH_MALLOC=default opts out."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "import workbench, workbench.allocator as a; print(a.tuned())"


def _tuned(env_value):
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_MALLOC"}
    if env_value is not None:
        env["WORKBENCH_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc's malloc")
def test_import_tunes_malloc_unless_asked_not_to():
    assert _tuned(None) == "True"
    assert _tuned("default") == "False"
