"""Patching speed: the workbench's activation patching, attribution patching and EAP against
TransformerLens 4's `transformer_lens.patching` in the same process, on the same models.

    python benchmarks/patching_speed.py [--device auto|cpu|cuda] [--rounds N] [--prompts B] [--full]
                                        [--quick] [--skip-gpt2] [--gpt2-layers 12 --gpt2-width 768 ...]

Models: the shipped attn-only-2l and gelu-2l on `induction_task` and facts on `fact_task`
(workbench/cache/tasks.py), and a random GPT-2-small-shaped model (124M: 12 layers, d_model 768,
12 heads, vocab 50,257) built with transformers, saved into a temporary folder and loaded with
`workbench.load("hf:<folder>")` as a TransformerLens TransformerBridge, on B random 20-token prompt
pairs (the corrupt prompt has one token changed; logit_diff read at the last position).

1. Activation patching, ours (`activation_patch(..., normalized=False)`) against TL's function on
   the same model (its TransformerBridge for GPT-2, the workbench's own Transformer for the shipped
   models, where TL's module runs on it; an error is recorded, not raised, where it does not):
       resid_pre by position      vs get_act_patch_resid_pre                 every (layer, position)
       z by head                  vs get_act_patch_attn_head_out_all_pos     every head
       z by head_position         vs get_act_patch_attn_head_out_by_pos      with --full (TL is slow)
   TL's time (tl_s) includes the `run_with_cache` of the clean prompts that it needs (ours computes
   the same run inside the call); tl_cache_s is that part of it. The two must agree to 1e-5 (max abs
   difference reported). Goal: 5x.
2. Attribution patching of every head and position (`attribution_patch(model, task, "z",
   by="head_position", check=0)`) against exact patching of the same set: time ratio (goal 50x)
   and Pearson correlation of the two.
3. EAP (`workbench.compute.patching.edges.edge_attribution(model, task, "eap")`) over every edge of
   the GPT-2-small-shaped model's component graph: the first (cold) call, then the median of
   --rounds calls. Goal: under 30 s.

Each model gets one warm-up of the cheap calls (1 and the attribution), then --rounds interleaved
rounds (default 3 for the shipped models, 1 for GPT-2 small); times are medians, each ratio the
median of the per-round ratios. --prompts sets the prompt pairs of every task (default: 1 for GPT-2,
the tasks' own defaults for the shipped models: 8 for induction, 16 for facts). --quick is a smoke
test: 1 round, small tasks and, unless --gpt2-* say otherwise, a tiny GPT-2 (2 layers, width 64).

Ends with one JSON line; it exits with status 1 after it where ours and TL disagree by more than 1e-5.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.cache.tasks import PatchingTask, fact_task, induction_task  # noqa: E402
from workbench.compute.patching import activation_patch, attribution_patch  # noqa: E402
from workbench.compute.patching.metrics import resolve_metric  # noqa: E402
from workbench.model.loading import load, resolve_device  # noqa: E402

AGREE = 1e-5
GOAL_ACTIVATION, GOAL_ATTRIBUTION, GOAL_EAP_S = 5.0, 50.0, 30.0
SHIPPED = (("attn-only-2l", "induction"), ("gelu-2l", "induction"), ("facts", "facts"))
GPT2_SMALL = {"layers": 12, "width": 768, "heads": 12, "vocab": 50257, "tokens": 20}
GPT2_TINY = {"layers": 2, "width": 64, "heads": 4, "vocab": 1000, "tokens": 8}


@dataclass(frozen=True)
class Sweep:
    """One set of patches, ours and TL's way."""

    key: str
    site: str
    by: str
    tl_function: str
    """The name of TL's function in transformer_lens.patching."""


RESID = Sweep("resid_pre_by_position", "resid_pre", "position", "get_act_patch_resid_pre")
HEADS = Sweep("z_by_head", "z", "head", "get_act_patch_attn_head_out_all_pos")
HEAD_POSITIONS = Sweep("z_by_head_position", "z", "head_position", "get_act_patch_attn_head_out_by_pos")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars (TL's patching loop, transformers' loading) or warnings on the console."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    """One model and task: each call timed, returning (seconds, values as a numpy array)."""

    def __init__(self, model: Any, task: PatchingTask, device: torch.device) -> None:
        self.model, self.task, self.device = model, task.to(device), device
        self.metric, self.metric_name = resolve_metric("auto", self.task)

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        sync(self.device)
        start = time.perf_counter()
        out = fn()
        sync(self.device)
        return time.perf_counter() - start, out

    def ours(self, sweep: Sweep) -> tuple[float, np.ndarray]:
        seconds, result = self.timed(lambda: activation_patch(
            self.model, self.task, sweep.site, by=sweep.by, metric=self.metric_name, normalized=False,
            progress=False))
        return seconds, result.values

    def tl(self, sweep: Sweep) -> tuple[float, float, np.ndarray]:
        """(seconds in all, of which the clean run_with_cache TL's function needs, values)."""
        from transformer_lens import patching

        function = getattr(patching, sweep.tl_function)
        task, metric = self.task, self.metric

        with quiet():
            cache_s, (_, cache) = self.timed(lambda: self.model.run_with_cache(task.clean))
            seconds, values = self.timed(lambda: function(self.model, task.corrupt, cache,
                                                          lambda logits: metric(logits, task).mean()))
        return cache_s + seconds, cache_s, values.detach().float().cpu().numpy()

    def attribution(self) -> tuple[float, np.ndarray]:
        seconds, result = self.timed(lambda: attribution_patch(
            self.model, self.task, "z", by="head_position", metric=self.metric_name, normalized=False, check=0,
            progress=False))
        return seconds, result.values


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _ratio(slow: list[float], fast: list[float]) -> float:
    return statistics.median(s / f for s, f in zip(slow, fast))


def bench_model(bench: Bench, rounds: int, full: bool) -> dict[str, Any]:
    """Sections 1 and 2 on one model: a warm-up, then `rounds` interleaved rounds."""
    sweeps = [RESID, HEADS] + ([HEAD_POSITIONS] if full else [])
    times: dict[str, list[float]] = {f"{s.key}_{who}": [] for s in sweeps for who in ("ours", "tl", "tl_cache")}
    times.update(exact=[], attribution=[])
    diff = {s.key: 0.0 for s in sweeps}
    tl_error: dict[str, Optional[str]] = {s.key: None for s in sweeps}
    patches: dict[str, int] = {}

    def compare(sweep: Sweep, ours: np.ndarray, record: bool) -> None:
        if tl_error[sweep.key] is not None:
            return
        try:
            seconds, cache_s, theirs = bench.tl(sweep)
        except Exception as err:  # TL's module on a model it was not written for: recorded, not raised
            tl_error[sweep.key] = f"{type(err).__name__}: {err}"[:500]
            return
        if theirs.shape != ours.shape:
            tl_error[sweep.key] = f"TL's result has shape {theirs.shape}, ours {ours.shape}"
            return
        diff[sweep.key] = max(diff[sweep.key], float(np.abs(theirs - ours).max()))
        if record:
            times[f"{sweep.key}_tl"].append(seconds)
            times[f"{sweep.key}_tl_cache"].append(cache_s)

    for sweep in (RESID, HEADS):  # warm-up, also checked for agreement
        compare(sweep, bench.ours(sweep)[1], record=False)
    bench.attribution()
    for _ in range(rounds):
        for sweep in (RESID, HEADS):
            seconds, ours = bench.ours(sweep)
            times[f"{sweep.key}_ours"].append(seconds)
            patches[sweep.key] = ours.size
            compare(sweep, ours, record=True)
        seconds, exact = bench.ours(HEAD_POSITIONS)
        times["exact"].append(seconds)
        if full:
            times[f"{HEAD_POSITIONS.key}_ours"].append(seconds)
            patches[HEAD_POSITIONS.key] = exact.size
            compare(HEAD_POSITIONS, exact, record=True)
        seconds, estimate = bench.attribution()
        times["attribution"].append(seconds)

    out: dict[str, Any] = {}
    for sweep in sweeps:
        ours_t, tl_t = times[f"{sweep.key}_ours"], times[f"{sweep.key}_tl"]
        ok = tl_error[sweep.key] is None
        out[sweep.key] = {"patches": patches[sweep.key], "ours_s": round(_median(ours_t), 4),
                          "tl_s": round(_median(tl_t), 4) if ok else None,
                          "tl_cache_s": round(_median(times[f"{sweep.key}_tl_cache"]), 4) if ok else None,
                          "ratio": round(_ratio(tl_t, ours_t), 2) if ok else None,
                          "max_abs_diff": diff[sweep.key] if ok else None,
                          "agree": diff[sweep.key] <= AGREE if ok else None,
                          "goal_ratio": GOAL_ACTIVATION,
                          "goal_met": _ratio(tl_t, ours_t) >= GOAL_ACTIVATION if ok else None,
                          "tl_error": tl_error[sweep.key]}
    corr = float(np.corrcoef(exact.ravel(), estimate.ravel())[0, 1]) if exact.std() > 0 and estimate.std() > 0 \
        else None
    ratio = _ratio(times["exact"], times["attribution"])
    out["attribution_z_by_head_position"] = {
        "patches": int(exact.size), "exact_s": round(_median(times["exact"]), 4),
        "attribution_s": round(_median(times["attribution"]), 5), "ratio": round(ratio, 1),
        "correlation": None if corr is None or not math.isfinite(corr) else round(corr, 4),
        "goal_ratio": GOAL_ATTRIBUTION, "goal_met": ratio >= GOAL_ATTRIBUTION}
    return out


def eap_figures(bench: Bench, rounds: int) -> dict[str, Any]:
    """Section 3: EAP over every edge of the component graph, cold then the median of `rounds` calls."""
    # -- EAP: workbench/compute/patching/edges.py (written alongside this benchmark) -----------------------
    try:
        from workbench.compute.patching.edges import edge_attribution
    except ImportError as err:
        return {"error": f"edges module not available: {err}"}
    cold, scores = bench.timed(lambda: edge_attribution(bench.model, bench.task, "eap"))
    warm = [bench.timed(lambda: edge_attribution(bench.model, bench.task, "eap"))[0] for _ in range(rounds)]
    seconds = _median(warm)
    return {"edges": int(scores.graph.n_edges), "cold_s": round(cold, 4), "seconds": round(seconds, 4),
            "goal_s": GOAL_EAP_S, "goal_met": seconds < GOAL_EAP_S}


def random_gpt2(folder: Path, shape: dict[str, int]) -> int:
    """Save a random GPT-2 of `shape` (and a small tokenizer) to `folder`; its parameter count."""
    import transformers

    from tests.hf_families import save_tokenizer

    special = min(50256, shape["vocab"] - 1)
    cfg = transformers.GPT2Config(n_layer=shape["layers"], n_embd=shape["width"], n_head=shape["heads"],
                                  vocab_size=shape["vocab"], n_positions=max(1024, shape["tokens"]),
                                  bos_token_id=special, eos_token_id=special)
    torch.manual_seed(0)
    with quiet():
        hf = transformers.GPT2LMHeadModel(cfg)
        hf.save_pretrained(folder)
        save_tokenizer(folder, cfg.vocab_size)
    return sum(p.numel() for p in hf.parameters())


def random_task(model: Any, prompts: int, tokens: int, device: torch.device) -> PatchingTask:
    """B random prompts of `tokens` tokens, the corrupt ones with token S//4 changed; logit_diff of two
    fixed tokens at the last position (the model is random: only the time means anything)."""
    V = int(model.cfg.d_vocab)
    clean = torch.randint(V // 50, V // 2, (prompts, tokens), generator=torch.Generator().manual_seed(0))
    corrupt = clean.clone()
    corrupt[:, tokens // 4] += 1
    position = torch.full((prompts, 1), tokens - 1)
    return PatchingTask("random", clean, corrupt, position, torch.full((prompts, 1), 11),
                        torch.full((prompts, 1), 12)).to(device)


def print_model(name: str, info: dict[str, Any], figures: dict[str, Any]) -> None:
    print(f"\n{name}: {info['task']} task, {info['prompts']} prompt pair(s) of {info['tokens']} tokens, "
          f"{info['layers']} layers x {info['heads']} heads")
    print(f"  {'patches':<28}{'n':>6}{'ours s':>10}{'TL s':>10}{'ratio':>9}  agreement")
    for key, value in figures.items():
        if key.startswith("attribution"):
            corr = "n/a" if value["correlation"] is None else f"{value['correlation']:.3f}"
            print(f"  {'attribution z head_position':<28}{value['patches']:>6}{value['attribution_s']:>10.4f}"
                  f"{value['exact_s']:>10.3f}{value['ratio']:>8.1f}x  (vs our exact) corr {corr}")
        elif key == "eap":
            if "error" in value:
                print(f"  EAP: {value['error']}")
            else:
                print(f"  {'EAP, every edge':<28}{value['edges']:>6}{value['seconds']:>10.3f}{'':>10}{'':>9}  "
                      f"cold {value['cold_s']:.3f} s")
        elif value["tl_error"] is not None:
            print(f"  {key:<28}{value['patches']:>6}{value['ours_s']:>10.3f}{'error':>10}{'':>9}  "
                  f"TL: {value['tl_error'][:100]}")
        else:
            print(f"  {key:<28}{value['patches']:>6}{value['ours_s']:>10.3f}{value['tl_s']:>10.3f}"
                  f"{value['ratio']:>8.1f}x  max|diff| {value['max_abs_diff']:.1e}")


def summary(models: dict[str, dict[str, Any]]) -> list[str]:
    """One line per goal: the measured figure beside the goal."""
    lines = []
    for name, figures in models.items():
        for key in (RESID.key, HEADS.key, HEAD_POSITIONS.key):
            value = figures.get(key)
            if value is not None and value["ratio"] is not None:
                lines.append(f"{name} {key}: {value['ratio']:.1f}x against TL (goal {GOAL_ACTIVATION:.0f}x)")
        value = figures["attribution_z_by_head_position"]
        lines.append(f"{name} attribution vs exact: {value['ratio']:.1f}x (goal {GOAL_ATTRIBUTION:.0f}x), "
                     f"correlation {value['correlation']}")
        if "eap" in figures and "error" not in figures["eap"]:
            lines.append(f"{name} EAP over {figures['eap']['edges']:,} edges: {figures['eap']['seconds']:.2f} s "
                         f"(goal under {GOAL_EAP_S:.0f} s)")
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds (default 3 for the shipped models, 1 for GPT-2 small)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompt pairs per task (default 1 for GPT-2, the tasks' defaults for the shipped models)")
    parser.add_argument("--full", action="store_true", help="also z by head_position against TL (slow)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round: a smoke test")
    parser.add_argument("--skip-gpt2", action="store_true", help="only the shipped models")
    for key in GPT2_SMALL:
        parser.add_argument(f"--gpt2-{key}", type=int, default=None,
                            help=f"the random GPT-2's {key} (default {GPT2_SMALL[key]}; {GPT2_TINY[key]} with --quick)")
    args = parser.parse_args(argv)
    for name in ("rounds", "prompts", *(f"gpt2_{k}" for k in GPT2_SMALL)):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    rounds = args.rounds or (1 if args.quick else 3)
    gpt2_rounds = args.rounds or 1
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    out: dict[str, Any] = {"device": str(device), "threads": torch.get_num_threads(), "quick": args.quick,
                           "full": args.full, "agreement_tolerance": AGREE, "models": {}}

    for name, task_name in SHIPPED:
        model = load(name, device=device)
        if task_name == "induction":
            task = induction_task(model, **({"n_prompts": args.prompts} if args.prompts else
                                            {"n_prompts": 2} if args.quick else {}),
                                  **({"half": 4} if args.quick else {}))
        else:
            task = fact_task(model, **({"n_prompts": args.prompts} if args.prompts else
                                       {"n_prompts": 2} if args.quick else {}))
        info = {"task": task_name, "prompts": task.n_prompts, "tokens": task.seq_len,
                "layers": int(model.cfg.n_layers), "heads": int(model.cfg.n_heads), "rounds": rounds}
        figures = bench_model(Bench(model, task, device), rounds, args.full)
        print_model(name, info, figures)
        out["models"][name] = {**info, **figures}

    if not args.skip_gpt2:
        shape = {k: getattr(args, f"gpt2_{k}") or (GPT2_TINY if args.quick else GPT2_SMALL)[k] for k in GPT2_SMALL}
        with tempfile.TemporaryDirectory(prefix="workbench-patching-") as tmp:
            params = random_gpt2(Path(tmp), shape)
            with quiet():
                model = load(f"hf:{tmp}", device=device)
        task = random_task(model, args.prompts or 1, shape["tokens"], device)
        bench = Bench(model, task, device)
        info = {"task": "random", "prompts": task.n_prompts, "tokens": task.seq_len, "layers": shape["layers"],
                "heads": shape["heads"], "width": shape["width"], "vocab": shape["vocab"], "parameters": params,
                "rounds": gpt2_rounds}
        figures = bench_model(bench, gpt2_rounds, args.full)
        figures["eap"] = eap_figures(bench, gpt2_rounds)
        print_model("gpt2-small-shaped (random)", info, figures)
        out["models"]["gpt2_small_random"] = {**info, **figures}

    print("\nmeasured against the goals:")
    print("\n".join(f"  {line}" for line in summary(out["models"])))
    disagree = [f"{name} {key}" for name, figures in out["models"].items() for key, value in figures.items()
                if isinstance(value, dict) and value.get("agree") is False]
    out["all_agree"] = not disagree
    if disagree:
        print(f"\nDISAGREEMENT with TL beyond {AGREE:g}: {', '.join(disagree)}")
    print(json.dumps(out))
    if disagree:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
