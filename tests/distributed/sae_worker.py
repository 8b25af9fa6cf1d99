"""Run by the distributed tests, under `torchrun` (2 ranks, gloo) or as one process: train one small
dictionary for a fixed number of steps on deterministic data, and save its final weights and
dead-latent counters to OUT/result-<world>.safetensors.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/sae_worker.py ARCH OUT [--steps N] [--ckpt]
    python tests/distributed/sae_worker.py ARCH OUT                       # the 1-process reference

Each rank's share of step t's batch is rows [rank·B/W, (rank+1)·B/W) of the same global batch; the
1-process run sees the whole batch, so the two must train the same dictionary. With WB_DIE_AT=<step>
and WB_DIE_MARK=<file>, rank 1 kills itself (SIGKILL) when it reaches that step, once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from workbench.sae.modules import SAEConfig, make_sae  # noqa: E402
from workbench.sae.training import SAETrainConfig, train_saes  # noqa: E402
from workbench.train.distributed import init_from_env, restart_count, shutdown  # noqa: E402

D, D_SAE, BATCH = 16, 64, 128


def batches(rank: int, world: int, seed: int = 0):
    """Step t's global batch is a pure function of (seed, t); this rank gets its rows of it."""
    t = 0
    share = BATCH // world
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + t)
        x = torch.randn(BATCH, D, generator=g) * torch.linspace(0.2, 2.0, D) + 0.5
        x = torch.relu(x) * (torch.rand(BATCH, D, generator=g) < 0.4)
        yield {"x": x[rank * share:(rank + 1) * share]}
        t += 1
        die, mark = os.environ.get("WB_DIE_AT"), os.environ.get("WB_DIE_MARK", "")
        if die and rank == 1 and t == int(die) and not os.path.exists(mark):  # once: the restarted rank lives
            Path(mark).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


def two_hooks(rank: int):
    """Whole batches with two activations, the same on every rank (for spreading SAEs over ranks)."""
    for batch in batches(0, 1):
        x = batch["x"]
        yield {"a": x, "b": x.flip(-1) * 2.0}


def spread(out: Path) -> None:
    """SAEs on hooks a and b: dealt over the ranks (torchrun), or trained one at a time (1 process)."""
    dist = init_from_env()
    cfg = SAETrainConfig(sae=SAEConfig(d_in=D, d_sae=D_SAE, k=4), n_tokens=30 * BATCH, batch_size=BATCH, lr=3e-3,
                         dead_window=3 * BATCH, n_checkpoints=0)
    saes = {h: make_sae(SAEConfig(d_in=D, d_sae=D_SAE, k=4, hook_name=h), seed=1) for h in ("a", "b")}
    if dist.active:
        train_saes(saes, two_hooks(dist.rank), cfg, out=out / "spread", progress=False, dist=dist, spread=True)
    else:
        for h, sae in saes.items():
            train_saes({h: sae}, two_hooks(0), cfg, out=out / "alone" / h, progress=False)
    shutdown()


def main() -> None:
    if sys.argv[1] == "spread":
        return spread(Path(sys.argv[2]))
    arch, out = sys.argv[1], Path(sys.argv[2])
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 50
    ckpt = "--ckpt" in sys.argv
    dist = init_from_env()
    extra = {"k": 4, "aux_k": 8} if arch in ("topk", "batchtopk") else {"l1_coefficient": 2.0}
    cfg = SAETrainConfig(sae=SAEConfig(d_in=D, d_sae=D_SAE, architecture=arch, hook_name="x", **extra),
                         n_tokens=steps * BATCH, batch_size=BATCH, lr=3e-3, dead_window=3 * BATCH, log_every=5,
                         n_checkpoints=4 if ckpt else 0)
    sae = make_sae(cfg.sae, seed=0)
    resume = restart_count() > 0 or "--resume" in sys.argv
    run = out / "run" if ckpt else None
    logs = train_saes({"x": sae}, batches(dist.rank, dist.world), cfg, out=run, resume=resume, progress=False,
                      dist=dist)
    if dist.is_main:
        (out / f"log-{dist.world}.json").write_text(json.dumps(logs["x"]))
        state = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
        save_file(state, str(out / f"result-{dist.world}.safetensors"))
        (out / f"bytes-{dist.world}.txt").write_text(str(dist.bytes_reduced))
    shutdown()


if __name__ == "__main__":
    main()
