"""Full-batch training speed on modular addition (the grokking task) at p = 113: the workbench against
TransformerBridge.boot_native running the same step, in the same process.

The step is the paper's: the one-layer transformer (d_model 128, 4 heads, ReLU MLP of 512, no
LayerNorm) on all 3,831 training pairs (30% of 113²) at once, cross-entropy on the answer token,
AdamW (lr 1e-3, weight decay 1.0, betas (0.9, 0.98)). The workbench's trainer runs
`answer_logits_fast`: the same logits and gradients (tested), computing only what the answer
token's loss needs. The hooked forward (`answer_logits`: every position through every hook point)
is timed too. All are timed in interleaved rounds (median taken), so machine noise hits each alike.
Also: the fp32 matmul peak (2048³), measured in the same run, and the share of it each step reaches
(each counting the FLOPs it performs: `flops_per_step_fast` for the trainer's step).

    python benchmarks/grokking_speed.py [--device auto|cpu|cuda] [--rounds 5] [--steps 20] [--p 113]

Ends with one JSON line; the ratio is under 'ratio_vs_bridge'.
FLOPs per step (hooked forward and bridge) = 3 (forward + backward) * tokens * 2 * (matmul parameters
per token) + attention; the trainer's step counts its own (`flops_per_step_fast`).
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

import transformer_lens.model_bridge.sources  # noqa: E402,F401  (attaches boot_native)
from transformer_lens import TransformerBridge, TransformerBridgeConfig  # noqa: E402

from benchmarks.train_speed import matmul_peak, sync  # noqa: E402  (the same peak and sync as the LM benchmark)
from workbench.data.modular import modular_data  # noqa: E402
from workbench.model.loading import resolve_device  # noqa: E402
from workbench.model.modular import answer_logits, answer_logits_fast  # noqa: E402
from workbench.model.transformer import Transformer  # noqa: E402
from workbench.train.modular import ModularConfig  # noqa: E402


def make_bridge(cfg: ModularConfig, device: torch.device):
    m = cfg.model
    bcfg = TransformerBridgeConfig(n_layers=1, d_model=m.d_model, n_heads=m.n_heads, d_head=m.d_head, n_ctx=3,
                                   d_vocab=m.d_vocab, d_mlp=m.d_mlp, attn_only=False, act_fn="relu",
                                   normalization_type=None, seed=0)
    return TransformerBridge.boot_native(bcfg, device=device)


class Stepper:
    """A model, its AdamW and the full training batch; `step` is one epoch."""

    def __init__(self, model, logits_fn, cfg: ModularConfig, device: torch.device):
        data = modular_data(cfg.p, cfg.train_fraction, cfg.data_seed)
        self.model, self.logits_fn, self.device, self.p = model, logits_fn, device, cfg.p
        self.tokens = data.tokens_N3[data.train_idx].to(device)
        self.labels = data.labels_N[data.train_idx].to(device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(cfg.beta1, cfg.beta2), foreach=True)

    def step(self) -> None:
        loss = F.cross_entropy(self.logits_fn(self.model, self.tokens), self.labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def steps_per_s(self, steps: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps / (time.perf_counter() - start)


def flops_per_step(cfg: ModularConfig) -> float:
    """Matmul FLOPs of one full-batch training step (forward + backward = 3 forwards)."""
    D, M, V, S = cfg.d_model, cfg.d_mlp, cfg.p + 1, 3
    per_token = 2 * (4 * D * D + 2 * D * M + D * V) + 2 * 2 * S * D  # QKV+O, MLP, unembed; scores and mixing
    return 3 * per_token * S * cfg.n_train


def flops_per_step_fast(cfg: ModularConfig) -> float:
    """FLOPs of the same step through `answer_logits_fast`: per pair, W_O, the MLP and the unembedding at the
    answer position only; per step, the key and value tables of positions 0 and 1 over the vocabulary."""
    D, M, V = cfg.d_model, cfg.d_mlp, cfg.p + 1
    return 3 * (cfg.n_train * 2 * (D * D + 2 * D * M + D * cfg.p) + 2 * 2 * 2 * V * D * D)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median taken)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--p", type=int, default=113)
    parser.add_argument("--train-fraction", type=float, default=0.3)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cfg = ModularConfig(p=args.p, train_fraction=args.train_fraction)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; p={cfg.p}, "
          f"{cfg.n_train} training pairs per step")
    peak = matmul_peak(device, torch.float32)
    print(f"matmul peak fp32: {peak:,.0f} GFLOP/s (2048³)")

    def bridge_logits(model, tokens):
        return model(tokens)[:, -1, : cfg.p]

    runs = {"workbench": Stepper(Transformer(cfg.model).to(device), answer_logits_fast, cfg, device),
            "workbench_hooked": Stepper(Transformer(cfg.model).to(device), answer_logits, cfg, device),
            "bridge": Stepper(make_bridge(cfg, device), bridge_logits, cfg, device)}
    for s in runs.values():  # warm-up
        s.steps_per_s(3)
    samples = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, s in runs.items():
            samples[k].append(s.steps_per_s(args.steps))
    wb, hk, tb = (statistics.median(samples[k]) for k in ("workbench", "workbench_hooked", "bridge"))
    # each path's share of peak counts the FLOPs it actually performs
    gflops = {"workbench": wb * flops_per_step_fast(cfg) / 1e9, "workbench_hooked": hk * flops_per_step(cfg) / 1e9,
              "bridge": tb * flops_per_step(cfg) / 1e9}
    print(f"workbench trainer step {wb:.2f} steps/s | workbench hooked forward {hk:.2f} steps/s | "
          f"TransformerBridge {tb:.2f} steps/s | ratio {wb / tb:.2f}x (hooked forward: {hk / tb:.2f}x)")
    for k, g in gflops.items():
        print(f"  {k}: {g:,.1f} GFLOP/s = {g / peak:.1%} of the fp32 matmul peak")
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "p": cfg.p,
                      "steps_per_s_workbench": round(wb, 3), "steps_per_s_workbench_hooked": round(hk, 3),
                      "steps_per_s_bridge": round(tb, 3), "ratio_vs_bridge": round(wb / tb, 3),
                      "hooked_ratio_vs_bridge": round(hk / tb, 3), "matmul_peak_gflops": round(peak, 1),
                      **{f"share_of_matmul_peak_{k}": round(g / peak, 4) for k, g in gflops.items()}}))


if __name__ == "__main__":
    main()
