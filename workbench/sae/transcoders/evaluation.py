"""How well a set of transcoders imitates its model: reconstruction per layer, and the next-token loss
with the MLPs spliced out for the transcoders (all at once or one at a time), against zero- and
mean-ablating them."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, Optional

import torch

from workbench.model.hooked import HookedModel
from workbench.sae.transcoders.hooks import output_hook, per_token
from workbench.sae.transcoders.replacement import Transcoders


@torch.no_grad()

def evaluate_transcoders(model: HookedModel, tc: Transcoders, rows: torch.Tensor, batch_rows: int = 16
                         ) -> dict[str, Any]:
    """Per layer: FVU of the MLP output, L0 and dead fraction on `rows` (positions 1 on); and the next-token
    loss (every position) with the
    model clean, with every MLP replaced by its transcoder (no error terms), with each MLP replaced
    alone, with the error terms added back (which must equal clean), and with every MLP zero- and
    mean-ablated. CE loss recovered = (CE_ablated − CE_replaced) / (CE_ablated − CE_clean), where one
    MLP replaced alone is measured against zero-ablating that MLP alone. Replacing leaves position 0
    (usually the BOS, whose activations are outliers) as it is, as training leaves it out."""
    from workbench.cache.collect import run_collect
    from workbench.model.transformer import lm_loss
    from workbench.sae.interventions import MIN_ABLATION_GAP
    from workbench.sae.metrics import ReconstructionStats
    from workbench.strict_json import ratio

    tc.check_model(model)
    L = tc.n_layers
    stats = [ReconstructionStats(tc.width(l)) for l in range(L)]
    ce: dict[str, list[float]] = {}
    device = next(model.parameters()).device
    names = [h for l in range(L) for h in (tc.in_hook(l), output_hook(l))]
    means = None
    for start in range(0, len(rows), batch_rows):
        toks = rows[start:start + batch_rows].to(device)
        logits, acts = run_collect(model, toks, names)
        B, S = toks.shape
        xs = [per_token(acts[tc.in_hook(l)], B, S).float() for l in range(L)]
        ys = [per_token(acts[output_hook(l)], B, S).float() for l in range(L)]
        preds = tc.reconstruct(xs)
        # position 0 (the BOS, an outlier the transcoders never train on) is left out, as in training
        for l in range(L):
            f = tc.encode(l, xs[l][:, 1:])
            stats[l].add(ys[l][:, 1:].flatten(0, 1), preds[l][:, 1:].flatten(0, 1), f.flatten(0, 1))
        if means is None:
            means = [y[:, 1:].mean(dim=(0, 1), keepdim=True) for y in ys]
        runs = {"clean": logits, "replaced": _run_replaced(model, tc, toks, range(L)),
                "replaced_with_errors": _run_replaced(model, tc, toks, range(L),
                                                      errors=[ys[l] - preds[l] for l in range(L)]),
                "zero_ablated": _run_ablated(model, toks, range(L), _zeros),
                "mean_ablated": _run_ablated(model, toks, range(L), lambda l, a, m=means: m[l])}
        runs.update({f"replaced_layer_{l}": _run_replaced(model, tc, toks, [l]) for l in range(L)})
        runs.update({f"zero_layer_{l}": _run_ablated(model, toks, [l], _zeros) for l in range(L)})
        for name, lg in runs.items():
            ce.setdefault(name, []).append(float(lm_loss(lg.float(), toks)) * len(toks))
    n = len(rows)
    loss = {name: sum(v) / n for name, v in ce.items()}

    def recovered(replaced: str, base: str) -> Optional[float]:
        return ratio(loss[base] - loss[replaced], loss[base] - loss["clean"], MIN_ABLATION_GAP)

    layers = []
    for l in range(L):
        s = stats[l].summary()
        layers.append({"layer": l, "fvu": s["fvu"], "l0": s["l0"], "dead_fraction": s["dead_fraction"],
                       "ce_loss_recovered_alone": recovered(f"replaced_layer_{l}", f"zero_layer_{l}")})
    return {"layers": layers, "ce": loss,
            "ce_loss_recovered_zero": recovered("replaced", "zero_ablated"),
            "ce_loss_recovered_mean": recovered("replaced", "mean_ablated"),
            "with_errors_max_loss_change": abs(loss["replaced_with_errors"] - loss["clean"])}


def _zeros(layer: int, act: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(act)


def _run_ablated(model: HookedModel, toks: torch.Tensor, layers: Sequence[int], value: Any) -> torch.Tensor:
    """Logits with the MLP outputs of `layers` set to value(layer, act) (broadcast to act) from position 1
    on. Position 0 stays clean in these baselines as in the replacements (`_run_replaced`), so CE loss
    recovered compares like with like."""
    B, S = toks.shape

    def set_output(act, hook, l):
        out = value(l, act).expand_as(act).reshape(B, S, -1).clone()
        out[:, 0] = act.reshape(B, S, -1)[:, 0]
        return out.reshape(act.shape).to(act.dtype)

    return model.run_with_hooks(toks, fwd_hooks=[(output_hook(l), partial(set_output, l=l)) for l in layers])


def _run_replaced(model: HookedModel, tc: Transcoders, toks: torch.Tensor, layers: Sequence[int],
                  errors: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Logits with the MLP outputs of `layers` replaced by the transcoders' predictions from this run's
    own MLP inputs (plus `errors[l]`, the clean output minus the prediction on the clean run, if given:
    then every layer's output, and the logits, are the clean ones)."""
    xs: dict[int, torch.Tensor] = {}
    replaced = set(layers)

    B, S = toks.shape

    def keep(act, hook, l):
        xs[l] = per_token(act, B, S).float()
        return act

    def replace(act, hook, l):
        if l not in replaced:
            return act
        f_out = tc.b_dec(l).expand_as(xs[l]).clone()
        for l0 in range(l + 1):
            dec = tc.decoder(l0)
            if l - l0 < dec.shape[1]:
                f_out = f_out + tc.encode(l0, xs[l0]) @ dec[:, l - l0]
        s = tc.skip(l, xs[l])
        out = f_out + (s if s is not None else 0)
        if errors is not None:
            out = out + errors[l]
        out[:, 0] = per_token(act, B, S)[:, 0].float()  # position 0 stays clean: the transcoders never train on it
        return out.reshape(act.shape).to(act.dtype)

    hooks = [(tc.in_hook(l), lambda a, hook, l=l: keep(a, hook, l)) for l in range(tc.n_layers)]
    hooks += [(output_hook(l), lambda a, hook, l=l: replace(a, hook, l)) for l in range(tc.n_layers)]
    return model.run_with_hooks(toks, fwd_hooks=hooks)
