"""Transcoders beside an SAE: what imitating an MLP costs, against reconstructing its output with a
dictionary of the same width and sparsity (`compare_with_sae`)."""

from __future__ import annotations

from typing import Any

import torch

from workbench.cache.activations import model_activations, stream_activations
from workbench.cache.rows import training_text
from workbench.model.hooked import HookedModel
from workbench.model.transformer import lm_loss
from workbench.sae.interventions import MIN_ABLATION_GAP, splice_hook
from workbench.sae.metrics import ReconstructionStats
from workbench.sae.modules import SAEConfig, make_sae
from workbench.sae.training import SAETrainConfig, train_saes
from workbench.sae.transcoders import Transcoders, output_hook
from workbench.strict_json import ratio


def compare_with_sae(model: HookedModel, tc: Transcoders, quality: dict[str, Any], rows: torch.Tensor,
                     sae_tokens: int, seed: int) -> dict[str, Any]:
    """A TopK SAE of the same width and k, trained on about `sae_tokens` tokens of the model's training
    text, on the output of the MLP whose zero-ablation costs the most loss, against that layer's
    transcoder: FVU and L0 of the MLP output and the loss recovered when each replaces it (against
    zero-ablating it), on the same held-out `rows`. `quality` is `evaluate_transcoders` on those rows."""
    ce = quality["ce"]
    layer = max(range(tc.n_layers), key=lambda l: ce[f"zero_layer_{l}"] - ce["clean"])
    hook, width = output_hook(layer), tc.width(layer)
    k = tc.clt.cfg.k if tc.clt is not None else tc.per_layer[layer].cfg.k
    sae = make_sae(SAEConfig(d_in=tc.d_model, d_sae=width, architecture="topk", k=k, hook_name=hook),
                   seed=seed).to(next(model.parameters()).device)
    train_rows, _ = training_text(model, 2000, min(int(model.cfg.n_ctx), 256))
    batch = 2048
    n_tokens = max(batch, sae_tokens // batch * batch)
    tcfg = SAETrainConfig(sae=sae.cfg, n_tokens=n_tokens, batch_size=batch, n_checkpoints=0, seed=seed,
                          dead_window=max(batch, min(200_000, n_tokens // 10)))
    train_saes({hook: sae}, stream_activations(model, train_rows, [hook], batch_size=batch, seed=seed), tcfg,
               progress=False)
    sae.eval()
    stats = ReconstructionStats(width)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            toks = rows[start:start + 16]
            x = model_activations(model, toks, [hook])[hook]
            f = sae.encode(x)
            stats.add(x, sae.decode(f), f)
            spliced = model.run_with_hooks(toks, fwd_hooks=[(hook, splice_hook(sae, keep_first=True))])
            total += float(lm_loss(spliced.float(), toks)) * len(toks)
    s = stats.summary()
    ce_sae = total / len(rows)
    t = quality["layers"][layer]
    return {"layer": layer, "width": width, "k": k, "n_tokens": n_tokens,
            "transcoder": {"fvu": t["fvu"], "l0": t["l0"], "dead_fraction": t["dead_fraction"],
                           "ce_loss_recovered": t["ce_loss_recovered_alone"]},
            "sae": {"fvu": s["fvu"], "l0": s["l0"], "dead_fraction": s["dead_fraction"],
                    "ce_loss_recovered": ratio(ce[f"zero_layer_{layer}"] - ce_sae,
                                               ce[f"zero_layer_{layer}"] - ce["clean"], MIN_ABLATION_GAP)}}
