"""An SAE spliced into its model by hook: reconstruction in place of the activation (with or
without the error term), feature ablation and steering, and the downstream metrics.

    splice_hook(sae)                         x -> x̂ (what the model sees is the SAE's reconstruction)
    splice_hook(sae, keep_error=True)        x -> x̂ + (x - x̂) = x, through the SAE's latents
    feature_hook(sae, feature, scale=0)      ablate one latent, keeping the error term
    feature_hook(sae, feature, add=5.0)      steer: add to one latent
    downstream_metrics(model, sae, tokens)   CE loss recovered (zero and mean ablation) and KL to clean

Use them with `model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.hook_name, hook)])`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from workbench.adapter.tokens import token_strings
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.model.transformer import lm_loss
from workbench.sae.modules import SAE
from workbench.strict_json import ratio

Hook = Callable[[torch.Tensor, Any], torch.Tensor]


def _flat(act: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Per-head activations [B, S, H, K] are read as [B, S, H*K], as they were for training."""
    return (act.flatten(-2), act.shape) if act.ndim == 4 else (act, act.shape)


def splice_hook(sae: SAE, keep_error: bool = False, keep_first: bool = False) -> Hook:
    """A forward hook that replaces the activation by the SAE's reconstruction (plus the error term);
    with `keep_first`, position 0 keeps its own activation (for dictionaries trained without it)."""
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        x, shape = _flat(act)
        x_hat = sae(x.float())
        out = (x_hat + (x.float() - x_hat).detach() if keep_error else x_hat).to(act.dtype).view(shape)
        if keep_first:
            out[:, 0] = act[:, 0]
        return out
    return hook


def feature_hook(sae: SAE, feature: int, scale: float = 0.0, add: float = 0.0, keep_error: bool = True) -> Hook:
    """A forward hook that sets latent `feature` to scale · f + add (scale 0, add 0: ablate) and
    decodes; with `keep_error`, only the latent's change reaches the model."""
    if not 0 <= feature < sae.d_sae:
        raise InputError(f"Feature {feature} is out of range: this SAE has latents 0–{sae.d_sae - 1}.")

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        x, shape = _flat(act)
        f = sae.encode(x.float())
        error = x.float() - sae.decode(f)
        f = f.clone()
        f[..., feature] = f[..., feature] * scale + add
        out = sae.decode(f) + (error if keep_error else 0)
        return out.to(act.dtype).view(shape)
    return hook


@torch.no_grad()
def logit_change(model: HookedModel, tokens: torch.Tensor, hook_name: str, hook: Hook, top: int = 10
                 ) -> dict[str, Any]:
    """The intervention's change to the next-token logits at the last position: the largest rises
    and falls, by token."""
    clean = model(tokens)[:, -1].float()
    patched = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])[:, -1].float()
    delta = (patched - clean).mean(0)
    up, down = delta.topk(top), (-delta).topk(top)
    return {"delta": delta, "up": list(zip(token_strings(model, up.indices.cpu()), up.values.tolist())),
            "down": list(zip(token_strings(model, down.indices.cpu()), (-down.values).tolist()))}


MIN_ABLATION_GAP = 0.01
"""CE loss recovered divides by CE_ablated − CE_clean; below this many nats per token the gap is
noise (an ablation the model hardly notices) and the ratio is reported as None."""


@torch.no_grad()
def downstream_metrics(model: HookedModel, sae: SAE, tokens: torch.Tensor, hook_name: Optional[str] = None
                       ) -> dict[str, Optional[float]]:
    """Next-token loss clean, with the SAE spliced in, with the hook zero-ablated and mean-ablated;
    CE loss recovered against each ablation, (CE_ablated − CE_sae) / (CE_ablated − CE_clean), None
    when that gap is below MIN_ABLATION_GAP; and the mean KL(clean ‖ spliced) per token."""
    hook_name = hook_name or sae.cfg.hook_name
    if hook_name not in model.hook_dict:
        raise InputError(f"The model has no hook {hook_name!r} for this SAE (cfg.hook_name).")
    store: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        store["act"] = act
        return act

    clean_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, keep)]).float()
    sae.check_input(_flat(store["act"])[0])
    mean_act = store["act"].mean(dim=(0, 1), keepdim=True)
    sae_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, splice_hook(sae))]).float()
    zero_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, lambda a, hook: torch.zeros_like(a))]).float()
    mean_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, lambda a, hook: mean_act.expand_as(a))]).float()
    ce = {name: float(lm_loss(lg, tokens)) for name, lg in
          (("clean", clean_logits), ("sae", sae_logits), ("zero", zero_logits), ("mean", mean_logits))}
    logp, logq = clean_logits.log_softmax(-1), sae_logits.log_softmax(-1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())

    def recovered(base: str) -> Optional[float]:
        return ratio(ce[base] - ce["sae"], ce[base] - ce["clean"], MIN_ABLATION_GAP)

    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
            "ce_mean_ablation": ce["mean"], "ce_loss_recovered_zero": recovered("zero"),
            "ce_loss_recovered_mean": recovered("mean"), "kl_div": kl}
