"""Every analysis at the size of the models people study: random-weight models with the shapes of
GPT-2 small (124M parameters, vocabulary 50,257) and Pythia-160M (GPT-NeoX: rotary, parallel
blocks, vocabulary 50,304), saved locally with `save_pretrained` and loaded the way a user loads
them, `workbench.load("hf:<folder>")`. Each analysis runs with its default settings, in a process
of its own, and the table gives its wall time and the peak memory of that process.

Goals on 2 CPU cores (issue 12): every analysis finishes, none needs more than 8 GB, none takes more
than 10 minutes. No analysis may build a [d_vocab, d_vocab] matrix: at 50k tokens one is 10 GB in
fp32, so a peak under 8 GB also shows that none was built.

    python benchmarks/real_model_scale.py                        # both models, every analysis
    python benchmarks/real_model_scale.py --models gpt2-small --analyses circuits
    python benchmarks/real_model_scale.py --tiny                 # a smoke run at toy size

Models and the tokenizer are built once under --folder (default $WORKBENCH_CACHE/real-scale, or
~/.cache/workbench/real-scale). The tokenizer is a byte-level BPE trained here on the Python
standard library's source, with 50,257 entries. Fact recall reads a small facts file written
next to the models (a random model recalls none of them; the analysis says so). Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = {
    # name: (transformers config class, its arguments)
    "gpt2-small": ("GPT2Config", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "pythia-160m": ("GPTNeoXConfig", dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                          num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25,
                                          rotary_emb_base=10000, max_position_embeddings=2048,
                                          use_parallel_residual=True, tie_word_embeddings=False)),
}
TINY = {"gpt2-small": dict(n_embd=64, n_layer=2, n_head=4), "pythia-160m": dict(hidden_size=64, num_hidden_layers=2,
                                                                              num_attention_heads=4,
                                                                              intermediate_size=256)}
ANALYSES = ("model-card", "induction-heads", "circuits", "sae", "fact-recall", "superposition")
FACTS = [("In Python the constant for nothing is", "nothing", " None"),
         ("The opposite of False is", "False", " True"),
         ("A method's first argument is called", "first argument", " self"),
         ("The sky on a clear day is", "sky", " blue"),
         ("To bring in a module you write", "module", " import"),
         ("A mapping of keys to values is a", "mapping", " dict"),
         ("A function hands back a result with", "result", " return"),
         ("Ice melts into", "Ice", " water"),
         ("A sequence of characters is a", "characters", " string"),
         ("The number before one is", "one", " zero"),
         ("A program that answers requests is a", "requests", " server"),
         ("The count of days in a year is one", "days", " year")]
"""Prompts with a single-token target under the benchmark's tokenizer (a BPE trained on Python's
source); rows whose target is not one token are dropped when the file is written."""
GOAL_SECONDS, GOAL_GB = 600.0, 8.0


def default_folder() -> Path:
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench")) / "real-scale"


def build(folder: Path, tiny: bool) -> dict[str, Path]:
    """Save each model (random weights, seed 0) and the shared tokenizer under `folder`, once."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from workbench.data.text import stdlib_files

    folder.mkdir(parents=True, exist_ok=True)
    tok_dir = folder / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        start = time.perf_counter()
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        texts = (p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files())
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=50257, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                             eos_token="<|endoftext|>").save_pretrained(tok_dir)
        print(f"trained a {tok.get_vocab_size():,}-token BPE on the standard library in "
              f"{time.perf_counter() - start:.0f} s")
    out = {}
    for name, (cls, kwargs) in MODELS.items():
        path = folder / (f"{name}-tiny" if tiny else name)
        if not (path / "config.json").exists():
            config = getattr(transformers, cls)(**{**kwargs, **(TINY[name] if tiny else {})},
                                                bos_token_id=0, eos_token_id=0)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
            model.save_pretrained(path)
            transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
            print(f"saved {name}: {sum(p.numel() for p in model.parameters()):,} parameters")
        out[name] = path
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    rows = [{"prompt": p, "subject": s, "target": t} for p, s, t in FACTS
            if len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1]
    (folder / "facts.json").write_text(json.dumps(rows))
    return out


def child(model_path: str, analysis: str, facts: str) -> None:
    """Load the model, run one analysis with its default settings, print a JSON line."""
    import torch

    from workbench.model.loading import load
    from workbench.report.pipeline import get_analysis, make_config, run_analysis

    start = time.perf_counter()
    spec = get_analysis(analysis)
    model = load(f"hf:{model_path}", device="cpu") if spec.uses_model else None
    load_s = time.perf_counter() - start
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    overrides = {"facts_file": facts} if analysis == "fact-recall" else {}
    start = time.perf_counter()
    section = run_analysis(analysis, model, make_config(spec, overrides), device="cpu")
    seconds = time.perf_counter() - start
    print(json.dumps({"load_s": load_s, "analysis_s": seconds, "rss_after_load_gb": rss_load,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "threads": torch.get_num_threads(), "headlines": section.headlines[:4]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--analyses", nargs="+", choices=ANALYSES, default=list(ANALYSES))
    parser.add_argument("--folder", type=Path, default=default_folder())
    parser.add_argument("--tiny", action="store_true", help="toy-sized models with the same code paths (smoke run)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before an analysis is stopped")
    parser.add_argument("--child", nargs=3, metavar=("MODEL_PATH", "ANALYSIS", "FACTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    paths = build(args.folder, args.tiny)
    facts = str(args.folder / "facts.json")
    rows = []
    print(f"{'model':<12} {'analysis':<16} {'load s':>7} {'analysis s':>11} {'peak GB':>8}  goal")
    for name in args.models:
        for analysis in args.analyses:
            if analysis == "superposition" and name != args.models[0]:
                continue  # model-free: once
            cmd = [sys.executable, __file__, "--child", str(paths[name]), analysis, facts]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                row = {"model": name, "analysis": analysis, "status": f"stopped after {args.timeout:.0f} s"}
            else:
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                if proc.returncode != 0 or not lines:
                    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                    row = {"model": name, "analysis": analysis, "status": f"failed: {tail}"}
                else:
                    row = {"model": name, "analysis": analysis, "status": "ok", **json.loads(lines[-1])}
            row["wall_s"] = time.perf_counter() - start
            rows.append(row)
            if row["status"] == "ok":
                met = row["analysis_s"] <= GOAL_SECONDS and row["peak_rss_gb"] <= GOAL_GB
                print(f"{name if analysis != 'superposition' else '(none)':<12} {analysis:<16} {row['load_s']:>7.1f} "
                      f"{row['analysis_s']:>11.1f} {row['peak_rss_gb']:>8.2f}  {'met' if met else 'MISSED'}",
                      flush=True)
            else:
                print(f"{name:<12} {analysis:<16} {row['status']}", flush=True)
    print(json.dumps({"tiny": args.tiny, "goal_s": GOAL_SECONDS, "goal_gb": GOAL_GB,
                      "rows": [{k: v for k, v in r.items() if k != "headlines"} for r in rows]}))


if __name__ == "__main__":
    main()
