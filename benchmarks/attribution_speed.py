"""Seconds to build an attribution graph on the `facts` model (6 layers) with per-layer TopK transcoders
of 4,096 features, and how the time grows with the prompt's length and with the number of active
features.

    length sweep     prompts of 8, 16, 32 and 64 tokens of held-out facts text, k = 16
    features sweep   a 16-token prompt, k = 4, 8, 16, 32, 64 features per token and layer
    peer             the same 16-token graph with one target per backward pass (batch_size 1), the
                     naive way, against the batched default: what batching buys

The transcoders are freshly initialised: the cost depends on how many features are active, which TopK
fixes at k per token and layer, not on what they learned. Each figure is the best of --rounds builds
after one warm-up. Goal (issue): under 10 s for 16 tokens on 2 CPU cores, and growth no worse than
linear in the number of active features (the exponent of time against active features, fitted over
the sweep, at most about 1).

    python benchmarks/attribution_speed.py [--device auto|cpu|cuda] [--rounds 3]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.cache.rows import held_out_text  # noqa: E402
from workbench.compute.attribution_graph import GraphConfig, build_graph  # noqa: E402
from workbench.model.loading import load, resolve_device  # noqa: E402
from workbench.sae.transcoders import as_transcoders, make_transcoders  # noqa: E402

WIDTH = 4096


def timed(model, tc, prompt, rounds: int, cfg: Optional[GraphConfig] = None) -> tuple[float, int]:
    """(best seconds of `rounds` builds after a warm-up, active features)."""
    cfg = cfg or GraphConfig()
    graph = build_graph(model, tc, prompt, cfg, progress=False)
    best = float("inf")
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        build_graph(model, tc, prompt, cfg, progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, graph.n_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = load("facts", device=device)
    rows, _ = held_out_text(model, 4, 64)
    text = rows[0]
    print(f"facts model ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}) on {device}, "
          f"{torch.get_num_threads()} threads; per-layer TopK transcoders of {WIDTH:,} features")

    def transcoders(k: int):
        return as_transcoders(make_transcoders(model, WIDTH, "topk", k=k, skip=True, seed=0), model.cfg.n_layers,
                              "facts").to(device)

    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "width": WIDTH}
    tc16 = transcoders(16)
    print("\nprompt length (k = 16):")
    out["by_length"] = []
    for n in (8, 16, 32, 64):
        s, nf = timed(model, tc16, text[:n], args.rounds)
        out["by_length"].append({"tokens": n, "seconds": s, "active_features": nf})
        print(f"  {n:>3} tokens   {nf:>6,} active features   {s:7.2f} s")
    print("\nactive features (16 tokens):")
    out["by_features"] = []
    for k in (4, 8, 16, 32, 64):
        s, nf = timed(model, transcoders(k), text[:16], args.rounds)
        out["by_features"].append({"k": k, "seconds": s, "active_features": nf})
        print(f"  k = {k:>2}   {nf:>6,} active features   {s:7.2f} s")
    nf = np.array([r["active_features"] for r in out["by_features"]], float)
    secs = np.array([r["seconds"] for r in out["by_features"]])
    out["exponent"] = float(np.polyfit(np.log(nf), np.log(secs), 1)[0])
    per_feature = secs / nf
    print(f"  time ∝ active_features^{out['exponent']:.2f} over the sweep; "
          f"{1e3 * per_feature.min():.2f}–{1e3 * per_feature.max():.2f} ms per active feature")
    sixteen = next(r for r in out["by_length"] if r["tokens"] == 16)["seconds"]
    naive, _ = timed(model, tc16, text[:16], 1, GraphConfig(batch_size=1))
    out["peer"] = {"batched_s": sixteen, "one_target_per_backward_s": naive, "speedup": naive / sixteen}
    print(f"\npeer: one target per backward pass {naive:.1f} s vs batched {sixteen:.2f} s = {naive / sixteen:.1f}× "
          "faster batched")
    out["goal_16_tokens_under_10s"] = sixteen < 10.0
    out["goal_linear_in_features"] = out["exponent"] <= 1.1
    print(f"\ngoal: 16 tokens under 10 s: {'met' if sixteen < 10 else 'NOT met'} ({sixteen:.2f} s); growth no worse "
          f"than linear in active features: {'met' if out['goal_linear_in_features'] else 'NOT met'} "
          f"(exponent {out['exponent']:.2f})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
