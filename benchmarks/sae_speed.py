"""SAE training speed: the workbench trainer against a naive dense implementation, same process.

d_in 256, d_sae 4096, batch 4096 (the issue's configuration); L1 (ReLU, λ Σ f‖W_dec‖) and TopK
k = 32. The naive reference is what hand-written SAE code usually does: autograd through dense
[batch, d_sae] latents (for TopK: scatter the top k into a dense tensor, then a dense decoder
matmul). Each variant is timed for a few full training steps (forward, backward, Adam, the
trainer's bookkeeping), interleaved in rounds; the median is reported.

    python benchmarks/sae_speed.py [--device auto|cpu|cuda] [--rounds 3] [--steps 3]

Ends with one JSON line. SAELens cannot be installed beside TransformerLens 4, so it is not run
here; the issue's reference figures for it on this machine are 6.4k tok/s (L1) and 3.7k (TopK).
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

from workbench.loading import resolve_device  # noqa: E402
from workbench.sae.modules import SAEConfig, make_sae  # noqa: E402
from workbench.sae.training import SAETrainConfig, _Trainer  # noqa: E402

D_IN, D_SAE, BATCH, K = 256, 4096, 4096, 32


class NaiveSAE(torch.nn.Module):
    """The straightforward dense implementation."""

    def __init__(self, arch: str):
        super().__init__()
        self.arch = arch
        self.W_enc = torch.nn.Parameter(torch.randn(D_IN, D_SAE) * 0.01)
        self.W_dec = torch.nn.Parameter(torch.randn(D_SAE, D_IN) * 0.01)
        self.b_enc = torch.nn.Parameter(torch.zeros(D_SAE))
        self.b_dec = torch.nn.Parameter(torch.zeros(D_IN))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    x = torch.randn(4 * BATCH, D_IN, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    steppers = {}
    archs = (("l1", {"architecture": "relu", "l1_coefficient": 5.0}), ("topk", {"architecture": "topk", "k": K}))
    for arch, extra in archs:
        cfg = SAETrainConfig(sae=SAEConfig(d_in=D_IN, d_sae=D_SAE, **extra), n_tokens=BATCH * 1000, batch_size=BATCH,
                             n_checkpoints=0)
        trainer = _Trainer("x", make_sae(cfg.sae).to(device), cfg, None)
        steppers[f"workbench_{arch}"] = trainer.train_step
        naive = NaiveSAE("topk" if arch == "topk" else "l1").to(device)
        opt = torch.optim.Adam(naive.parameters(), lr=1e-3)

        def naive_step(batch, naive=naive, opt=opt):
            loss = naive.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steppers[f"naive_{arch}"] = naive_step
    for step in steppers.values():  # warm-up
        step(x[:BATCH])
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, step in steppers.items():
            sync()
            start = time.perf_counter()
            for i in range(args.steps):
                step(x[(i % 4) * BATCH:(i % 4 + 1) * BATCH])
            sync()
            times[name].append((time.perf_counter() - start) / args.steps)
    tok_s = {name: BATCH / statistics.median(t) for name, t in times.items()}
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; d_in {D_IN}, d_sae {D_SAE}, "
          f"batch {BATCH}, median of {args.rounds} rounds of {args.steps} steps")
    record = {"device": str(device)}
    for arch, goal, saelens in (("l1", 8000, 6400), ("topk", 15000, 3700)):
        ours, naive = tok_s[f"workbench_{arch}"], tok_s[f"naive_{arch}"]
        print(f"{arch:>4}: workbench {ours:,.0f} tok/s, naive dense {naive:,.0f} tok/s -> {ours / naive:.2f}×; "
              f"goal ≥ {goal:,} tok/s; the issue's SAELens figure here: {saelens:,} ({ours / saelens:.1f}×)")
        record.update({f"{arch}_tok_per_s": round(ours), f"{arch}_naive_tok_per_s": round(naive),
                       f"{arch}_ratio_vs_naive": round(ours / naive, 2),
                       f"{arch}_ratio_vs_saelens_reference": round(ours / saelens, 2)})
    print(json.dumps(record))


if __name__ == "__main__":
    main()
