"""Scaling dictionary training out: measured on this machine, and modelled for 1, 8 and 64 GPUs.

Measured (a TopK SAE with AuxK, d_in 512 → 4,096 latents, k 32, batch 4,096 tokens, activations
already in memory, fp32):

    1 process      both cores (2 threads)
    2 processes    torchrun, gloo, 1 thread each, half the batch each, gradients all-reduced
    store          1 process reading the same activations from an `ActivationStore` on disk
                   (sharded safetensors, a new shard every 4 steps), against training on the same
                   batches read into memory beforehand, interleaved in the same run, best of --rounds: the
                   pipeline must not make the step wait (goal ≥ 90%)

It prints tokens/s and the bytes each rank all-reduces per step. Then a simple model predicts the
throughput of data-parallel training on 1, 8 and 64 GPUs for a dictionary of the size people train
on GPT-2 small (d_in 768 → 32,768 latents, k 32, 4,096 tokens per GPU per step):

    step time = compute + ring all-reduce (no overlap)
    compute   = 6 · d_in · d_sae FLOPs per token (dense encoder forward and backward; the sparse
                decoder is small) at `--gpu-tflops` (default 400: an H100 at about 40% of its
                dense bf16 peak)
    all-reduce = 2 (N − 1) / N · bytes / bandwidth + 2 (N − 1) · latency, fp32 gradients, with
                `--nvlink-gbs` 450 inside a node of 8 and `--ib-gbs` 50 (400 Gb/s InfiniBand)
                between nodes, 10 µs per hop

    python benchmarks/distributed_scale.py [--steps 30]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.cache.activations import ActivationStore, TensorSource  # noqa: E402
from workbench.sae.modules import SAEConfig, make_sae  # noqa: E402
from workbench.sae.training import SAETrainConfig, train_saes  # noqa: E402
from workbench.train.distributed import init_from_env, shutdown  # noqa: E402

D_IN, D_SAE, K, BATCH = 512, 4096, 32, 4096


def _data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, D_IN, generator=g)) * (torch.rand(n, D_IN, generator=g) < 0.3)


def _train(batches, steps: int, dist=None) -> tuple[float, int]:
    """(tokens/s over the steps after the first 3, bytes all-reduced per step)."""
    cfg = SAETrainConfig(sae=SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, hook_name="x"), n_tokens=steps * BATCH,
                         batch_size=BATCH, n_checkpoints=0, log_every=1, dead_window=4 * BATCH)
    sae = make_sae(cfg.sae)
    times: list[float] = []

    def timed(source):
        for batch in source:
            times.append(time.perf_counter())
            yield batch

    train_saes({"x": sae}, timed(batches), cfg, progress=False, dist=dist)
    span = times[-1] - times[3]
    bytes_per_step = (dist.bytes_reduced // steps) if dist is not None else 0
    return (len(times) - 4) * BATCH / span, bytes_per_step


def worker(steps: int, out: str) -> None:
    """One rank of the 2-process run (under torchrun)."""
    dist = init_from_env()
    share = BATCH // dist.world
    data = _data(64 * share, seed=dist.rank)
    rate, per_step = _train(TensorSource(data, share, seed=dist.rank), steps, dist)
    if dist.is_main:
        Path(out).write_text(json.dumps({"tokens_per_s": rate, "bytes_per_step": per_step}))
    shutdown()


def predicted(n_gpus: int, args: argparse.Namespace) -> dict[str, float]:
    d_in, d_sae, tokens = 768, 32768, 4096
    params = 2 * d_in * d_sae + d_sae + d_in
    compute = 6 * d_in * d_sae * tokens / (args.gpu_tflops * 1e12)
    bytes_ = 4 * params
    bandwidth = (args.nvlink_gbs if n_gpus <= 8 else args.ib_gbs) * 1e9
    reduce = 0.0 if n_gpus == 1 else 2 * (n_gpus - 1) / n_gpus * bytes_ / bandwidth + 2 * (n_gpus - 1) * 10e-6
    step = compute + reduce
    return {"gpus": n_gpus, "compute_ms": compute * 1e3, "allreduce_ms": reduce * 1e3,
            "tokens_per_s": n_gpus * tokens / step, "efficiency": compute / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved store / in-memory rounds")
    parser.add_argument("--gpu-tflops", type=float, default=400.0)
    parser.add_argument("--nvlink-gbs", type=float, default=450.0)
    parser.add_argument("--ib-gbs", type=float, default=50.0)
    parser.add_argument("--worker", default="")
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.worker)
    data = _data(64 * BATCH)
    one, _ = _train(TensorSource(data, BATCH), args.steps)
    print(f"SAE {D_IN} → {D_SAE:,}, TopK k = {K}, batch {BATCH:,} tokens, fp32, {os.cpu_count()} cores")
    print(f"  1 process ({torch.get_num_threads()} threads):   {one:10,.0f} tokens/s")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "two.json"
        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            port = sock.getsockname()[1]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                        str(port), __file__, "--steps", str(args.steps), "--worker", str(out)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        two = json.loads(out.read_text())
        print(f"  2 processes (1 thread each): {two['tokens_per_s']:10,.0f} tokens/s = "
              f"{two['tokens_per_s'] / one:.2f}× 1 process; each rank all-reduces {two['bytes_per_step'] / 1e6:.1f} MB "
              "per step")
        store = ActivationStore.write(Path(tmp) / "store", iter(TensorSource(data, BATCH)), len(data),
                                      shard_tokens=4 * BATCH)  # a new shard every 4 steps: the reader is exercised
        # the same batches both ways: read from the store as training goes, or read beforehand into memory
        # (training cost depends on the data: AuxK works harder when more latents are dead)
        ready = list(itertools.islice(store.batches(BATCH, seed=1), args.steps + 1))
        in_memory = from_store = 0.0
        for _ in range(args.rounds):  # interleaved, best of each: the machine's noise hits both alike
            in_memory = max(in_memory, _train(iter(ready), args.steps)[0])
            from_store = max(from_store, _train(store.batches(BATCH, seed=1), args.steps)[0])
    ratio = from_store / in_memory
    print(f"  from the store on disk: {from_store:,.0f} tokens/s vs {in_memory:,.0f} in memory = {ratio:.0%} "
          f"(goal ≥ 90%: {'met' if ratio >= 0.9 else 'NOT met'})")
    print("\nmodelled data-parallel throughput, GPT-2-small-sized SAE (768 → 32,768, 4,096 tokens per GPU per step):")
    model = [predicted(n, args) for n in (1, 8, 64)]
    for m in model:
        print(f"  {m['gpus']:>2} GPUs: compute {m['compute_ms']:.2f} ms + all-reduce {m['allreduce_ms']:.2f} ms → "
              f"{m['tokens_per_s'] / 1e6:,.1f} M tokens/s ({m['efficiency']:.0%} of linear)")
    print(json.dumps({"one_process_tokens_per_s": one, "two_processes": two, "store_vs_memory": ratio,
                      "store_tokens_per_s": from_store, "memory_tokens_per_s": in_memory, "model": model,
                      "assumptions": {"gpu_tflops": args.gpu_tflops, "nvlink_gbs": args.nvlink_gbs,
                                      "ib_gbs": args.ib_gbs}}))


if __name__ == "__main__":
    main()
