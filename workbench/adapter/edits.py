"""Edits that make a model into another for a comparison: attention knockout (by the method the probe
verified takes effect on this architecture, `workbench.adapter.probe`) and a random-weights control
re-initialised by the architecture's own init."""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch

from workbench.adapter.architecture import DoesNotApplyError, KnockoutMethod, _device, _is_bridge
from workbench.adapter.knockout import _knock_out
from workbench.adapter.probe import describe
from workbench.model.hooked import HookedModel
from workbench.model.transformer import Transformer


@torch.no_grad()
def run_with_knockout(model: HookedModel, tokens_BS: torch.Tensor, blocked: dict[int, torch.Tensor],
                      fwd_hooks: Sequence = (), method: Optional[KnockoutMethod] = None) -> torch.Tensor:
    """Logits [B, S, V] of a run in which, at each layer l of `blocked`, query s does not attend to key
    t where `blocked[l][b, s, t]` is True: the rest of each row is renormalised, exactly as if those
    scores were -inf. `fwd_hooks` run after the knockout's own. An error where no knockout edit
    could be verified on this architecture."""
    arch = describe(model)
    method = method or arch.knockout
    if method is None:
        arch.require("knockout", "attention knockout")
    return _knock_out(model, tokens_BS, blocked, method, fwd_hooks)


@torch.no_grad()
def random_control(model: HookedModel, seed: int) -> Any:
    """The same architecture with fresh weights drawn the way the architecture itself initialises them:
    a workbench Transformer re-built with its init and another seed; a TransformerBridge copied and
    re-initialised by its Hugging Face model's own `_init_weights` (norm weights at their init
    values: 1, or 0 where RMSNorm scales by 1 + w). The global RNG is left as it was."""
    if isinstance(model, Transformer):
        cfg = type(model.cfg)(**{**model.cfg.to_dict(), "seed": seed})
        return Transformer(cfg, tokenizer=model.tokenizer).to(_device(model)).eval()
    arch = describe(model)
    hf = model.original_model if _is_bridge(model) else None
    if hf is None or not hasattr(hf, "_init_weights"):
        raise DoesNotApplyError(f"{arch.label}: a random-weights control does not apply: the model has no "
                                "initialisation of its own (a Hugging Face `_init_weights`) to draw it from.")
    control = _copy(model)
    hf = control.original_model
    before = {n: p.clone() for n, p in hf.named_parameters() if p.ndim >= 2}
    device = _device(control)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in hf.modules():
            hf._init_weights(module)
    kept = [n for n, p in hf.named_parameters() if n in before and torch.equal(p, before[n])]
    if kept:
        raise DoesNotApplyError(f"{arch.label}: a random-weights control does not apply: the model's own "
                                f"initialisation left {len(kept)} weight matrices unchanged (e.g. {kept[0]}).")
    return control.eval()


def _copy(model: HookedModel) -> Any:
    """A deep copy of a model. A bridge's attention keeps its last pattern, which still carries its
    autograd graph after a run with gradients; deepcopy refuses such tensors, so they are copied
    detached (they are overwritten on the next forward anyway)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
