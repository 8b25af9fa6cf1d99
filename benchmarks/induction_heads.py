"""Wall time of the whole induction-head analysis on the shipped attn-only-2l, all checkpoints.

The issue's budget: 60 s on 2 CPU cores. Timed end to end as a user runs it (load the model,
score, ablate, probe every checkpoint, draw every figure, write the report folder), twice:

    cold   a fresh token cache, so the validation text for the in-context-learning score is
           read and tokenized first (what the very first run on a new machine pays)
    warm   the cache filled by the cold run (every later run)

    python benchmarks/induction_heads.py [--device auto|cpu|cuda] [--model attn-only-2l]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.artifacts import list_checkpoints  # noqa: E402
from workbench.loading import resolve_model_path  # noqa: E402
from workbench.report import run_analysis, write_report  # noqa: E402

BUDGET_S = 60.0


def timed_run(model: str, device: str, out: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    section = run_analysis("induction-heads", model, device=device, model_label=model)
    write_report(out, [section])
    return time.perf_counter() - start, section.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="attn-only-2l")
    args = parser.parse_args()
    n_ckpt = len(list_checkpoints(resolve_model_path(args.model)))
    print(f"induction-heads on {args.model} ({n_ckpt} checkpoints), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WORKBENCH_CACHE"] = str(Path(tmp) / "cache")  # cold: nothing tokenized yet
        cold, metrics = timed_run(args.model, args.device, Path(tmp) / "cold")
        warm, _ = timed_run(args.model, args.device, Path(tmp) / "warm")
    print(f"cold: {cold:.1f} s ({cold / BUDGET_S:.2f} of the {BUDGET_S:.0f} s budget)")
    print(f"warm: {warm:.1f} s ({warm / BUDGET_S:.2f} of the budget)")
    print(f"found induction heads {metrics['induction_heads']}, phase change over steps "
          f"{metrics['phase_change_interval']}")
    print(json.dumps({"model": args.model, "checkpoints": n_ckpt, "cold_seconds": round(cold, 2),
                      "warm_seconds": round(warm, 2), "budget_seconds": BUDGET_S,
                      "cold_ratio_of_budget": round(cold / BUDGET_S, 3),
                      "warm_ratio_of_budget": round(warm / BUDGET_S, 3)}))


if __name__ == "__main__":
    main()
