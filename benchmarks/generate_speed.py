"""Generation speed: `Transformer.generate` with its KV cache, against the same model without it and
(with --peers) against TransformerLens 3's `HookedTransformer.generate` on the same weights.

    python benchmarks/generate_speed.py [--device auto|cpu|cuda] [--rounds 3] [--peers] [--venvs DIR]

1. tokens/s: each shipped text model (attn-only-1l, attn-only-2l, gelu-2l: n_ctx 128; facts: n_ctx 64,
   so 32 new tokens there; modular-addition, n_ctx 3, is left out) at batch 1 and 16, 64 new tokens
   sampled after a random 32-token prompt (do_sample=True, stop_at_eos=False, verbose=False), with the
   cache and without it (use_past_kv_cache=False), interleaved in rounds (median taken).
2. Cost per new token against prompt length 32, 128 and 512: the shipped models have n_ctx 128, so
   this runs on attn-only-2l's and gelu-2l's weights with W_pos tiled to n_ctx 640 (the same model
   shape; peer_workers/worker_tl_generate.load_weights). Per new token = (time of generate with 65
   new tokens - time with 1) / 64, at batch 1, with and without the cache: the prompt's forward is
   not counted.
3. --peers: peers.py's tl3 generate workloads (peers.GENERATE_WORKLOADS: TL3 3.9 in its own venv,
   made by peers.ensure_venv on first use, against the workbench on the same weights, interleaved
   rounds in two worker processes).

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "peer_workers"))

from worker_tl_generate import load_weights  # noqa: E402

from workbench.model.loading import load, resolve_device  # noqa: E402
from workbench.model.transformer import ModelConfig, Transformer  # noqa: E402

MODELS = ("attn-only-1l", "attn-only-2l", "gelu-2l", "facts")
PROMPT, NEW, BATCHES, PROMPT_LENGTHS = 32, 64, (1, 16), (32, 128, 512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(model: Transformer, prompt: torch.Tensor, new: int, cache: bool, reps: int = 1) -> float:
    """Wall time of `reps` generate calls (sampling, no early stop)."""
    sync(prompt.device)
    start = time.perf_counter()
    for _ in range(reps):
        model.generate(prompt, max_new_tokens=new, do_sample=True, stop_at_eos=False, verbose=False,
                       use_past_kv_cache=cache)
    sync(prompt.device)
    return time.perf_counter() - start


def tokens_per_s(device: torch.device, rounds: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name in MODELS:
        model = load(name, device=device)
        new = min(NEW, model.cfg.n_ctx - PROMPT)
        for batch in BATCHES:
            prompt = torch.randint(0, model.cfg.d_vocab - 1, (batch, PROMPT),
                                   generator=torch.Generator().manual_seed(0)).to(device)
            for cache in (True, False):
                seconds(model, prompt, new, cache)  # warm-up
            samples: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(rounds):
                for cache in (True, False):
                    samples[cache].append(batch * new / seconds(model, prompt, new, cache))
            with_cache, without = (statistics.median(samples[c]) for c in (True, False))
            key = f"{name.replace('-', '_')}_b{batch}"
            figures[f"tok_s_cache_{key}"] = round(with_cache)
            figures[f"tok_s_no_cache_{key}"] = round(without)
            figures[f"ratio_cache_vs_no_cache_{key}"] = round(with_cache / without, 3)
            print(f"{name:>13} batch {batch:>2} ({new} new): cache {with_cache:>8,.0f} tok/s | no cache "
                  f"{without:>8,.0f} tok/s | {with_cache / without:.2f}x", flush=True)
    return figures


def per_token_cost(device: torch.device, rounds: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name in ("attn-only-2l", "gelu-2l"):
        cfg, weights = load_weights(name, n_ctx=640)
        model = Transformer(ModelConfig.from_dict(cfg))
        model.load_state_dict(weights)
        model = model.to(device).eval()
        for length in PROMPT_LENGTHS:
            prompt = torch.randint(0, model.cfg.d_vocab - 1, (1, length),
                                   generator=torch.Generator().manual_seed(0)).to(device)
            costs: dict[bool, list[float]] = {True: [], False: []}
            for cache in (True, False):
                seconds(model, prompt, NEW + 1, cache)  # warm-up
            for _ in range(rounds):
                for cache in (True, False):
                    long, short = seconds(model, prompt, NEW + 1, cache), seconds(model, prompt, 1, cache)
                    costs[cache].append((long - short) / NEW)
            with_cache, without = (statistics.median(costs[c]) * 1e3 for c in (True, False))
            key = f"{name.replace('-', '_')}_prompt{length}"
            figures[f"ms_per_token_cache_{key}"] = round(with_cache, 3)
            figures[f"ms_per_token_no_cache_{key}"] = round(without, 3)
            print(f"{name:>13} prompt {length:>3}: {with_cache:.3f} ms per new token with the cache | "
                  f"{without:.3f} ms without", flush=True)
    return figures


def peers_figures(rounds: int, venvs: Path) -> dict[str, object]:
    spec = importlib.util.spec_from_file_location("peers_benchmark", HERE / "peers.py")
    peers = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = peers  # its dataclasses look their module up there
    spec.loader.exec_module(peers)
    python = peers.ensure_venv(peers.PEERS["tl3"], venvs.expanduser())
    args = argparse.Namespace(steps=None, warmup=1, dead_fraction=0.25, rounds=rounds)
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="workbench-generate-") as tmp:
        for workload in peers.GENERATE_WORKLOADS:
            result = peers.run_workload(workload, "tl3", python, args, Path(tmp))
            print("\n".join(peers.report_lines(workload, "tl3", result["figures"])), flush=True)
            figures[workload.name] = peers._compact(result["figures"])
    return figures


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median taken)")
    parser.add_argument("--peers", action="store_true", help="also TL3's generate, in its own venv (peers mode)")
    parser.add_argument("--venvs", type=Path, default=Path("~/.cache/workbench-peers"),
                        help="the peers-mode venvs folder (default ~/.cache/workbench-peers)")
    parser.add_argument("--skip-local", action="store_true", help="only the --peers figures")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    figures: dict[str, object] = {"device": str(device)}
    if not args.skip_local:
        figures.update(tokens_per_s(device, args.rounds))
        figures.update(per_token_cost(device, args.rounds))
    if args.peers:
        figures["tl3"] = peers_figures(args.rounds, args.venvs)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
