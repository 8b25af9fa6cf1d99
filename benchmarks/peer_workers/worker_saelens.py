"""Peers-mode worker: one SAE training step, SAELens 6.54 against the workbench trainer.

    python benchmarks/peer_workers/worker_saelens.py --side workbench|saelens --arch topk|l1
        [--steps N] [--warmup N] [--dead-fraction F] [--serve]

benchmarks/sae_speed.py's configuration: d_in 256, d_sae 4096, batch 4096 of fixed random
activations (4 batches, cycled), k 32 for TopK, L1 coefficient 5, Adam lr 1e-3.

The saelens side runs SAELens's own trainer, `sae_lens.training.sae_trainer.SAETrainer.step`, the step
its `fit()` loop takes: `training_forward_pass` of `TopKTrainingSAE` (TopK, MSE + its AuxK loss on
the dead latents, decoder-norm rescaling as its default config has it) or `StandardTrainingSAE` (ReLU,
MSE + L1 weighted by the decoder norms) under its autocast setting (off), the fired-latent
bookkeeping, backward, clip_grad_norm 1.0, Adam, its lr and coefficient schedulers. SAELens decides
which latents are dead from the trainer's `n_forward_passes_since_fired`; it is set before each step
so that exactly the --dead-fraction latents of `_common.dead_mask` are dead (TopK only; L1 has no AuxK).

The workbench side runs `_Trainer.train_step` (as sae_speed.py), with the same latents held dead.
"""

from __future__ import annotations

import torch
from _common import base_parser, dead_mask, quiet_stdout, sae_batches, serve_sae, versions

D_IN, D_SAE, BATCH, K, L1 = 256, 4096, 4096, 32, 5.0


def saelens_step(arch: str, dead: torch.Tensor):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=L1))
    cfg = SAETrainerConfig(total_training_samples=BATCH * 1000, train_batch_size_samples=BATCH, lr=1e-3, lr_end=1e-4,
                           device="cpu")  # lr_end: what its runner config sets (lr / 10)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    held = dead.float() * (cfg.dead_feature_window + 1)

    def step(x: torch.Tensor) -> None:
        trainer.n_forward_passes_since_fired.copy_(held)  # exactly `dead` is dead: trainer.dead_neurons
        trainer.maybe_reset_sparsity()  # as fit() does before each step
        trainer.step(x)
        trainer.n_training_steps += 1

    return step, sae


def main() -> None:
    parser = base_parser(__doc__, ("workbench", "saelens"))
    parser.add_argument("--arch", choices=("topk", "l1"), default="topk")
    args = parser.parse_args()
    quiet_stdout()
    dead = dead_mask(D_SAE, args.dead_fraction if args.arch == "topk" else 0.0)
    info = {"dead_latents": int(dead.sum())}
    if args.side == "workbench":
        from _workbench import check_sae_speed_config, sae_step

        check_sae_speed_config(D_IN, D_SAE, K, BATCH)
        step = sae_step(args.arch, D_IN, D_SAE, K, BATCH, dead)
        info["versions"] = versions("workbench")
    else:
        step, sae = saelens_step(args.arch, dead)
        info["versions"] = versions("sae-lens", "transformer-lens")
        info["sae"] = type(sae).__name__
    serve_sae(step, sae_batches(D_IN, BATCH), args, info)


if __name__ == "__main__":
    main()
