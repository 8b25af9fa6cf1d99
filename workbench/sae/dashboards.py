"""Feature dashboards: one streaming pass over a corpus collects, per latent, its top-activating
contexts, a random sample of its non-zero activations (for quantile examples and the histogram),
its exact firing density, and its logit effects W_dec W_U (through the final norm, as
`adapter.unembed` folds it); `write_dashboards` renders a static site (an index sortable by density
and max activation, one page per feature) that works offline.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.adapter import describe, unembed
from workbench.artifacts import write_output_folder
from workbench.assets import read_asset
from workbench.hooked import HookedModel
from workbench.sae.activations import check_hooks, model_activations
from workbench.sae.modules import SAE
from workbench.tokenizer import readable_tokens


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
        return readable_tokens(model.tokenizer, ids.tolist()) if model.tokenizer is not None else [
            str(t) for t in ids.tolist()]

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
STYLE = read_asset("dashboard.css")
SORT_SCRIPT = read_asset("dashboard.js")
"""The dashboards' style sheet and the index's sorting script (workbench/assets/dashboard.css, .js),
inlined into each page so that it works from the disk alone."""


def _context(data: FeatureData, j: int, where: int, width: int = 10) -> str:
    S = data.token_rows.shape[1]
    row, pos = divmod(int(where), S)
    acts = data.acts_lookup[row][:, j]
    peak = max(float(acts.max()), 1e-9)
    spans = []
    for p in range(max(1, pos - width), min(S, pos + 3)):
        a = float(acts[p])
        alpha = min(1.0, max(0.0, a / peak))
        style = f"background:rgba(255,80,0,{alpha:.2f})" + (";outline:1px solid #333" if p == pos else "")
        spans.append(f"<span class='tok' style='{style}' title='{a:.3f}'>"
                     f"{html.escape(data.token_strings[row][p]) or '&nbsp;'}</span>")
    return f"<div class='ctx'><b>{float(acts[pos]):.2f}</b> " + "".join(spans) + "</div>"


def _histogram_svg(values: np.ndarray, bins: int = 30) -> str:
    values = values[np.isfinite(values)]
    if not len(values):
        return "<p>(never fired)</p>"
    counts, edges = np.histogram(values, bins=bins)
    w, h, top = 600, 120, max(int(counts.max()), 1)
    bars = "".join(f"<rect x='{i * w / bins:.1f}' y='{h - c / top * h:.1f}' width='{w / bins - 1:.1f}' "
                   f"height='{c / top * h:.1f}' fill='#4c78a8'><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}</title>"
                   "</rect>" for i, c in enumerate(counts))
    return (f"<svg width='{w}' height='{h + 16}'>{bars}<text x='0' y='{h + 14}' font-size='11'>{edges[0]:.3g}</text>"
            f"<text x='{w - 40}' y='{h + 14}' font-size='11'>{edges[-1]:.3g}</text></svg>")


def feature_page(data: FeatureData, j: int, title: str) -> str:
    fid = int(data.features[j])
    top = [_context(data, j, w) for w in data.top_where[j] if w >= 0]
    sample = [(v, w) for v, w in zip(data.sample_values[j], data.sample_where[j]) if w >= 0]
    quantiles = ""
    if sample:
        sample.sort()
        groups = np.array_split(np.arange(len(sample)), min(4, len(sample)))
        for g, idx in enumerate(groups):
            lo, hi = sample[idx[0]][0], sample[idx[-1]][0]
            quantiles += f"<h4>quantile {g + 1} of {len(groups)} ({lo:.2f}–{hi:.2f})</h4>"
            quantiles += "".join(_context(data, j, sample[i][1]) for i in idx[-3:])
    logits = ("<table><tr><th>raises</th><th>lowers</th></tr>" + "".join(
        f"<tr><td class='up'>{html.escape(a)} {va:+.3f}</td><td class='down'>{html.escape(b)} {vb:+.3f}</td></tr>"
        for (a, va), (b, vb) in zip(data.logit_up[j], data.logit_down[j])) + "</table>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)} · feature {fid}</title>"
            f"<style>{STYLE}</style></head><body><p><a href='index.html'>← all features</a></p>"
            f"<h1>Feature {fid}</h1><p>density {data.density[j]:.4%} · max activation {data.top_values[j, 0]:.3f}</p>"
            f"<h2>Activation histogram</h2><p>(a random sample of up to {data.sample_values.shape[1]} non-zero "
            f"activations)</p>{_histogram_svg(data.sample_values[j])}"
            f"<h2>Top activations</h2>{''.join(top) or '<p>(never fired)</p>'}"
            f"<h2>Examples across the activation range</h2>{quantiles or '<p>(never fired)</p>'}"
            f"<h2>Logit effects (W_dec W_U)</h2>{logits}</body></html>")


def index_page(data: FeatureData, title: str, selection: str) -> str:
    rows = "".join(
        f"<tr><td><a href='feature_{int(f):05d}.html'>{int(f)}</a></td><td>{data.density[j]:.6f}</td>"
        f"<td>{max(float(data.top_values[j, 0]), 0.0):.4f}</td>"
        f"<td>{html.escape(', '.join(t for t, _ in data.logit_up[j][:5]))}</td></tr>"
        for j, f in enumerate(data.features))
    script = SORT_SCRIPT
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><script>{script}</script></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{_coverage(data, selection)} Click a column to sort.</p>"
            "<table id='f'><thead><tr><th onclick='sortBy(0)'>feature</th><th onclick='sortBy(1)'>density</th>"
            "<th onclick='sortBy(2)'>max activation</th><th onclick='sortBy(3)'>top logits</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></body></html>")


def _coverage(data: FeatureData, selection: str) -> str:
    n = len(data.features)
    if n == data.d_sae:
        return f"All {n} latents of the SAE."
    return f"A sample of {n} of the SAE's {data.d_sae} latents ({selection})."


def render_dashboards(data: FeatureData, title: str = "SAE features", selection: str = "chosen by the caller"
                      ) -> dict[str, str]:
    """{file name: HTML} for the index and every feature page. `selection` says how `data.features` were
    chosen when they are a sample of the SAE's latents (e.g. 'evenly spaced ids'); the index shows it."""
    pages = {"index.html": index_page(data, title, selection)}
    pages.update({f"feature_{int(f):05d}.html": feature_page(data, j, title) for j, f in enumerate(data.features)})
    pages["features.json"] = json.dumps({"features": data.features.tolist(), "density": data.density.tolist(),
                                         "max_activation": data.top_values[:, 0].tolist()})
    return pages


def write_dashboards(data: FeatureData, folder: Union[str, Path], title: str = "SAE features",
                     selection: str = "chosen by the caller") -> Path:
    """Write the site into `folder`: built aside, then moved into place; an existing folder is replaced
    only if the workbench wrote it (see `artifacts.write_output_folder`)."""
    pages = render_dashboards(data, title, selection)

    def build(tmp: Path) -> None:
        for name, text in pages.items():
            (tmp / name).write_text(text)

    return write_output_folder(Path(folder), "dashboard", build)
