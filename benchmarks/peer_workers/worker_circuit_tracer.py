"""Peers-mode worker: circuit-tracer's own attribution on a workbench model and its exported transcoders.

    python benchmarks/peer_workers/worker_circuit_tracer.py --model-dir models/gelu-2l
        --transcoders <folder written by `workbench transcoder export`> --prompts prompts.json
        --out result.safetensors [--repeats 3] [--threads 1]

Runs under circuit-tracer's venv (circuit-tracer 0.5 with its TransformerLens 3) and imports nothing
from this checkout. It
1. builds a TransformerLens `HookedTransformerConfig` from the model folder's config.json and loads
   model.safetensors into circuit-tracer's `TransformerLensReplacementModel` (the workbench stores
   TransformerLens's own parameter names and shapes; fold_ln etc. are off, as circuit-tracer's
   `from_pretrained_and_transcoders` has them);
2. loads the transcoders as a circuit-tracer user would: `yaml.safe_load(config.yaml)`, then
   `circuit_tracer.utils.hf_utils.load_transcoders(config)` from inside the folder (circuit-tracer
   opens the listed paths relative to the working directory), with its default lazy loading;
3. for each prompt (token ids, BOS first): `model.get_activations` (the transcoder activations, with
   position 0 zeroed as in its attribution), `attribute(...)` with its defaults (10 logits, 0.95 of
   the probability), `prune_graph` (0.8 / 0.98) and `compute_graph_scores`, timing `attribute` over
   --repeats runs after one warm-up.
Everything goes into one safetensors file (tensors per prompt `p<i>.<name>`, and a JSON header).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def build_model(model_dir: Path, transcoders):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from transformer_lens import HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((model_dir / "config.json").read_text())["model"]
    if spec.get("normalization_type", "LN") != "LN" or spec.get("d_mlp") is None:
        raise SystemExit(f"{model_dir}: this worker builds LayerNorm models with MLPs only")
    cfg = HookedTransformerConfig(
        n_layers=spec["n_layers"], d_model=spec["d_model"], n_heads=spec["n_heads"], d_head=spec["d_head"],
        d_mlp=spec["d_mlp"], act_fn=spec["act_fn"], normalization_type="LN", n_ctx=spec["n_ctx"],
        d_vocab=spec["d_vocab"], positional_embedding_type="standard", default_prepend_bos=False,
        device="cpu", dtype=torch.float32, model_name=model_dir.name)
    model = TransformerLensReplacementModel.from_config(cfg, transcoders)
    weights = load_file(str(model_dir / "model.safetensors"))
    wrapped = {".mlp.": ".mlp.old_mlp.", "unembed.": "unembed.old_unembed."}  # circuit-tracer's wrappers
    renamed = {}
    for k, v in weights.items():
        for part, inside in wrapped.items():
            if k.startswith(part) or f"{part}" in k and part.startswith("."):
                k = k.replace(part, inside, 1)
                break
        renamed[k] = v
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if not k.startswith("transcoders.") and not k.endswith((".mask", ".IGNORE"))]
    if missing or unexpected:
        raise SystemExit(f"the model's parameters do not map onto TransformerLens's: missing {missing}, "
                         f"unexpected {unexpected}")
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                              bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--transcoders", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="a JSON list of token-id lists")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = json.loads(args.prompts.read_text())
    model_dir, out = args.model_dir.resolve(), args.out.resolve()

    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.utils.hf_utils import load_transcoders

    os.chdir(args.transcoders)  # circuit-tracer opens the listed files relative to the working directory
    config = yaml.safe_load(Path("config.yaml").read_text())
    transcoders = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32)
    model = build_model(model_dir, transcoders)

    tensors, header = {}, {"prompts": [], "versions": {}}
    import importlib.metadata as md
    header["versions"] = {p: md.version(p) for p in ("circuit-tracer", "transformer-lens", "torch")}
    header["activation_functions"] = [type(t.activation_function).__name__ if isinstance(t.activation_function,
                                      torch.nn.Module) else getattr(t.activation_function, "__name__", "?")
                                      for t in transcoders]
    for i, ids in enumerate(prompts):
        tokens = torch.tensor(ids)
        with torch.no_grad():
            logits, acts = model.get_activations(tokens)
        graph = attribute(tokens, model, batch_size=256, verbose=False)  # warm-up, and the graph compared
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            attribute(tokens, model, batch_size=256, verbose=False)
            seconds.append(time.perf_counter() - start)
        pruned = prune_graph(graph, 0.8, 0.98)
        replacement, completeness = compute_graph_scores(graph)
        tensors.update({
            f"p{i}.logits": logits[0, -1].float().contiguous() if logits.ndim == 3 else logits[-1].float(),
            f"p{i}.activations": acts.to_dense().float().contiguous() if acts.is_sparse else acts.float(),
            f"p{i}.active_features": graph.active_features.long().contiguous(),
            f"p{i}.activation_values": graph.activation_values.float().contiguous(),
            f"p{i}.selected_features": graph.selected_features.long().contiguous(),
            f"p{i}.adjacency": graph.adjacency_matrix.float().contiguous(),
            f"p{i}.logit_tokens": torch.tensor([t.vocab_idx for t in graph.logit_targets]).long(),
            f"p{i}.logit_probabilities": graph.logit_probabilities.float().contiguous(),
            f"p{i}.input_tokens": graph.input_tokens.long().contiguous(),
            f"p{i}.node_mask": pruned.node_mask.to(torch.uint8).contiguous(),
            f"p{i}.edge_mask": pruned.edge_mask.to(torch.uint8).contiguous(),
        })
        header["prompts"].append({"n_tokens": len(ids), "seconds": seconds, "replacement_score": replacement,
                                  "completeness_score": completeness})
    save_file(tensors, str(out), metadata={"header": json.dumps(header)})
    print(json.dumps({"done": str(out)}))


if __name__ == "__main__":
    sys.exit(main())
