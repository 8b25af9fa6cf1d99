"""Peers-mode worker: `generate` with the KV cache, on the workbench `Transformer` or TL3's
`HookedTransformer`, holding the same weights.

    python benchmarks/peer_workers/worker_tl_generate.py --side workbench|tl3 --model attn-only-2l
        [--batch 1] [--prompt 32] [--new 64] [--n-ctx N] [--steps N] [--warmup N] [--serve]

Both sides read the shipped model folder models/<name>/ (config.json and model.safetensors, with
safetensors; the tl3 side imports nothing from this checkout, and gets tokenizer.json as a Hugging
Face tokenizer, which its generate requires even for token input). An --n-ctx beyond the model's tiles its
positional embedding (W_pos repeated), so that longer prompts fit, with the same weights on both
sides. One step is one `generate(tokens, max_new_tokens=--new, do_sample=True, stop_at_eos=False,
verbose=False)` on fixed random prompt tokens [--batch, --prompt], sampling with the global RNG
(seeded once); tok/s counts the new tokens, batch × --new per step.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from _common import base_parser, quiet_stdout, serve, timed, versions

ROOT = Path(__file__).resolve().parent.parent.parent


def load_weights(name: str, n_ctx: Optional[int] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The shipped model's config (its 'model' section) and weights, with W_pos tiled up to n_ctx."""
    from safetensors.torch import load_file

    folder = ROOT / "models" / name
    cfg = dict(json.loads((folder / "config.json").read_text())["model"])
    weights = load_file(str(folder / "model.safetensors"))
    if n_ctx is not None and n_ctx > cfg["n_ctx"]:
        W_pos = weights["pos_embed.W_pos"]
        weights["pos_embed.W_pos"] = W_pos.repeat(-(-n_ctx // len(W_pos)), 1)[:n_ctx].contiguous()
        cfg["n_ctx"] = n_ctx
    return cfg, weights


def tl3_tokenizer(folder: Path, tmp: Path) -> Any:
    """The model's tokenizer.json as a Hugging Face tokenizer (TL3's generate asserts that it has one), with
    <|endoftext|> as BOS, EOS and padding, saved to a folder first: TL3 reloads it from its name_or_path."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token=eos, eos_token=eos,
                            pad_token=eos).save_pretrained(str(tmp))
    return AutoTokenizer.from_pretrained(str(tmp))


def build(side: str, name: str, n_ctx: Optional[int]) -> torch.nn.Module:
    cfg, weights = load_weights(name, n_ctx)
    if side == "workbench":
        sys.path.insert(0, str(ROOT))
        from workbench.model.transformer import ModelConfig, Transformer

        model = Transformer(ModelConfig.from_dict(cfg))
        model.load_state_dict(weights, strict=True)
        return model.eval()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tl_cfg = HookedTransformerConfig(n_layers=cfg["n_layers"], d_model=cfg["d_model"], n_heads=cfg["n_heads"],
                                     d_head=cfg["d_head"], d_mlp=cfg["d_mlp"], attn_only=cfg["d_mlp"] is None,
                                     act_fn=cfg["act_fn"], normalization_type=cfg["normalization_type"],
                                     n_ctx=cfg["n_ctx"], d_vocab=cfg["d_vocab"], device="cpu")
    with tempfile.TemporaryDirectory(prefix="worker-tokenizer-") as tmp:
        model = HookedTransformer(tl_cfg, tokenizer=tl3_tokenizer(ROOT / "models" / name, Path(tmp)))
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith((".IGNORE", ".mask"))]  # TL3's own buffers
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    return model.eval()


def main() -> None:
    parser = base_parser(__doc__, ("workbench", "tl3"))
    parser.add_argument("--model", default="attn-only-2l", help="a shipped model folder under models/")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per generate call")
    parser.add_argument("--n-ctx", type=int, default=None, help="tile W_pos up to this context")
    args = parser.parse_args()
    quiet_stdout()
    model = build(args.side, args.model, args.n_ctx)
    d_vocab = model.cfg.d_vocab
    prompt = torch.randint(0, d_vocab - 1, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)

    def step() -> None:
        out = model.generate(prompt, max_new_tokens=args.new, do_sample=True, stop_at_eos=False, verbose=False)
        assert out.shape == (args.batch, args.prompt + args.new), out.shape

    info = {"versions": versions("transformer-lens"), "model": type(model).__name__, "weights": args.model,
            "n_ctx": model.cfg.n_ctx, "batch": args.batch, "prompt": args.prompt, "new": args.new}
    timed(step, max(args.warmup, 1))
    serve(lambda: {"tok_s": args.batch * args.new * args.steps / timed(step, args.steps)}, info, args.serve)


if __name__ == "__main__":
    main()
