"""Peers-mode worker: one TopK training step, sparsify 1.3 against the workbench trainer.

    python benchmarks/peer_workers/worker_sparsify.py --side workbench|sparsify --d-in 256 --d-sae 4096
        [--steps N] [--warmup N] [--dead-fraction F] [--serve]

k 32, batch 4096 of fixed random activations (4 batches, cycled), fp32, with AuxK on the same dead
latents on both sides (`_common.dead_mask`).

The sparsify side does what `sparsify.trainer.Trainer.fit` does for one SAE per step with
loss_fn "fvu", optimizer "adam" and auxk_alpha 1/32 (the step starts from a batch of activations, so the
model forward and its hook plumbing are left out):

- on the first step, b_dec set to the batch mean (in the warm-up);
- W_dec renormalised to unit rows (`set_decoder_norm_to_unit_norm`, normalize_decoder is on);
- dead mask = `num_tokens_since_fired > dead_feature_threshold` (the counter is set before each step
  so that exactly the chosen latents are dead);
- `SparseCoder.forward(x, y, dead_mask=..., total_variance=...)`: its fused TopK encoder, sparse
  decoder (the eager `embedding_bag` one on a CPU: Triton is GPU-only), FVU and AuxK loss;
- fired latents marked, the losses read out for logging (`float(...)`, as its trainer does);
- backward of fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8;
- `remove_gradient_parallel_to_decoder_directions`, Adam step (torch.optim.Adam at sparsify's default
  lr for the width; its trainer uses bitsandbytes' 8-bit Adam only when that is installed, and it is
  not here), zero_grad, its linear warm-up schedule's step, the tokens-since-fired update.

sparsify's default optimizer is "signum" and its default auxk_alpha is 0; Adam with AuxK is chosen
here because that is what the workbench trainer does. The workbench side runs `_Trainer.train_step` of
a TopK SAE of the same size (unit-norm decoder, AuxK over d_in / 2 dead latents, Adam, grad clipping).
"""

from __future__ import annotations

import torch
from _common import base_parser, dead_mask, quiet_stdout, sae_batches, serve_sae, versions

BATCH, K, AUXK_ALPHA = 4096, 32, 1 / 32


def sparsify_step(d_in: int, d_sae: int, dead: torch.Tensor):
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)  # as its trainer does, per init seed
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=K), "cpu", dtype=torch.float32)
    opt = torch.optim.Adam([dict(params=sae.parameters(), lr=2e-4 / (d_sae / 2**14) ** 0.5)])
    scheduler = get_linear_schedule_with_warmup(opt, 1000, 100_000)  # its defaults: 1000 warm-up steps
    threshold = 10_000_000  # its default dead_feature_threshold
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    did_fire = torch.zeros(d_sae, dtype=torch.bool)
    held = dead.long() * (threshold + 1)
    state = {"global_step": 0, "avg_fvu": 0.0, "avg_auxk": 0.0}

    def step(x: torch.Tensor) -> None:
        since_fired.copy_(held)
        if state["global_step"] == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        mask = since_fired > threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        state["avg_fvu"] += float(out.fvu.detach())
        state["avg_auxk"] += float(out.auxk_loss.detach())
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss + out.multi_topk_fvu / 8
        loss.div(1).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        scheduler.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
        state["global_step"] += 1

    return step


def main() -> None:
    parser = base_parser(__doc__, ("workbench", "sparsify"))
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    args = parser.parse_args()
    quiet_stdout()
    dead = dead_mask(args.d_sae, args.dead_fraction)
    info = {"dead_latents": int(dead.sum())}
    if args.side == "workbench":
        from _workbench import sae_step

        step = sae_step("topk", args.d_in, args.d_sae, K, BATCH, dead)
        info["versions"] = versions("workbench")
    else:
        step = sparsify_step(args.d_in, args.d_sae, dead)
        info["versions"] = versions("eai-sparsify", "transformers")
    serve_sae(step, sae_batches(args.d_in, BATCH), args, info)


if __name__ == "__main__":
    main()
