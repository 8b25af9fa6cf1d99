"""What a feature dashboard shows, collected in one streaming pass over a corpus: per latent, its
top-activating contexts, a random sample of its non-zero activations (for quantile examples and the
histogram), its exact firing density, and its logit effects W_dec W_U (through the final norm, as
`adapter.unembed` folds it). `workbench.report.dashboards` renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.adapter import describe, unembed
from workbench.adapter.tokens import token_strings
from workbench.cache.activations import check_hooks, model_activations
from workbench.model.hooked import HookedModel
from workbench.sae.modules import SAE


@dataclass(frozen=True, eq=False)
class FeatureData:
    """What the dashboards show, for latents `features` (arrays indexed like `features`)."""

    features: np.ndarray
    density: np.ndarray
    """Fraction of tokens on which each latent fired (exact)."""
    top_values: np.ndarray
    """[F, top_n] largest activations, descending."""
    top_where: np.ndarray
    """[F, top_n] (row, position) of each, as row * seq_len + position; -1 if unused."""
    sample_values: np.ndarray
    """[F, n_sample] a uniform random sample of non-zero activations (NaN where fewer fired)."""
    sample_where: np.ndarray
    logit_up: list[list[tuple[str, float]]]
    logit_down: list[list[tuple[str, float]]]
    token_rows: np.ndarray
    """[rows, seq_len] the corpus, to show contexts."""
    token_strings: list[list[str]]
    acts_lookup: dict[int, np.ndarray]
    """row -> [seq_len, F] activations of the rows that appear in any example (for highlighting)."""
    d_sae: int
    """Latents in the SAE (`features` may be a sample of them)."""


@torch.no_grad()
def collect_feature_data(model: HookedModel, sae: SAE, token_rows: torch.Tensor, hook_name: Optional[str] = None,
                         features: Optional[list[int]] = None, top_n: int = 12, n_sample: int = 200,
                         rows_per_forward: int = 16, seed: int = 0, progress: bool = True) -> FeatureData:
    """One pass over `token_rows` [rows, seq_len] (position 0, the BOS, is never counted)."""
    hook_name = hook_name or sae.cfg.hook_name
    check_hooks(model, [hook_name])
    feats = torch.arange(sae.d_sae) if features is None else torch.tensor(features)
    F_, S = len(feats), token_rows.shape[1]
    dev = sae.W_dec.device
    top_v = torch.full((F_, top_n), -1.0, device=dev)
    top_i = torch.full((F_, top_n), -1, dtype=torch.long, device=dev)
    keys = torch.full((F_, n_sample), float("inf"), device=dev)
    smp_v = torch.full((F_, n_sample), float("nan"), device=dev)
    smp_i = torch.full((F_, n_sample), -1, dtype=torch.long, device=dev)
    fired = torch.zeros(F_, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    mdev = next(model.parameters()).device
    for start in tqdm(range(0, len(token_rows), rows_per_forward), desc="dashboards", unit="batch",
                      disable=not progress or None, leave=False):
        rows = token_rows[start:start + rows_per_forward]
        x = model_activations(model, rows.to(mdev), [hook_name], skip_first=0)[hook_name].to(dev)
        f = sae.encode(x)[:, feats].view(len(rows), S, F_)
        f[:, 0] = 0  # the BOS position
        f = f.reshape(-1, F_).T  # [F, tokens]
        where = torch.arange(start * S, (start + len(rows)) * S, device=dev).expand(F_, -1)
        fired += (f > 0).sum(1)
        v, i = torch.cat([top_v, f], 1).topk(top_n, dim=1)
        top_v, top_i = v, torch.cat([top_i, where], 1).gather(1, i)
        k = torch.where(f > 0, torch.rand(f.shape, generator=gen, device=dev), float("inf"))
        kk, i = torch.cat([keys, k], 1).topk(n_sample, dim=1, largest=False)
        keys = kk
        smp_v = torch.cat([smp_v, f], 1).gather(1, i).masked_fill(kk.isinf(), float("nan"))
        smp_i = torch.cat([smp_i, where], 1).gather(1, i).masked_fill(kk.isinf(), -1)
    top_i = top_i.masked_fill(top_v <= 0, -1)
    # The change in the logits per unit of direction added to a final residual stream of unit scale:
    # through the final norm's effective scale (1 + w on Gemma) and, for LayerNorm, its centring.
    W_U_DV, _ = unembed(model)
    W_dec_FD = sae.W_dec[feats].detach().float()
    if describe(model).norm == "LN":
        W_dec_FD = W_dec_FD - W_dec_FD.mean(-1, keepdim=True)
    effects = W_dec_FD @ W_U_DV.to(dev)  # [F, V]
    def names(ids: torch.Tensor) -> list[str]:  # one readable line per token: bytes and newlines escaped
        return token_strings(model, ids)

    up_v, up_i = effects.topk(10, dim=1)
    dn_v, dn_i = (-effects).topk(10, dim=1)
    logit_up = [list(zip(names(up_i[j].cpu()), up_v[j].tolist())) for j in range(F_)]
    logit_down = [list(zip(names(dn_i[j].cpu()), (-dn_v[j]).tolist())) for j in range(F_)]
    used_rows = sorted({int(t) // S for t in torch.cat([top_i.flatten(), smp_i.flatten()]).tolist() if t >= 0})
    lookup = {}
    for start in range(0, len(used_rows), rows_per_forward):
        chunk = used_rows[start:start + rows_per_forward]
        x = model_activations(model, token_rows[chunk].to(mdev), [hook_name], skip_first=0)[hook_name].to(dev)
        f = sae.encode(x)[:, feats].view(len(chunk), S, F_).cpu().numpy()
        lookup.update({r: f[j] for j, r in enumerate(chunk)})
    strings = [list(names(token_rows[r].cpu())) if r in lookup else [] for r in range(len(token_rows))]
    return FeatureData(feats.numpy(), (fired / (len(token_rows) * (S - 1))).cpu().numpy(), top_v.cpu().numpy(),
                       top_i.cpu().numpy(), smp_v.cpu().numpy(), smp_i.cpu().numpy(), logit_up, logit_down,
                       token_rows.cpu().numpy(), strings, lookup, sae.d_sae)


# -- rendering ------------------------------------------------------------------------------------------
