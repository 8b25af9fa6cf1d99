"""Training 32 toy-model instances batched against training the same 32 configurations one after
another, with the same steps and batch size, in the same process.

Each configuration: n features, m hidden dimensions (default n = 5, m = 2, the paper's first
sweep; `--n-features 20 --n-hidden 5` is its second), importance 0.9^i, its own sparsity (32
values from 0 to 0.995) and its own initialisation seed. The batched run is one ToyModel with
32 instances; the sequential run trains 32 one-instance ToyModels in a Python loop.

    python benchmarks/superposition_speed.py [--n-features 5] [--n-hidden 2] [--steps 1000] [--batch 1024]
                                             [--device auto|cpu|cuda]

Both are timed with the default `torch.compile`d step and eagerly, each after a 3-step warm-up
(which is when any compiling happens; its time is printed apart). Prints the ratios (goal: batched
≥ 10× faster) and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.model.loading import resolve_device  # noqa: E402
from workbench.model.toy_models import ToyModel, instance_losses, train_toy  # noqa: E402

N_INSTANCES = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--n-features", type=int, default=5)
    parser.add_argument("--n-hidden", type=int, default=2)
    args = parser.parse_args()
    N_FEATURES, N_HIDDEN = args.n_features, args.n_hidden
    device = resolve_device(args.device)
    sparsity = torch.tensor(1 - np.geomspace(1, 0.005, N_INSTANCES), dtype=torch.float32)
    importance = (0.9 ** torch.arange(N_FEATURES, dtype=torch.float32)).expand(N_INSTANCES, -1).clone()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(compile_: bool) -> dict[str, float]:
        """Seconds for batched and sequential training, after a 3-step warm-up of each that
        triggers (and times) any compilation, so the compile is reported apart from the steps."""
        make_batched = lambda: ToyModel(N_FEATURES, N_HIDDEN, sparsity, importance,  # noqa: E731
                                        seeds=list(range(N_INSTANCES))).to(device)
        make_single = lambda i: ToyModel(N_FEATURES, N_HIDDEN, sparsity[i:i + 1], importance[i:i + 1],  # noqa: E731
                                         seeds=[i]).to(device)
        out = {}
        for name, models in (("batched", lambda: [make_batched()]),
                             ("sequential", lambda: [make_single(i) for i in range(N_INSTANCES)])):
            sync()
            start = time.perf_counter()
            train_toy(models()[0], 3, args.batch, 3e-3, seed=0, progress=False, compile=compile_)
            sync()
            out[f"{name}_warmup"] = time.perf_counter() - start
            trained = models()
            sync()
            start = time.perf_counter()
            for i, model in enumerate(trained):
                train_toy(model, args.steps, args.batch, 3e-3, seed=i, progress=False, compile=compile_)
            sync()
            out[name] = time.perf_counter() - start
            out[f"{name}_loss"] = float(torch.cat([instance_losses(m) for m in trained]).mean())
        return out

    record = {"device": str(device), "instances": N_INSTANCES, "n_features": N_FEATURES, "n_hidden": N_HIDDEN,
              "steps": args.steps, "batch": args.batch}
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{N_INSTANCES} instances of n={N_FEATURES}, m={N_HIDDEN}, {args.steps} steps of batch {args.batch}")
    for label, compile_ in (("compiled", True), ("eager", False)):
        t = run(compile_)
        ratio = t["sequential"] / t["batched"]
        print(f"{label:>8}: batched {t['batched']:.2f} s, sequential {t['sequential']:.2f} s -> batched is "
              f"{ratio:.1f}× faster (warm-up incl. compile: {t['batched_warmup']:.1f} s batched, "
              f"{t['sequential_warmup']:.1f} s one instance); mean final loss {t['batched_loss']:.5f} vs "
              f"{t['sequential_loss']:.5f}")
        record.update({f"{label}_batched_seconds": round(t["batched"], 3),
                       f"{label}_sequential_seconds": round(t["sequential"], 3),
                       f"{label}_ratio_batched_vs_sequential": round(ratio, 2),
                       f"{label}_warmup_seconds_batched": round(t["batched_warmup"], 2),
                       f"{label}_warmup_seconds_sequential": round(t["sequential_warmup"], 2)})
    print("goal: batched ≥ 10× faster")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
