"""Peers-mode check: `workbench transcoder export` against circuit-tracer's own loader and attribution.

Run by hand (not by CI or the test suite): circuit-tracer 0.5 needs TransformerLens 3, which cannot
share a venv with the workbench's TransformerLens 4, so it runs in a venv of its own, made and
marked the way benchmarks/peers.py makes its venvs (under --venvs, default ~/.cache/workbench-peers/;
a folder without the marker is never used or touched).

    python benchmarks/circuit_tracer_check.py [--venvs DIR] [--repeats 3] [--threads 1]

What it does, on the shipped `gelu-2l`:
1. trains two small per-layer transcoder sets that circuit-tracer can represent: BatchTopK with a
   skip connection (exported as a JumpReLU with its learned threshold) and ReLU + L1 without one
   (the shipped transcoders are TopK, which circuit-tracer's file loader cannot represent: the
   export refuses them, and this script checks that it does);
2. exports each with `export_circuit_tracer`, then, in circuit-tracer's venv
   (benchmarks/peer_workers/worker_circuit_tracer.py), loads them with circuit-tracer's own
   `load_transcoders` into its `TransformerLensReplacementModel` holding gelu-2l's weights, and runs
   its `get_activations`, `attribute`, `prune_graph` and `compute_graph_scores` on a 16- and a
   48-token prompt (BOS first);
3. builds the workbench's graphs of the same token ids with `GraphConfig.circuit_tracer_compatible()`
   and compares: the active features (the same set) and their activations (≤ 1e-5), the logit
   targets and probabilities, every edge (≤ 1e-5), the pruned node set and both scores;
4. times `attribute` and `build_graph`, each on --threads CPU threads in its own process, --repeats
   runs after one warm-up, and prints the ratio (circuit-tracer's time / the workbench's).

Ends with one JSON line holding every figure; exits 1 if any comparison fails. Setting up the venv
the first time takes a few minutes; a run about 2 to 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402  (benchmarks/peers.py: the venvs and their markers)

PEER = peers.Peer("circuit_tracer", "circuit-tracer==0.5.0", "circuit_tracer")
TOLERANCE = 1e-5
SETS = {  # name: (architecture, skip, extra training options)
    "batchtopk_skip": ("batchtopk", True, {"k": 16}),
    "relu": ("relu", False, {"l1_coefficient": 5.0}),
}
PROMPTS = {16: "QEjaXVzC QEjaXVz", 48: "def add(a, b):\n    return a + b\n\nprint(add(1, 2)"}


def prompt_ids(model: Any, text: str, n_tokens: int) -> list[int]:
    """BOS then the text's tokens, exactly n_tokens long."""
    from workbench.cache.rows import special_ids

    bos, _ = special_ids(model)
    ids = [bos] + model.tokenizer.encode(text)
    if len(ids) < n_tokens:
        raise SystemExit(f"the {n_tokens}-token prompt is only {len(ids)} tokens long")
    return ids[:n_tokens]


def compare(ours: Any, theirs: dict[str, torch.Tensor], header: dict[str, Any], tc: Any, model: Any) -> dict[str, Any]:
    """Every figure of one prompt's comparison."""
    from workbench.cache.collect import run_collect
    from workbench.compute.attribution_graph import graph_scores, prune
    from workbench.sae.transcoders import per_token

    tokens = torch.tensor([ours.tokens])
    _, acts = run_collect(model, tokens, [tc.in_hook(l) for l in range(tc.n_layers)])
    S = tokens.shape[1]
    with torch.no_grad():
        mine = torch.stack([tc.encode(l, per_token(acts[tc.in_hook(l)], 1, S)[0].float())
                            for l in range(tc.n_layers)])
    mine[:, 0] = 0  # position 0 (the BOS) is left out on both sides
    same_active = bool(torch.equal(ours.features.long(), theirs["active_features"]))
    result = {
        "n_tokens": S,
        "active_features": {"workbench": ours.n_features, "circuit_tracer": int(theirs["active_features"].shape[0])},
        "same_active_features": same_active,
        "max_activation_difference": float((mine - theirs["activations"]).abs().max()),
        "same_logit_targets": bool(torch.equal(ours.logit_tokens.long(), theirs["logit_tokens"])),
        "max_logit_probability_difference": float((ours.logit_probs - theirs["logit_probabilities"]).abs().max())
        if ours.logit_tokens.shape == theirs["logit_tokens"].shape else float("inf"),
    }
    if same_active and ours.adjacency.shape == theirs["adjacency"].shape:
        diff = (ours.adjacency - theirs["adjacency"]).abs()
        result["max_edge_difference"] = float(diff.max())
        result["largest_edge"] = float(theirs["adjacency"].abs().max())
        result["edges_compared"] = int((theirs["adjacency"] != 0).sum())
    else:
        result["max_edge_difference"] = float("inf")
    pr = prune(ours, 0.8, 0.98)
    theirs_nodes = theirs["node_mask"].bool()
    result["pruned_nodes"] = {"workbench": int(pr.node_mask.sum()), "circuit_tracer": int(theirs_nodes.sum())}
    result["same_pruned_nodes"] = bool(torch.equal(pr.node_mask, theirs_nodes))
    scores = graph_scores(ours)
    result["scores"] = {"workbench": scores, "circuit_tracer": {"replacement_score": header["replacement_score"],
                                                                "completeness_score": header["completeness_score"]}}
    result["max_score_difference"] = max(abs(scores["replacement_score"] - header["replacement_score"]),
                                         abs(scores["completeness_score"] - header["completeness_score"]))
    result["ok"] = (same_active and result["same_logit_targets"] and result["max_activation_difference"] <= TOLERANCE
                    and result["max_edge_difference"] <= TOLERANCE and result["max_logit_probability_difference"]
                    <= TOLERANCE and result["same_pruned_nodes"] and result["max_score_difference"] <= 1e-4)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/circuit_tracer_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--venvs", type=Path, default=peers.DEFAULT_VENVS)
    parser.add_argument("--repeats", type=int, default=3, help="timed attributions per prompt and side")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads on each side (default 1)")
    parser.add_argument("--n-tokens", type=int, default=300_000, help="tokens each transcoder set trains on")
    parser.add_argument("--work", type=Path, default=None, help="folder for the exports (default: a temporary one)")
    args = parser.parse_args(argv)
    try:
        python = peers.ensure_venv(PEER, args.venvs.expanduser())
    except peers.SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import workbench
    from workbench.compute.attribution_graph import GraphConfig, build_graph
    from workbench.errors import InputError
    from workbench.sae.circuit_tracer_format import export_circuit_tracer
    from workbench.sae.transcoders import load_transcoders, train_transcoders

    torch.manual_seed(0)
    model = workbench.load("gelu-2l", device="cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix="circuit-tracer-check-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"tolerance": TOLERANCE, "threads": args.threads, "sets": {}}
    try:
        export_circuit_tracer(load_transcoders(Path(workbench.__file__).parent.parent / "models/gelu-2l/transcoders"),
                              work / "shipped")
        figures["shipped_topk_refused"] = False
    except InputError as err:
        figures["shipped_topk_refused"] = "TopK" in str(err)
    prompts = {n: prompt_ids(model, text, n) for n, text in PROMPTS.items()}
    (work / "prompts.json").write_text(json.dumps(list(prompts.values())))
    ok = figures["shipped_topk_refused"]
    for name, (arch, skip, extra) in SETS.items():
        print(f"[{name}] training per-layer {arch} transcoders on gelu-2l ({args.n_tokens:,} tokens)", flush=True)
        tc, _ = train_transcoders(model, 512, None, arch, skip=skip, n_tokens=args.n_tokens, batch_size=2048,
                                  n_rows=400, progress=False, model_name="gelu-2l", **extra)
        export = export_circuit_tracer(tc, work / f"export-{name}")
        out = work / f"circuit-tracer-{name}.safetensors"
        cmd = [str(python), str(HERE / "peer_workers" / "worker_circuit_tracer.py"), "--model-dir",
               str(Path(workbench.__file__).parent.parent / "models" / "gelu-2l"), "--transcoders", str(export),
               "--prompts", str(work / "prompts.json"), "--out", str(out), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
        print(f"[{name}] circuit-tracer: loading the export and attributing", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            print(f"error: circuit-tracer's side failed (exit {done.returncode}) for {name}", file=sys.stderr)
            return 1
        with safe_open(str(out), framework="pt") as f:
            header = json.loads(f.metadata()["header"])
            theirs_all = {k: f.get_tensor(k) for k in f.keys()}
        set_figures: dict[str, Any] = {"architecture": arch, "skip": skip, "versions": header["versions"],
                                       "circuit_tracer_activation": header["activation_functions"], "prompts": []}
        torch.set_num_threads(args.threads)
        for i, (n, ids) in enumerate(prompts.items()):
            theirs = {k.split(".", 1)[1]: v for k, v in theirs_all.items() if k.startswith(f"p{i}.")}
            cfg = GraphConfig.circuit_tracer_compatible(batch_size=256)
            graph = build_graph(model, tc, torch.tensor([ids]), cfg, progress=False)  # warm-up, and compared
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                build_graph(model, tc, torch.tensor([ids]), cfg, progress=False)
                seconds.append(time.perf_counter() - start)
            result = compare(graph, theirs, header["prompts"][i], tc, model)
            ct_s, wb_s = statistics.median(header["prompts"][i]["seconds"]), statistics.median(seconds)
            result["seconds"] = {"workbench": wb_s, "circuit_tracer": ct_s}
            result["speed_ratio_circuit_tracer_over_workbench"] = ct_s / wb_s
            set_figures["prompts"].append(result)
            ok &= result["ok"]
            print(f"[{name}] {n} tokens: {result['active_features']['workbench']} active features "
                  f"(same set: {result['same_active_features']}), activations within "
                  f"{result['max_activation_difference']:.1e}, edges within {result['max_edge_difference']:.1e} "
                  f"(largest {result.get('largest_edge', float('nan')):.2f}), pruned nodes "
                  f"{result['pruned_nodes']['workbench']} vs {result['pruned_nodes']['circuit_tracer']} "
                  f"(same: {result['same_pruned_nodes']}), scores within {result['max_score_difference']:.1e}; "
                  f"build_graph {wb_s:.3f} s, attribute {ct_s:.3f} s: {ct_s / wb_s:.2f}x "
                  f"{'ok' if result['ok'] else 'MISMATCH'}", flush=True)
        figures["sets"][name] = set_figures
    figures["ok"] = bool(ok)
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
