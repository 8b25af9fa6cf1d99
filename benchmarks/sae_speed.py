"""SAE training speed: the workbench trainer as a share of the FLOPs each step needs, and against a
naive dense implementation, in the same process.

Batch 4096. TopK k = 32 at 256 → 4096 and 512 → 16384, with a quarter of the latents held dead
(the same ones before every step), so that the AuxK loss (k_aux = d_in / 2) is always part of the
step; and a ReLU SAE (L1, λ Σ f‖W_dec‖) at 256 → 4096. The naive reference is what hand-written
SAE code usually does: autograd through dense [batch, d_sae] latents (for TopK: scatter the top k
into a dense tensor, then a dense decoder matmul; it has no AuxK).

FLOPs a step needs (what an ideal implementation must do; multiply-add = 2):
    TopK   2·B·d_in·d_sae for the dense encoder (it has to see every pre-activation to pick the k
           largest) + 8·B·d_in·(k + k_aux) for the kept pairs: decode, and in backward the
           gradient of each kept value, of W_dec and of W_enc (2·d_in each per pair).
    ReLU   6 · 2·B·d_in·d_sae: encoder and decoder, forward and two backward products each.
The share is those FLOPs per second over a matmul peak (train_speed.py's: 3 fp32 2048³ matmuls)
taken in the same round, because on a shared machine the peak moves from minute to minute.

    python benchmarks/sae_speed.py [--device auto|cpu|cuda] [--rounds 3] [--steps 3]

Ends with one JSON line. The peer libraries (SAELens, sparsify) cannot share a virtual environment
with TransformerLens 4: `python benchmarks/peers.py` measures against them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_speed import matmul_peak, sync  # noqa: E402  (the same peak and sync as the LM benchmark)
from workbench.model.loading import resolve_device  # noqa: E402
from workbench.sae.modules import SAEConfig, make_sae  # noqa: E402
from workbench.sae.trainer import SAETrainConfig, _Trainer  # noqa: E402

BATCH, K, DEAD_FRACTION = 4096, 32, 0.25
D_IN, D_SAE = 256, 4096  # the size of the ReLU run and the first TopK run (benchmarks/peers.py checks it)
CONFIGS = (("topk", 256, 4096), ("topk", 512, 16384), ("topk_noaux", 256, 4096), ("topk_noaux", 512, 16384),
           ("l1", 256, 4096))
"""topk_noaux: no latent dead, so no AuxK pass (a fresh SAE's first steps; the issue's earlier figures)."""


class NaiveSAE(torch.nn.Module):
    """The straightforward dense implementation."""

    def __init__(self, arch: str, d_in: int, d_sae: int):
        super().__init__()
        self.arch = arch
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae) * 0.01)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in) * 0.01)
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.arch == "topk":
            top = pre.topk(K, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
            sparsity = 0.0
        else:
            f = F.relu(pre)
            sparsity = 5.0 * (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        x_hat = f @ self.W_dec + self.b_dec
        return (x_hat - x).pow(2).sum(-1).mean() + sparsity


def needed_flops(arch: str, d_in: int, d_sae: int) -> float:
    if arch == "topk":
        return 2 * BATCH * d_in * d_sae + 8 * BATCH * d_in * (K + d_in // 2)
    if arch == "topk_noaux":
        return 2 * BATCH * d_in * d_sae + 8 * BATCH * d_in * K
    return 6 * 2 * BATCH * d_in * d_sae


def dead_latents(d_sae: int) -> torch.Tensor:
    """The latents held dead [d_sae] (bool): a fixed random DEAD_FRACTION of them."""
    mask = torch.zeros(d_sae, dtype=torch.bool)
    mask[torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))[: int(d_sae * DEAD_FRACTION)]] = True
    return mask


def workbench_step(arch: str, d_in: int, d_sae: int, device: torch.device, dead: torch.Tensor | None = None):
    """The trainer's step. For TopK, the tokens-since-fired counter is set before every step so that
    exactly the latents in `dead` (default `dead_latents`) are past the dead window: AuxK runs on them."""
    extra = {"architecture": "relu", "l1_coefficient": 5.0} if arch == "l1" else {"architecture": "topk", "k": K}
    cfg = SAETrainConfig(sae=SAEConfig(d_in=d_in, d_sae=d_sae, **extra), n_tokens=BATCH * 1000, batch_size=BATCH,
                         n_checkpoints=0)
    trainer = _Trainer("x", make_sae(cfg.sae).to(device), cfg, None)
    if dead is None:
        dead = dead_latents(d_sae) if arch == "topk" else torch.zeros(d_sae, dtype=torch.bool)
    held = dead.long().to(device) * cfg.dead_window

    def step(batch):
        if arch != "l1":
            trainer.since_fired.copy_(held)
        trainer.train_step(batch)

    return step


def naive_key(arch: str, d_in: int, d_sae: int) -> str:
    return f"naive_{'topk' if arch.startswith('topk') else arch}_{d_in}x{d_sae}"


def naive_step(arch: str, d_in: int, d_sae: int, device: torch.device):
    naive = NaiveSAE("topk" if arch.startswith("topk") else arch, d_in, d_sae).to(device)
    opt = torch.optim.Adam(naive.parameters(), lr=1e-3)

    def step(batch):
        loss = naive.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)

    data = {d_in: torch.randn(4 * BATCH, d_in, device=device) for d_in in {c[1] for c in CONFIGS}}
    steppers = {}
    for arch, d_in, d_sae in CONFIGS:
        name = f"{arch}_{d_in}x{d_sae}"
        steppers[f"workbench_{name}"] = (workbench_step(arch, d_in, d_sae, device), d_in)
        if naive_key(arch, d_in, d_sae) not in steppers:  # TopK with and without AuxK share one naive run
            steppers[naive_key(arch, d_in, d_sae)] = (naive_step(arch, d_in, d_sae, device), d_in)
    for step, d_in in steppers.values():  # warm-up
        step(data[d_in][:BATCH])
    times: dict[str, list[float]] = {name: [] for name in steppers}
    peaks: list[float] = []
    for _ in range(args.rounds):
        peaks.append(matmul_peak(device, torch.float32, reps=3))
        for name, (step, d_in) in steppers.items():
            x = data[d_in]
            sync(device)
            start = time.perf_counter()
            for i in range(args.steps):
                step(x[(i % 4) * BATCH:(i % 4 + 1) * BATCH])
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH}, "
          f"TopK k {K} with {DEAD_FRACTION:.0%} of latents dead (AuxK on) or none (noaux); "
          f"median of {args.rounds} rounds of {args.steps} steps; "
          f"matmul peak per round {', '.join(f'{p:,.0f}' for p in peaks)} GFLOP/s")
    record: dict = {"device": str(device), "matmul_peak_gflops": [round(p) for p in peaks]}
    for arch, d_in, d_sae in CONFIGS:
        name = f"{arch}_{d_in}x{d_sae}"
        ours, naive = times[f"workbench_{name}"], times[naive_key(arch, d_in, d_sae)]
        flops = needed_flops(arch, d_in, d_sae)
        share = statistics.median(flops / t / 1e9 / p for t, p in zip(ours, peaks))
        tok, tok_naive = BATCH / statistics.median(ours), BATCH / statistics.median(naive)
        vs_naive = statistics.median(n / o for o, n in zip(ours, naive))
        print(f"{name:>22}: workbench {tok:>7,.0f} tok/s = {share:.0%} of the FLOPs it needs at the round's matmul "
              f"peak | naive dense {tok_naive:>7,.0f} tok/s -> {vs_naive:.2f}x")
        record.update({f"{name}_tok_per_s": round(tok), f"{name}_share_of_needed_flops": round(share, 3),
                       f"{name}_naive_tok_per_s": round(tok_naive), f"{name}_ratio_vs_naive": round(vs_naive, 2)})
    print(json.dumps(record))


if __name__ == "__main__":
    main()
