"""Wall time of each analysis whose issue sets a time budget, end to end as a user runs it.

    induction-heads   attn-only-2l with all its checkpoints        budget 60 s on 2 cores
    circuits          every shipped model (attn-only-1l/2l, gelu-2l) budget 30 s on 2 cores
    superposition     the default sweeps, phase diagram, |x| task    budget 60 s on 2 cores
    sae               gelu-2l: 7 SAEs, dashboards, known features    budget 120 s on 2 cores
    fact-recall       the facts model: tracing, probes, knockout     budget 120 s on 2 cores
    circuit-tracing   facts and gelu-2l with shipped transcoders     budget 180 s on 2 cores

Each is timed twice: load the models, compute, draw every figure, write the report folder.

    cold   a fresh token cache, so any text an analysis reads is tokenized first (what the very
           first run on a new machine pays)
    warm   the cache filled by the cold run (every later run)

    python benchmarks/analysis_speed.py [--device auto|cpu|cuda] [--only circuits]

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
from workbench.model.loading import load, resolve_model_path  # noqa: E402
from workbench.report.pipeline import run_analysis, write_report  # noqa: E402

BUDGETS = {"induction-heads": (("attn-only-2l",), 60.0),
           "circuits": (("attn-only-2l", "attn-only-1l", "gelu-2l"), 30.0),
           "superposition": ((None,), 60.0),  # trains its own toy models
           "sae": (("gelu-2l",), 120.0),
           "fact-recall": (("facts",), 120.0),
           "circuit-tracing": (("facts", "gelu-2l"), 180.0)}


def timed_run(analysis: str, models: tuple[str, ...], device: str, out: Path) -> float:
    start = time.perf_counter()
    sections = [run_analysis(analysis, load(m, device=device) if m else None, device=device, model_label=m)
                for m in models]
    write_report(out, sections)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", choices=sorted(BUDGETS), default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    record = {}
    for analysis, (models, budget) in BUDGETS.items():
        if args.only and analysis != args.only:
            continue
        ckpts = {m: len(list_checkpoints(resolve_model_path(m))) for m in models if m is not None}
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["WORKBENCH_CACHE"] = str(Path(tmp) / "cache")  # cold: nothing tokenized yet
            cold = timed_run(analysis, models, args.device, Path(tmp) / "cold")
            warm = timed_run(analysis, models, args.device, Path(tmp) / "warm")
        print(f"{analysis} on {', '.join(m or 'its own toy models' for m in models)} (checkpoints: {ckpts}):")
        print(f"  cold {cold:.1f} s = {cold / budget:.2f} of the {budget:.0f} s budget; "
              f"warm {warm:.1f} s = {warm / budget:.2f}")
        record[analysis] = {"models": [m or "toy models" for m in models], "cold_seconds": round(cold, 2),
                            "warm_seconds": round(warm, 2), "budget_seconds": budget,
                            "cold_ratio_of_budget": round(cold / budget, 3),
                            "warm_ratio_of_budget": round(warm / budget, 3)}
    print(json.dumps(record))


if __name__ == "__main__":
    main()
