"""Training speed of the workbench Transformer against TransformerBridge.boot_native, same process.

Config (from the foundation issue): 2 layers, d_model 256, 8 heads, n_ctx 256, d_vocab 1024,
batch 16, LayerNorm, AdamW; once attention-only and once with d_mlp 1024. Each is timed in fp32
and under bf16 autocast, interleaved in rounds (median taken) so that machine noise hits all:

    workbench          the workbench model with the workbench trainer's optimizer (fused AdamW)
    workbench_foreach  the same with foreach AdamW (torch's default; what it used before): the
                       fused optimizer's effect
    workbench_compiled the same with its blocks torch.compile'd (TrainConfig.compile / --compile);
                       its compile time is reported, and the steps after which it has paid off
    bridge             TransformerBridge.boot_native on the same config, torch's default AdamW

Also: a matmul peak measured in the same run, effective GFLOP/s as a share of it, and the cost of
`run_with_cache` against a plain forward (one residual hook, and every hook) for both models.
`import workbench` tunes glibc's malloc for the whole process (workbench/allocator.py), so the
bridge in this process gains from it too; run with WORKBENCH_MALLOC=default to see its effect.

    python benchmarks/train_speed.py [--device auto|cpu|cuda] [--rounds 3] [--steps 4]

Ends with one JSON line; every ratio is under a key containing 'ratio'.
FLOPs per token = 6 * (matmul parameters) + 6 * n_layers * n_ctx * d_model (causal attention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformer_lens.model_bridge.sources  # noqa: E402,F401  (attaches boot_native)
from transformer_lens import TransformerBridge, TransformerBridgeConfig  # noqa: E402

from workbench.model.loading import resolve_device  # noqa: E402
from workbench.model.transformer import ModelConfig, Transformer  # noqa: E402
from workbench.train.optim import fused_adam  # noqa: E402

B, S, D, H, L, V = 16, 256, 256, 8, 2, 1024


def make_workbench(d_mlp, device):
    return Transformer(ModelConfig(n_layers=L, d_model=D, n_heads=H, d_head=D // H, n_ctx=S, d_vocab=V,
                                   d_mlp=d_mlp, normalization_type="LN", act_fn="gelu")).to(device)


def make_bridge(d_mlp, device):
    cfg = TransformerBridgeConfig(n_layers=L, d_model=D, n_heads=H, d_head=D // H, n_ctx=S, d_vocab=V,
                                  d_mlp=d_mlp, attn_only=d_mlp is None, act_fn="gelu",
                                  normalization_type="LN", seed=0)
    return TransformerBridge.boot_native(cfg, device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Trainer:
    """A model with its AdamW, stepping on fixed random tokens."""

    def __init__(self, model, device, precision, optimizer="default"):
        self.model, self.device, self.precision = model, device, precision
        if optimizer == "fused":  # what workbench.train.optim.make_optimizer uses
            self.opt = fused_adam(torch.optim.AdamW, model.parameters(), lr=1e-4)
        else:
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True if optimizer == "foreach" else None)
        self.tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0)).to(device)

    def step(self):
        ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
               else contextlib.nullcontext())
        with ctx:
            loss = self.model(self.tokens, return_type="loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def tokens_per_s(self, steps):
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return B * S * steps / (time.perf_counter() - start)


def matmul_peak(device, dtype, n=2048, reps=5):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def flops_per_token(d_mlp):
    matmul_params = L * 4 * D * D + (L * 2 * D * d_mlp if d_mlp else 0) + D * V
    return 6 * matmul_params + 6 * L * S * D


def hook_overhead(device, rounds, reps=5):
    """Median over rounds of time(run_with_cache) / time(plain forward), with one residual hook and with
    every hook, for the workbench model and the bridge (d_mlp 1024, no_grad)."""
    models = {"workbench": make_workbench(1024, device).eval(), "bridge": make_bridge(1024, device).eval()}
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1)).to(device)
    calls = {
        "plain": lambda m: m(tokens),
        "one_hook": lambda m: m.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post"),
        "every_hook": lambda m: m.run_with_cache(tokens),
    }

    def timed(fn, model):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn(model)
        sync(device)
        return time.perf_counter() - start

    ratios = {f"{name}_{call}": [] for name in models for call in ("one_hook", "every_hook")}
    with torch.no_grad():
        for model in models.values():
            for call in calls.values():
                call(model)
        for _ in range(max(3, rounds * 2)):
            for name, model in models.items():
                times = {call: timed(fn, model) for call, fn in calls.items()}
                for call in ("one_hook", "every_hook"):
                    ratios[f"{name}_{call}"].append(times[call] / times["plain"])
    return {key: statistics.median(r) for key, r in ratios.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median taken)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per round")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    peaks = {p: matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16) for p in args.precisions}
    for p, g in peaks.items():
        print(f"matmul peak {p}: {g:,.0f} GFLOP/s (2048x2048)")

    figures = {"device": str(device)}
    for label, d_mlp in (("attn_only", None), ("mlp", 1024)):
        for precision in args.precisions:
            compiled = make_workbench(d_mlp, device)
            start = time.perf_counter()
            for block in compiled.blocks:
                block.compile()
            runs = {"workbench": Trainer(make_workbench(d_mlp, device), device, precision, "fused"),
                    "workbench_foreach": Trainer(make_workbench(d_mlp, device), device, precision, "foreach"),
                    "workbench_compiled": Trainer(compiled, device, precision, "fused"),
                    "bridge": Trainer(make_bridge(d_mlp, device), device, precision)}
            runs["workbench_compiled"].tokens_per_s(2)  # compiles (forward and backward) on its first steps
            compile_s = time.perf_counter() - start
            for t in runs.values():  # warm-up
                t.tokens_per_s(2)
            samples = {k: [] for k in runs}
            for _ in range(args.rounds):
                for k, t in runs.items():
                    samples[k].append(t.tokens_per_s(args.steps))
            tok = {k: statistics.median(v) for k, v in samples.items()}
            wb, tb = tok["workbench"], tok["bridge"]
            gflops = wb * flops_per_token(d_mlp) / 1e9
            key = f"{label}_{precision}"
            step_s, step_compiled_s = B * S / wb, B * S / tok["workbench_compiled"]
            pays_off = compile_s / (step_s - step_compiled_s) if step_compiled_s < step_s else None
            figures.update({f"tok_s_workbench_{key}": round(wb), f"tok_s_bridge_{key}": round(tb),
                            f"ratio_vs_bridge_{key}": round(wb / tb, 3),
                            f"ratio_fused_vs_foreach_adamw_{key}": round(wb / tok["workbench_foreach"], 3),
                            f"ratio_compiled_vs_not_{key}": round(tok["workbench_compiled"] / wb, 3),
                            f"ratio_compiled_vs_bridge_{key}": round(tok["workbench_compiled"] / tb, 3),
                            f"compile_s_{key}": round(compile_s, 1),
                            f"compile_pays_off_after_steps_{key}": round(pays_off) if pays_off else None,
                            f"gflops_workbench_{key}": round(gflops, 1),
                            f"share_of_matmul_peak_{key}": round(gflops / peaks[precision], 3)})
            print(f"{label:>9} {precision}: workbench {wb:>8,.0f} tok/s | TransformerBridge {tb:>8,.0f} tok/s | "
                  f"ratio {wb / tb:.2f}x | {gflops:,.0f} GFLOP/s = {gflops / peaks[precision]:.0%} of matmul peak")
            print(f"{'':>15} fused AdamW vs foreach: {wb / tok['workbench_foreach']:.3f}x | compiled blocks "
                  f"{tok['workbench_compiled']:,.0f} tok/s = {tok['workbench_compiled'] / wb:.2f}x, "
                  f"{tok['workbench_compiled'] / tb:.2f}x the bridge; compiling took {compile_s:.1f} s"
                  + (f", paid off after {pays_off:,.0f} steps" if pays_off else ", never pays off"))

    overhead = hook_overhead(device, args.rounds)
    for key, ratio in overhead.items():
        figures[f"cache_over_plain_ratio_{key}"] = round(ratio, 4)
    print(f"run_with_cache / plain forward: workbench one hook {overhead['workbench_one_hook']:.3f}x, every hook "
          f"{overhead['workbench_every_hook']:.3f}x | TransformerBridge one hook {overhead['bridge_one_hook']:.3f}x, "
          f"every hook {overhead['bridge_every_hook']:.3f}x")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
