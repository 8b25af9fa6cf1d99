"""The workbench side of the SAE workloads: its trainer's step, as benchmarks/sae_speed.py times it.

Imported only under this checkout's interpreter (never in a peer's venv).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import sae_speed  # noqa: E402


def sae_step(arch: str, d_in: int, d_sae: int, k: int, batch: int, dead: torch.Tensor
             ) -> Callable[[torch.Tensor], None]:
    """sae_speed.py's step of a ReLU + L1 ('l1') or TopK ('topk') SAE, with exactly the latents in `dead`
    past the dead window before every TopK step (so AuxK runs on them)."""
    assert (k, batch) == (sae_speed.K, sae_speed.BATCH), "sae_speed.py's k and batch size changed"
    return sae_speed.workbench_step(arch, d_in, d_sae, torch.device("cpu"), dead=dead)


def check_sae_speed_config(d_in: int, d_sae: int, k: int, batch: int) -> None:
    """The SAELens workload is sae_speed.py's: fail loudly if that benchmark's sizes change."""
    assert (sae_speed.D_IN, sae_speed.D_SAE, sae_speed.K, sae_speed.BATCH) == (d_in, d_sae, k, batch), \
        "benchmarks/sae_speed.py changed its config: update worker_saelens.py to match"
