"""Peers-mode worker: the workbench `Transformer` or TL3's `HookedTransformer`, same config.

    python benchmarks/peer_workers/worker_tl.py --side workbench|tl3 --task train|cache
        [--d-mlp 0|1024] [--precision fp32|bf16] [--steps N] [--warmup N] [--serve]

The config is benchmarks/train_speed.py's (2 layers, d_model 256, 8 heads of 32, n_ctx 256, d_vocab
1024, LayerNorm, gelu; --d-mlp 0 is attention-only), random-initialised with seed 0. Both sides run
the same code from here on:

- train: train_speed.Trainer's step on 16 x 256 fixed random tokens: loss via return_type="loss"
  (under bf16 autocast with --precision bf16), backward, clip_grad_norm 1.0, AdamW lr 1e-4 (on
  the workbench side the fused AdamW its trainer uses; torch's default on the TL3 side).
- cache: under no_grad, --steps plain forwards, then --steps `run_with_cache` with every hook (no
  names_filter), on the same tokens; the cache is dropped after each.

The workbench side (this checkout's interpreter) builds its model with train_speed.make_workbench;
the tl3 side (its venv's python) imports nothing from this checkout.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from _common import base_parser, quiet_stdout, serve, timed, versions

B, S, D, H, L, V = 16, 256, 256, 8, 2, 1024


def build(side: str, d_mlp: int) -> torch.nn.Module:
    if side == "workbench":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/
        import train_speed

        assert (train_speed.B, train_speed.S, train_speed.D, train_speed.H, train_speed.L, train_speed.V) == \
            (B, S, D, H, L, V), "benchmarks/train_speed.py changed its config: update worker_tl.py to match"
        torch.manual_seed(0)
        return train_speed.make_workbench(d_mlp or None, "cpu")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=L, d_model=D, n_heads=H, d_head=D // H, n_ctx=S, d_vocab=V,
                                  d_mlp=d_mlp or None, attn_only=not d_mlp, act_fn="gelu",
                                  normalization_type="LN", seed=0, device="cpu")
    return HookedTransformer(cfg)


def main() -> None:
    parser = base_parser(__doc__, ("workbench", "tl3"))
    parser.add_argument("--task", choices=("train", "cache"), default="train")
    parser.add_argument("--d-mlp", type=int, default=1024, help="0: attention-only")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    quiet_stdout()
    model = build(args.side, args.d_mlp)
    info = {"versions": versions("transformer-lens"), "model": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters())}

    if args.task == "train":
        tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(0))
        if args.side == "workbench":  # its trainer's optimizer (fused AdamW), as train_speed.py times it
            from workbench.train.optim import fused_adam

            opt = fused_adam(torch.optim.AdamW, model.parameters(), lr=1e-4)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:  # train_speed.Trainer.step, on both sides
            ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
                   else contextlib.nullcontext())
            with ctx:
                loss = model(tokens, return_type="loss")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        timed(step, args.warmup)
        serve(lambda: {"tok_s": B * S * args.steps / timed(step, args.steps)}, info, args.serve)
        return

    model.eval()
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))

    def plain() -> None:
        model(tokens)

    def cached() -> None:
        _, cache = model.run_with_cache(tokens)
        del cache

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        info["hooks_cached"] = len(cache)
        del cache
        for _ in range(max(args.warmup, 1)):
            plain()
            cached()

        def measure() -> dict[str, float]:
            t_plain = timed(plain, args.steps)
            t_cached = timed(cached, args.steps)
            return {"plain_tok_s": B * S * args.steps / t_plain, "cached_tok_s": B * S * args.steps / t_cached}

        serve(measure, info, args.serve)


if __name__ == "__main__":
    main()
