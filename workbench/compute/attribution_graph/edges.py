"""Phases 3 and 4 of `build_graph`: the local replacement model with everything the clean run recorded
held fixed (`FrozenReplacement`), the edges read from it by batched backward passes (`compute_edges`),
and the identities every graph is checked for before it is returned (`check_identities`)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from workbench.adapter import DoesNotApplyError, uncap_logits
from workbench.compute.attribution_graph.graph import GraphConfig
from workbench.compute.attribution_graph.nodes import TC_DTYPE, CleanRun, Nodes
from workbench.model.hooked import HookedModel
from workbench.sae.transcoders import Transcoders, output_hook, per_token

IDENTITY_TOL = 1e-3
"""Largest |target − (bias + Σ edges)| allowed, relative to max(1, |target|) (float32 sums of
thousands of terms)."""
LOGIT_TOL = 1e-4
"""Largest |logit| difference between the frozen replacement model and the model."""


class FrozenReplacement:
    """The local replacement model: the model run with its attention patterns and norm scales fixed at
    the clean run's values, its embeddings and MLP outputs taken from given sources (leaves to
    differentiate), and each MLP's skip path recomputed from that run's own MLP input."""

    def __init__(self, model: HookedModel, transcoders: Transcoders, run: CleanRun):
        self.model, self.transcoders, self.run = model, transcoders, run
        self.seen: dict[int, torch.Tensor] = {}
        self.B = 1
        self.emb_src: torch.Tensor = run.emb[None]
        self.m_src: list[torch.Tensor] = []

    def __call__(self, B: int, emb_src: torch.Tensor, m_src: list[torch.Tensor]
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """On B copies of the prompt: (every layer's MLP input [B, S, d], logits [B, S, V] before a cap)."""
        self.seen, self.B, self.emb_src, self.m_src = {}, B, emb_src, m_src
        L = self.run.L
        hooks = [("blocks.0.hook_resid_pre", self._embed)]
        hooks += [(n, partial(self._fix, value=v)) for n, v in self.run.frozen.items()]
        hooks += [(self.transcoders.in_hook(l), partial(self._grab, layer=l)) for l in range(L)]
        hooks += [(output_hook(l), partial(self._mlp_out, layer=l)) for l in range(L)]
        out = uncap_logits(self.model, self.model.run_with_hooks(self.run.tokens.expand(B, self.run.S),
                                                                 fwd_hooks=hooks))
        return [self.seen[l].to(TC_DTYPE) for l in range(L)], out

    def _embed(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        return (self.emb_src + self.run.position).to(act.dtype)

    @staticmethod
    def _fix(act: torch.Tensor, hook: Any, value: torch.Tensor) -> torch.Tensor:
        if value.shape[0] == 1:
            return value.expand(act.shape).to(act.dtype)
        return value.repeat(act.shape[0] // value.shape[0], *[1] * (value.ndim - 1)).to(act.dtype)  # [B·S, ...]

    def _grab(self, act: torch.Tensor, hook: Any, layer: int) -> torch.Tensor:
        self.seen[layer] = per_token(act, self.B, self.run.S)
        return act

    def _mlp_out(self, act: torch.Tensor, hook: Any, layer: int) -> torch.Tensor:
        s = self.transcoders.skip(layer, self.seen[layer].to(TC_DTYPE))
        out = self.m_src[layer] + (s if s is not None else 0)
        return out.reshape(act.shape).to(act.dtype)


def _targets(nodes: Nodes, run: CleanRun, x_all: list[torch.Tensor], out: torch.Tensor, rows: torch.Tensor
             ) -> torch.Tensor:
    """Each copy b's target rows[b]: a feature's pre-activation or a logit, [len(rows)]. Only the layers
    the rows need are touched, so the backward pass goes no further down than it must."""
    features, nf, dev = nodes.features, nodes.nf, run.emb.device
    vals = torch.zeros(len(rows), device=dev)
    is_feat = rows < nf
    for l in features[rows[is_feat], 0].unique().tolist():
        sel = (is_feat & (features[rows.clamp_max(max(nf - 1, 0)), 0] == l)).nonzero().flatten()
        fr = rows[sel]
        picked = x_all[l][sel.to(dev), features[fr, 1].to(dev)]  # [n, d]
        vals = vals.index_add(0, sel.to(dev), (picked * nodes.enc_cols[fr]).sum(-1) + nodes.enc_bias[fr])
    if bool((~is_feat).any()):
        sel = (~is_feat).nonzero().flatten().to(out.device)
        lr = rows[~is_feat] - (nf + run.L * run.S + run.S)
        vals = vals.index_add(0, sel, nodes.logit_value(out[sel, -1], nodes.logit_tokens[lr].to(out.device)))
    return vals


def _decoder_writes(transcoders: Transcoders, run: CleanRun, nodes: Nodes) -> list[tuple]:
    """Each source layer's decoder writes, padded to [S, most features at one position, d] for one batched
    matmul per (source layer, output layer): O(targets × features × d) multiply-adds, no gathered copies."""
    features, dev, S, d = nodes.features, run.emb.device, run.S, run.d
    writes = []
    for l0 in range(run.L):
        idx = (features[:, 0] == l0).nonzero().flatten()
        if not len(idx):
            continue
        pos = features[idx, 1]
        slot = torch.zeros_like(pos)
        for p in pos.unique().tolist():
            at = (pos == p).nonzero().flatten()
            slot[at] = torch.arange(len(at))
        dec = transcoders.decoder(l0).detach()
        a = nodes.activations[idx].to(dev)
        padded = torch.zeros(dec.shape[1], S, int(slot.max()) + 1, d, device=dev)
        padded[:, pos.to(dev), slot.to(dev)] = (dec[features[idx, 2].to(dev)] * a[:, None, None]).transpose(0, 1)
        writes.append((l0, idx, pos, slot, padded))
    return writes


def compute_edges(frozen: FrozenReplacement, transcoders: Transcoders, run: CleanRun, nodes: Nodes, cfg: GraphConfig,
           progress: bool) -> tuple[torch.Tensor, float]:
    """Phase 3: the adjacency [N, N], B targets per backward pass (one per copy of the prompt), and the
    largest logit gap between the frozen replacement model and the model (identity (b), checked here)."""
    S, L, d, emb, nf = run.S, run.L, run.d, run.emb, nodes.nf
    N, target_rows = nodes.n_nodes(run), nodes.target_rows(run)
    writes = _decoder_writes(transcoders, run, nodes)
    B = min(cfg.batch_size or max(8, min(512, 8192 // S)), len(target_rows))
    emb_leaf = emb[None].expand(B, S, d).clone().requires_grad_(True)
    m_leaves = [nodes.no_skip[l][None].expand(B, S, d).clone().requires_grad_(True) for l in range(L)]
    x_all, out = frozen(B, emb_leaf, m_leaves)
    with torch.no_grad():  # identity (b): the frozen replacement model is the model, on this prompt
        gap = float((out[0, -1].float() - run.last).abs().max())
    if gap > LOGIT_TOL * max(1.0, float(run.last.abs().max())):
        raise DoesNotApplyError(f"{run.label}: circuit tracing does not apply: with attention patterns and "
                                f"normalisation scales frozen at their own values, the logits moved by {gap:.2e}, so "
                                "freezing does not take effect on this architecture.")
    A = torch.zeros(N, N)
    tok_cols = slice(nf + L * S, nf + L * S + S)
    bar = tqdm(total=len(target_rows), desc="attribution graph", unit="node", disable=not progress or None)
    for start in range(0, len(target_rows), B):
        rows = target_rows[start:start + B]
        t = _targets(nodes, run, x_all, out, rows)
        grads = torch.autograd.grad(t.sum(), [emb_leaf, *m_leaves], retain_graph=True, allow_unused=True)
        n = len(rows)
        g_emb = grads[0][:n] if grads[0] is not None else torch.zeros(n, S, d)
        g_m = [(g[:n] if g is not None else torch.zeros(n, S, d, device=emb.device)) for g in grads[1:]]
        with torch.no_grad():
            block = torch.zeros(n, N, device=emb.device)
            block[:, tok_cols] = (g_emb * emb).sum(-1)
            for l in range(L):
                block[:, nf + l * S: nf + (l + 1) * S] = (g_m[l] * nodes.errors[l]).sum(-1)
            for l0, idx, pos, slot, padded in writes:
                for j in range(padded.shape[0]):
                    per_pos = torch.bmm(g_m[l0 + j].transpose(0, 1), padded[j].transpose(1, 2))  # [S, n, slots]
                    block[:, idx.to(emb.device)] += per_pos[pos.to(emb.device), :, slot.to(emb.device)].T
            A[rows] = block.cpu()
        bar.update(n)
    bar.close()
    return A, gap


@torch.no_grad()
def check_identities(frozen: FrozenReplacement, transcoders: Transcoders, run: CleanRun, nodes: Nodes,
                      A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Phase 4, identity (a): every target is its bias plus its incoming edges; and, to catch an edit that
    does not take effect (a pattern only reported after the fact), the same with every source doubled.
    Returns (bias [N], values [N], the largest relative miss), or raises DoesNotApplyError."""
    S, L, d, nf, emb = run.S, run.L, run.d, nodes.nf, run.emb
    N, target_rows = nodes.n_nodes(run), nodes.target_rows(run)

    def target_values(x_run: list[torch.Tensor], out_run: torch.Tensor) -> torch.Tensor:
        ids = nodes.logit_tokens.to(out_run.device)
        return torch.cat([nodes.feature_values(torch.stack(x_run)[:, 0]),
                          nodes.logit_value(out_run[0, -1].expand(len(ids), -1), ids)]).cpu()

    b_dec = [transcoders.b_dec(l).expand(1, S, d) for l in range(L)]
    bias_rows = target_values(*frozen(1, torch.zeros(1, S, d, device=emb.device), b_dec))
    doubled = target_values(*frozen(1, 2 * emb[None], [2 * nodes.no_skip[l][None] - b_dec[l] for l in range(L)]))
    ids = nodes.logit_tokens.to(run.last.device)
    actual = torch.cat([nodes.feature_values(torch.stack(run.xs)),
                        nodes.logit_value(run.last.expand(len(ids), -1), ids)]).cpu()
    bias, values = torch.zeros(N), torch.zeros(N)
    bias[target_rows] = bias_rows
    values[target_rows] = actual
    values[nf: nf + L * S] = torch.stack([e.norm(dim=-1) for e in nodes.errors]).flatten().cpu()
    values[nf + L * S: nf + L * S + S] = emb.norm(dim=-1).cpu()
    edges = A[target_rows].sum(1)
    residual = torch.maximum((actual - bias_rows - edges).abs(), (doubled - bias_rows - 2 * edges).abs() / 2)
    worst = float((residual / actual.abs().clamp_min(1.0)).max()) if len(residual) else 0.0
    if worst > IDENTITY_TOL:
        raise DoesNotApplyError(f"{run.label}: circuit tracing does not apply: a target's bias plus its incoming "
                                f"edges misses its real value by {worst:.2e} (relative), so the frozen model is not "
                                "linear here (a normalisation or attention edit that does not take effect).")
    return bias, values, worst
