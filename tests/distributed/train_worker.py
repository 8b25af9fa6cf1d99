"""Run by the distributed tests: train the tests' tiny model (synthetic data, 20 steps) into OUT, under
torchrun or as one process.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/train_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import tiny_train_config  # noqa: E402
from workbench.train.lm import train  # noqa: E402

if __name__ == "__main__":
    train(tiny_train_config(), sys.argv[1], name="tiny", device="cpu", progress=False)
