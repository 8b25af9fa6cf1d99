"""Phases 1 and 2 of `build_graph`: one clean run of the prompt records what the frozen model holds
fixed (`CleanRun`: MLP inputs and outputs, embeddings, normalisation scales and attention patterns),
then the graph's nodes are found in it (`Nodes`: active features, error vectors, logit targets)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.adapter import DoesNotApplyError, describe, uncap_logits
from workbench.cache.collect import run_collect
from workbench.cache.rows import special_ids
from workbench.compute.attribution_graph.graph import GraphConfig
from workbench.model.hooked import HookedModel
from workbench.sae.transcoders import Transcoders, output_hook, per_token

TC_DTYPE = torch.float32
"""What the transcoders compute in, whatever the model's dtype."""


@dataclass
class CleanRun:
    """Phase 1: the prompt's clean forward pass, and everything the frozen model holds fixed."""

    tokens: torch.Tensor
    """[1, S]"""
    xs: list[torch.Tensor]
    """Each layer's MLP input [S, d]."""
    ys: list[torch.Tensor]
    """Each layer's MLP output [S, d]."""
    last_real: torch.Tensor
    """[V] the last position's logits as the model outputs them (after any soft-cap)."""
    last: torch.Tensor
    """[V] the same before a soft-cap (Gemma 2): what logit nodes are, since the cap is not linear."""
    emb: torch.Tensor
    """[S, d] the embedding nodes: hook_resid_pre, less the position embedding for token_nodes='token'."""
    position: torch.Tensor
    """[S, d] what the embedding nodes leave out (zero for token_nodes='token_and_position')."""
    frozen: dict[str, torch.Tensor]
    """Every normalisation scale and attention pattern, by hook name."""
    label: str
    """The architecture, for error messages."""

    @property
    def S(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def L(self) -> int:
        return len(self.xs)

    @property
    def d(self) -> int:
        return int(self.emb.shape[-1])

    @classmethod
    def record(cls, model: HookedModel, transcoders: Transcoders, tokens: torch.Tensor, cfg: GraphConfig
               ) -> "CleanRun":
        S, L = tokens.shape[1], transcoders.n_layers
        arch = describe(model)
        scale_names = [n for n in model.hook_dict if n.endswith("hook_scale") and n in arch.fired]
        pattern_names = frozen_attention(model, tokens)
        pos_name = "hook_pos_embed" if cfg.token_nodes == "token" and "hook_pos_embed" in arch.fired else None
        keep = ["blocks.0.hook_resid_pre", *([pos_name] if pos_name else []), *scale_names, *pattern_names,
                *(h for l in range(L) for h in (transcoders.in_hook(l), output_hook(l)))]
        with torch.no_grad():
            logits, clean = run_collect(model, tokens, keep)
        resid0 = clean["blocks.0.hook_resid_pre"][0].float()
        position = clean[pos_name].reshape(resid0.shape).float() if pos_name else torch.zeros_like(resid0)
        return cls(tokens,
                   [per_token(clean[transcoders.in_hook(l)], 1, S)[0].to(TC_DTYPE) for l in range(L)],
                   [per_token(clean[output_hook(l)], 1, S)[0].to(TC_DTYPE) for l in range(L)],
                   logits[0, -1].float(), uncap_logits(model, logits)[0, -1].float(), resid0 - position, position,
                   {n: clean[n] for n in (*scale_names, *pattern_names)}, arch.label)


@dataclass
class Nodes:
    """Phase 2: the graph's nodes, and what each target reads (features: their encoder column and bias)."""

    features: torch.Tensor
    """[n_features, 3] (layer, position, id), on the CPU."""
    activations: torch.Tensor
    """[n_features]"""
    no_skip: list[torch.Tensor]
    """[S, d] each layer's MLP output less its skip path: what the frozen model's MLP leaves hold."""
    errors: list[torch.Tensor]
    """[S, d] each layer's error vectors: no_skip less the transcoder's reconstruction."""
    logit_tokens: torch.Tensor
    logit_probs: torch.Tensor
    enc_cols: torch.Tensor
    """[n_features, d] each feature target's encoder column."""
    enc_bias: torch.Tensor
    """[n_features] and its bias."""
    logit_nodes: str
    """GraphConfig.logit_nodes."""

    @property
    def nf(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    def n_nodes(self, run: CleanRun) -> int:
        return self.nf + run.L * run.S + run.S + self.n_logits

    def target_rows(self, run: CleanRun) -> torch.Tensor:
        """Node indices of the targets: every feature, then every logit (node order: features, errors,
        tokens, logits)."""
        N = self.n_nodes(run)
        return torch.cat([torch.arange(self.nf), torch.arange(N - self.n_logits, N)])

    def logit_value(self, logits_NV: torch.Tensor, ids_N: torch.Tensor) -> torch.Tensor:
        """[N] each row's logit node: logits_NV[i, ids_N[i]], less the row's mean logit when demeaned."""
        picked = logits_NV.float().gather(-1, ids_N[:, None])[:, 0]
        return picked - logits_NV.float().mean(-1) if self.logit_nodes == "demeaned" else picked

    def feature_values(self, x_LSd: torch.Tensor) -> torch.Tensor:
        """[n_features] every feature target's pre-activation from every layer's MLP input [L, S, d]."""
        if not self.nf:
            return torch.zeros(0)
        return (x_LSd[self.features[:, 0], self.features[:, 1]] * self.enc_cols).sum(-1) + self.enc_bias

    @classmethod
    @torch.no_grad()
    def find(cls, model: HookedModel, transcoders: Transcoders, run: CleanRun, cfg: GraphConfig) -> "Nodes":
        S, L, d, xs = run.S, run.L, run.d, run.xs
        acts = [transcoders.encode(l, xs[l]) for l in range(L)]  # [S, F]
        if cfg.skip_bos_features and starts_with_bos(model, run.tokens):
            for a in acts:
                a[0] = 0
        feats, fvals = [], []
        for l in range(L):
            pos, fid = acts[l].nonzero(as_tuple=True)
            feats.append(torch.stack([torch.full_like(pos, l), pos, fid], 1))
            fvals.append(acts[l][pos, fid])
        features = torch.cat(feats).cpu()
        recon = [transcoders.b_dec(l).expand(S, d).clone() for l in range(L)]
        for l in range(L):
            dec = transcoders.decoder(l)
            for j in range(dec.shape[1]):
                recon[l + j] += acts[l] @ dec[:, j]
        skips = [transcoders.skip(l, xs[l]) for l in range(L)]
        no_skip = [run.ys[l] - (skips[l] if skips[l] is not None else 0) for l in range(L)]
        # the logit nodes: the most probable tokens until they hold logit_mass, at most max_logits
        probs = run.last_real.softmax(-1)
        order = probs.argsort(descending=True)
        n_logits = int(min(cfg.max_logits, int((probs[order].cumsum(0) < cfg.logit_mass).sum()) + 1))
        dev = xs[0].device
        by_layer = [features[features[:, 0] == l, 2].to(dev) for l in range(L)]
        enc_cols = (torch.cat([transcoders.encoder(l)[:, by_layer[l]].T for l in range(L)]).detach() if len(features)
                    else torch.zeros(0, d))
        enc_bias = (torch.cat([transcoders.pre_acts(l, torch.zeros(1, d, device=dev))[0, by_layer[l]]
                               for l in range(L)]).detach() if len(features) else torch.zeros(0))
        return cls(features, torch.cat(fvals).float(), no_skip, [no_skip[l] - recon[l] for l in range(L)],
                   order[:n_logits].cpu(), probs[order[:n_logits]].cpu(), enc_cols, enc_bias, cfg.logit_nodes)


@torch.no_grad()
def frozen_attention(model: HookedModel, tokens: torch.Tensor) -> list[str]:
    """The hook_pattern names that freeze attention, after checking that they fire and that an edit there
    changes the output (a bridge that only reports its pattern after computing with its own is refused)."""
    arch = describe(model)
    pattern_names = [f"blocks.{l}.attn.hook_pattern" for l in range(int(model.cfg.n_layers))]
    missing = [n for n in pattern_names if n not in arch.fired]
    if missing:
        raise DoesNotApplyError(f"{arch.label}: circuit tracing does not apply: it freezes attention patterns at "
                                f"{missing[0]}, which this model does not fire.")
    if tokens.shape[1] < 2:
        return pattern_names

    def first_only(pattern, hook):
        out = torch.zeros_like(pattern)
        out[..., 0] = 1.0
        return out

    plain = model(tokens)[0, -1].float()
    edited = model.run_with_hooks(tokens, fwd_hooks=[(n, first_only) for n in pattern_names])[0, -1].float()
    if float((plain - edited).abs().max()) <= 1e-6 * max(1.0, float(plain.abs().max())):
        raise DoesNotApplyError(f"{arch.label}: circuit tracing does not apply: an edit of the attention pattern "
                                "(hook_pattern) does not change the output, so attention cannot be frozen.")
    return pattern_names


def starts_with_bos(model: HookedModel, tokens: torch.Tensor) -> bool:
    bos, _ = special_ids(model)
    return bos is not None and int(tokens[0, 0]) == bos
