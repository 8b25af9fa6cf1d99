"""Where a transcoder reads and writes: each MLP's input hook (the norm before it) and output hook."""

from __future__ import annotations

import torch

from workbench.errors import InputError
from workbench.model.hooked import HookedModel


def per_token(act: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """An activation as [B, S, d] (OPT's bridge hands the MLP's hooks [B·S, d])."""
    return act.reshape(B, S, -1)


def input_hook(layer: int, parallel: bool = False) -> str:
    """The MLP's input: ln2's output, or ln1's in a block whose attention and MLP read the same norm
    (GPT-J, Phi)."""
    return f"blocks.{layer}.ln{1 if parallel else 2}.hook_normalized"


def output_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def mlp_layers(model: HookedModel) -> list[int]:
    """Every layer's index, or a clear error for a model whose blocks have no MLP (or no ln2 hook)."""
    n_layers = int(model.cfg.n_layers)
    missing = [l for l in range(n_layers) if output_hook(l) not in model.hook_dict]
    if missing:
        raise InputError(f"Transcoders imitate MLPs, and layers {missing} of this model have none (an attention-only "
                         "model?). Train SAEs on its attention outputs instead: `workbench run sae --hook "
                         "blocks.0.hook_attn_out`.")
    mlp_input_hooks(model)
    return list(range(n_layers))


def mlp_input_hooks(model: HookedModel) -> list[str]:
    """Each layer's MLP input hook (see `input_hook`), or a clear error where there is none."""
    from workbench.adapter import describe

    arch = describe(model)
    hooks = []
    for l in range(int(model.cfg.n_layers)):
        own = input_hook(l)  # a block with its own norm before the MLP (GPT-NeoX has one even when parallel)
        hooks.append(own if own in model.hook_dict or not arch.parallel else input_hook(l, parallel=True))
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise InputError(f"This model has no {missing[0]!r} hook (no normalisation before its MLP), which transcoders "
                         "read; circuit tracing does not support it.")
    return hooks
