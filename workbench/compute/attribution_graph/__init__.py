"""Attribution graphs: the direct, linear effects between a prompt's tokens, transcoder features,
error terms and top logits (Ameisen et al., "Circuit Tracing: Revealing Computational Graphs in
Language Models", 2025).

The local replacement model of one prompt is the model with every MLP replaced by its transcoder
plus an error term per (layer, position) that makes its output exact, and with the attention
patterns and the normalisation scales frozen at their values on that prompt. Frozen, everything
between the sources (token embeddings, feature activations, error terms) and the targets (feature
pre-activations, logits) is linear, so each target is exactly its bias term plus the sum of its
incoming direct effects. The graph is computed by running the frozen model once on B copies of the
prompt and asking, per backward pass, for the gradient of B different targets (one per copy).

    g = build_graph(model, transcoders, "Alice's birthplace is")
    g.adjacency[t, s]                   direct effect of node s on node t (targets are rows)
    kept = prune(g, 0.8, 0.98)          nodes and edges that carry 80% / 98% of the logit influence
    graph_scores(g)                     replacement and completeness scores
    intervene(model, transcoders, g, nodes, scale=0.0)   the real model's logit change vs the graph's
    save_graph(g, folder); load_graph(folder)            safetensors + JSON

Nodes are ordered features (by layer, position, id), errors (layer-major), tokens, logits.
`build_graph` checks both identities on every graph it returns: each target equals its bias plus
its incoming edges, and the frozen replacement model reproduces the logits; a model on which
freezing does not take effect is refused (`DoesNotApplyError`), never given a wrong graph.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from workbench.adapter import DoesNotApplyError, describe, uncap_logits
from workbench.artifacts import GRAPH_FILE, GRAPH_META_FILE, strict_json, write_output_folder
from workbench.cache.collect import run_collect
from workbench.errors import CheckpointError, ConfigError, InputError
from workbench.model.hooked import HookedModel
from workbench.sae.transcoders import Transcoders, model_name_of, output_hook, per_token

GRAPH_FORMAT = 2
"""2: the adjacency may be stored sparse (adjacency_index + adjacency_values); 1: always dense."""
IDENTITY_TOL = 1e-3
"""Largest |target − (bias + Σ edges)| allowed, relative to max(1, |target|) (float32 sums of
thousands of terms)."""
LOGIT_TOL = 1e-4
"""Largest |logit| difference between the frozen replacement model and the model."""


@dataclass
class AttributionGraph:
    """One prompt's attribution graph. Node order: features, errors, tokens, logits."""

    model_name: str
    tokens: list[int]
    token_strs: list[str]
    n_layers: int
    features: torch.Tensor
    """[n_features, 3] (layer, position, feature id) of every active feature."""
    activations: torch.Tensor
    """[n_features] their activations."""
    logit_tokens: torch.Tensor
    """[n_logits] token ids of the logit nodes (most probable first)."""
    logit_probs: torch.Tensor
    """[n_logits] their probabilities."""
    adjacency: torch.Tensor
    """[N, N] direct effects, adjacency[target, source]; rows of tokens and errors are zero."""
    bias: torch.Tensor
    """[N] each target's bias term (its value with every source zeroed); 0 for sources."""
    values: torch.Tensor
    """[N] the real value: a feature's pre-activation, a logit; the norm of an error or embedding."""
    transcoders: str = ""
    """Which transcoders: 'per-layer' or 'cross-layer', and where they came from."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, j: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + j

    def kinds(self) -> list[str]:
        return (["feature"] * self.n_features + ["error"] * self.n_errors + ["embedding"] * self.n_pos
                + ["logit"] * self.n_logits)

    def node(self, i: int) -> dict[str, Any]:
        """{'kind', 'layer', 'pos', 'feature', 'label'} of node i (tokens: layer −1; logits: n_layers)."""
        nf, ne, S = self.n_features, self.n_errors, self.n_pos
        if i < nf:
            l, p, f = (int(v) for v in self.features[i])
            return {"kind": "feature", "layer": l, "pos": p, "feature": f, "label": f"L{l} F{f} @{p}"}
        if i < nf + ne:
            l, p = divmod(i - nf, S)
            return {"kind": "error", "layer": l, "pos": p, "feature": None, "label": f"error L{l} @{p}"}
        if i < nf + ne + S:
            p = i - nf - ne
            return {"kind": "embedding", "layer": -1, "pos": p, "feature": None,
                    "label": f"{self.token_strs[p]!r} @{p}"}
        j = i - nf - ne - S
        return {"kind": "logit", "layer": self.n_layers, "pos": S - 1, "feature": None,
                "label": f"logit {self.meta.get('logit_strs', [''] * self.n_logits)[j]!r} "
                         f"(p={float(self.logit_probs[j]):.2f})"}

    def logit_weights(self) -> torch.Tensor:
        """[N]: each logit node's probability, 0 elsewhere (what influence is measured against)."""
        w = torch.zeros(self.n_nodes)
        w[self.n_nodes - self.n_logits:] = self.logit_probs.float()
        return w


@dataclass(frozen=True)
class GraphConfig:
    """How to build a graph."""

    max_logits: int = 10
    """At most this many logit nodes ..."""
    logit_mass: float = 0.95
    """... the most probable tokens until they hold this much probability."""
    batch_size: int = 0
    """Targets per backward pass (copies of the prompt in one forward); 0: about 8,192 tokens' worth."""
    skip_bos_features: bool = True
    """Leave out features at a BOS token in position 0 (they fire on every prompt alike); its error
    node keeps the identities exact."""
    logit_nodes: Literal["logit", "demeaned"] = "logit"
    """A logit node's value: the logit itself (what the model outputs), or the logit minus the mean
    logit over the vocabulary (circuit-tracer's demeaned unembedding). Only edges into logits differ."""
    token_nodes: Literal["token_and_position", "token"] = "token_and_position"
    """An embedding node: the whole residual stream at layer 0 (token plus position embedding), or the
    token embedding W_E[t] alone (circuit-tracer), the position embedding then joining each target's
    bias. The same on models without a learned position embedding (rotary, ALiBi)."""
    first_position_errors: bool = True
    """Keep the error nodes at position 0. False (circuit-tracer, whose position 0 is always a BOS)
    moves their edges into the targets' biases: every identity still holds, with less to see."""
    count_sources: bool = False
    """Whether source nodes take part in the shares: `prune`'s node threshold then ranks token nodes
    with features and errors (tokens are kept either way), and `graph_scores`'s completeness weighs
    tokens and errors (whose inputs count as fully explained) with the rest (circuit-tracer does both)."""
    require_feature_inputs: bool = False
    """`prune` also drops a feature left with no kept incoming edge (circuit-tracer)."""

    @classmethod
    def circuit_tracer_compatible(cls, **overrides: Any) -> "GraphConfig":
        """Every node definition as circuit-tracer (0.5) makes it, so that a graph's edges, pruning and
        scores can be set beside circuit-tracer's or a Neuronpedia graph (prompts should start with
        a BOS, which circuit-tracer adds to a string)."""
        return cls(**{**dict(logit_nodes="demeaned", token_nodes="token", first_position_errors=False,
                             count_sources=True, require_feature_inputs=True, skip_bos_features=True),
                      **overrides})

    def __post_init__(self) -> None:
        for name, allowed in (("logit_nodes", ("logit", "demeaned")), ("token_nodes", ("token_and_position", "token"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"GraphConfig.{name} must be one of {', '.join(map(repr, allowed))}, got "
                                  f"{getattr(self, name)!r}.")
        for name in ("skip_bos_features", "first_position_errors", "count_sources", "require_feature_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GraphConfig.{name} must be True or False, got {getattr(self, name)!r}.")
        if not (isinstance(self.max_logits, int) and self.max_logits > 0):
            raise ConfigError(f"GraphConfig.max_logits must be a positive integer, got {self.max_logits!r}.")
        if not 0 < self.logit_mass <= 1:
            raise ConfigError(f"GraphConfig.logit_mass must be in (0, 1], got {self.logit_mass!r}.")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 0):
            raise ConfigError(f"GraphConfig.batch_size must be an integer ≥ 0, got {self.batch_size!r}.")


# -- building -------------------------------------------------------------------------------------
def _tokens(model: HookedModel, prompt: Union[str, torch.Tensor, Sequence[int]]) -> torch.Tensor:
    """[1, S] token ids of `prompt`. Text is tokenized without special tokens and then gets the model's BOS
    first (where it has one and the text does not already start with it), as the study's default
    prompts and training rows do: the same text gives the same graph whichever way it arrives. Token
    ids are taken as they are."""
    device = next(model.parameters()).device
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InputError("This model has no tokenizer; give the prompt as token ids.")
        from workbench.cache.collect import special_ids

        tok = model.tokenizer
        ids = list(tok(prompt, add_special_tokens=False)["input_ids"] if hasattr(tok, "all_special_ids")
                   else tok.encode(prompt))  # a Hugging Face tokenizer, or the workbench's TextCodec
        bos, _ = special_ids(model)
        if ids and bos is not None and ids[0] != bos:
            ids = [bos] + ids
        tokens = torch.tensor([ids], dtype=torch.long)
    else:
        tokens = torch.as_tensor(prompt).long()
    tokens = tokens.reshape(1, -1).to(device)
    n_ctx = int(model.cfg.n_ctx)
    if tokens.shape[1] > n_ctx:
        raise InputError(f"The prompt is {tokens.shape[1]} tokens, longer than the model's context of {n_ctx}; "
                         "shorten it.")
    if tokens.shape[1] == 0:
        raise InputError("The prompt is empty.")
    return tokens


def _token_strs(model: HookedModel, tokens: torch.Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(int(t)) for t in tokens[0]]
    from workbench.data.tokenizer import readable_tokens
    return readable_tokens(model.tokenizer, tokens[0].tolist())


def build_graph(model: HookedModel, transcoders: Transcoders, prompt: Union[str, torch.Tensor, Sequence[int]],
                cfg: GraphConfig = GraphConfig(), progress: bool = True) -> AttributionGraph:
    """The attribution graph of `prompt` (text or token ids) through `transcoders`, in four phases:
    (1) one clean run records what the frozen model holds fixed; (2) the nodes: active features, error
    vectors, logit targets; (3) the edges, by batched backward passes through the frozen replacement
    model; (4) both identities checked, or a DoesNotApplyError."""
    transcoders.check_model(model)
    run = _CleanRun.record(model, transcoders, _tokens(model, prompt), cfg)  # 1
    nodes = _Nodes.find(model, transcoders, run, cfg)  # 2
    frozen = _FrozenReplacement(model, transcoders, run)
    A, gap = _edges(frozen, transcoders, run, nodes, cfg, progress)  # 3
    bias, values, worst = _check_identities(frozen, transcoders, run, nodes, A)  # 4
    if not cfg.first_position_errors:  # their edges join the targets' biases: bias + edges is unchanged
        cols = torch.tensor([nodes.nf + l * run.S for l in range(run.L)])
        rows = nodes.target_rows(run)
        bias[rows] += A[rows][:, cols].sum(1)
        A[:, cols] = 0
        values[cols] = 0
    graph = AttributionGraph(model_name_of(model), run.tokens[0].tolist(), _token_strs(model, run.tokens), run.L,
                             nodes.features, nodes.activations.cpu(), nodes.logit_tokens, nodes.logit_probs, A, bias,
                             values, transcoders.kind)
    graph.meta["logit_strs"] = ([_token_strs(model, nodes.logit_tokens.view(1, -1))[j] for j in range(nodes.n_logits)]
                                if model.tokenizer is not None else [str(int(t)) for t in nodes.logit_tokens])
    graph.meta["logits_clean"] = run.last[nodes.logit_tokens.to(run.last.device)].cpu().tolist()
    graph.meta.update({"identity_max_relative_error": worst, "logit_max_error": gap, "config": vars(cfg).copy()})
    return graph


TC_DTYPE = torch.float32
"""What the transcoders compute in, whatever the model's dtype."""


@dataclass
class _CleanRun:
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
               ) -> "_CleanRun":
        S, L = tokens.shape[1], transcoders.n_layers
        arch = describe(model)
        scale_names = [n for n in model.hook_dict if n.endswith("hook_scale") and n in arch.fired]
        pattern_names = _frozen_attention(model, tokens)
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
class _Nodes:
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

    def n_nodes(self, run: _CleanRun) -> int:
        return self.nf + run.L * run.S + run.S + self.n_logits

    def target_rows(self, run: _CleanRun) -> torch.Tensor:
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
    def find(cls, model: HookedModel, transcoders: Transcoders, run: _CleanRun, cfg: GraphConfig) -> "_Nodes":
        S, L, d, xs = run.S, run.L, run.d, run.xs
        acts = [transcoders.encode(l, xs[l]) for l in range(L)]  # [S, F]
        if cfg.skip_bos_features and _starts_with_bos(model, run.tokens):
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


class _FrozenReplacement:
    """The local replacement model: the model run with its attention patterns and norm scales fixed at
    the clean run's values, its embeddings and MLP outputs taken from given sources (leaves to
    differentiate), and each MLP's skip path recomputed from that run's own MLP input."""

    def __init__(self, model: HookedModel, transcoders: Transcoders, run: _CleanRun):
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


def _targets(nodes: _Nodes, run: _CleanRun, x_all: list[torch.Tensor], out: torch.Tensor, rows: torch.Tensor
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


def _decoder_writes(transcoders: Transcoders, run: _CleanRun, nodes: _Nodes) -> list[tuple]:
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


def _edges(frozen: _FrozenReplacement, transcoders: Transcoders, run: _CleanRun, nodes: _Nodes, cfg: GraphConfig,
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
def _check_identities(frozen: _FrozenReplacement, transcoders: Transcoders, run: _CleanRun, nodes: _Nodes,
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


def check_supported(model: HookedModel) -> None:
    """DoesNotApplyError, before any transcoder is trained, for a model whose attention cannot be frozen;
    InputError for one without MLPs."""
    from workbench.sae.transcoders import mlp_layers

    mlp_layers(model)
    _frozen_attention(model, torch.arange(1, 9, device=next(model.parameters()).device)[None] % int(model.cfg.d_vocab))


@torch.no_grad()
def _frozen_attention(model: HookedModel, tokens: torch.Tensor) -> list[str]:
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


def _starts_with_bos(model: HookedModel, tokens: torch.Tensor) -> bool:
    from workbench.cache.collect import special_ids
    bos, _ = special_ids(model)
    return bos is not None and int(tokens[0, 0]) == bos


# -- influence, pruning and scores -----------------------------------------------------------------
def normalized(A: torch.Tensor) -> torch.Tensor:
    """|A| with each row scaled to sum to 1 (rows with no inputs stay 0)."""
    absA = A.abs()
    return absA / absA.sum(1, keepdim=True).clamp_min(1e-30)


def influence(An: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weightsᵀ (An + An² + An³ + …): how much of the weighted targets' input flows from each node,
    through any path. The graph is acyclic, so the series ends after its depth."""
    total = torch.zeros_like(weights)
    cur = weights @ An
    for _ in range(An.shape[0]):
        if not bool(cur.abs().sum() > 0):
            break
        total += cur
        cur = cur @ An
    return total


def _cut(scores: torch.Tensor) -> torch.Tensor:
    """For each entry, the share of the total score held by the entries ranked above it: keeping the
    entries with cut < t keeps the fewest entries that hold a share t."""
    order = scores.argsort(descending=True)
    total = scores.sum().clamp_min(1e-30)
    before = torch.cat([torch.zeros(1), (scores[order].cumsum(0) / total)[:-1]])
    out = torch.empty_like(scores)
    out[order] = before.to(scores.dtype)
    return out


@dataclass(frozen=True)
class Pruned:
    """Which nodes and edges survive pruning, and each one's cut (its threshold)."""

    node_mask: torch.Tensor
    """[N] bool."""
    edge_mask: torch.Tensor
    """[N, N] bool, only between kept nodes."""
    node_cut: torch.Tensor
    """[N]: a node is kept at node threshold t when cut < t (0 for tokens and logits)."""
    edge_cut: torch.Tensor
    """[N, N]: the same for edges, among the nodes kept."""
    node_influence: torch.Tensor
    """[N] each node's influence on the logits (for the logit nodes, their probability)."""


def _check_threshold(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise InputError(f"The {name} threshold must be in [0, 1] (a share of the influence on the logits), got "
                         f"{value!r}.")


def _definition(graph: AttributionGraph, name: str, value: Optional[bool]) -> bool:
    """A node-definition option: as given, else as the graph was built with (`GraphConfig`)."""
    return bool(graph.meta.get("config", {}).get(name, False)) if value is None else bool(value)


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          count_sources: Optional[bool] = None, require_feature_inputs: Optional[bool] = None) -> Pruned:
    """Keep the features and errors that hold `node_threshold` of the influence on the logits, then the
    edges that hold `edge_threshold` of the influence among them (the Attribution Graphs methods
    paper's defaults). Tokens and logits are always kept; a node left with no kept edge to a kept
    node is dropped, and no edge is kept that touches a dropped node. `count_sources` (token nodes
    ranked in the node share) and `require_feature_inputs` (a feature also needs a kept incoming edge)
    default to the graph's `GraphConfig`; circuit-tracer does both."""
    _check_threshold("node", node_threshold)
    _check_threshold("edge", edge_threshold)
    count_sources = _definition(graph, "count_sources", count_sources)
    require_feature_inputs = _definition(graph, "require_feature_inputs", require_feature_inputs)
    A, w = graph.adjacency, graph.logit_weights()
    N, first_token = graph.n_nodes, graph.n_features + graph.n_errors
    always = torch.zeros(N, dtype=torch.bool)
    always[first_token:] = True
    is_feature = torch.arange(N) < graph.n_features
    infl = influence(normalized(A), w)
    node_cut = torch.zeros(N)
    ranked = first_token + (graph.n_pos if count_sources else 0)
    node_cut[:ranked] = _cut(infl[:ranked])
    node_cut[first_token:] = 0  # tokens are kept whatever their share
    node_mask = always | (node_cut < node_threshold)
    An = normalized(A * node_mask[:, None] * node_mask[None, :])
    infl_kept = influence(An, w)
    edge_score = An * (infl_kept + w)[:, None]
    edge_cut = _cut(edge_score.flatten()).view(N, N)
    edge_mask = (edge_cut < edge_threshold) & (edge_score > 0)
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        has_out = edge_mask.any(0)
        has_in = edge_mask.any(1) | ~is_feature if require_feature_inputs else True
        keep = always | (node_mask & has_out & has_in)
        if bool((keep == node_mask).all()):
            break
        node_mask = keep
    infl[first_token + graph.n_pos:] = w[first_token + graph.n_pos:]
    return Pruned(node_mask, edge_mask, node_cut, edge_cut, infl)


def graph_scores(graph: AttributionGraph, pruned: Optional[Pruned] = None,
                 count_sources: Optional[bool] = None) -> dict[str, float]:
    """The replacement score (the share of the influence on the logits that starts at tokens rather
    than at error nodes) and the completeness score (the share of the nodes' inputs, weighted by each
    node's influence, that comes from non-error nodes; with `count_sources`, as in circuit-tracer,
    tokens and errors are weighed too, as fully explained, and it defaults to the graph's
    `GraphConfig`). With `pruned`, pruned features count as error nodes, as the methods paper scores a
    pruned graph."""
    count_sources = _definition(graph, "count_sources", count_sources)
    A, w = graph.adjacency, graph.logit_weights()
    nf, ne, S = graph.n_features, graph.n_errors, graph.n_pos
    N = graph.n_nodes
    error_like = torch.zeros(N, dtype=torch.bool)
    error_like[nf:nf + ne] = True
    An = normalized(A)
    if pruned is not None:
        gone = ~pruned.node_mask
        gone[nf + ne:] = False
        error_like |= gone
        An = An * (~gone)[:, None]  # a pruned node's own inputs are not traced: it acts as a source
    infl = influence(An, w)
    tokens = slice(nf + ne, nf + ne + S)
    from_tokens = float(infl[tokens].sum())
    from_errors = float(infl[error_like].sum())
    replacement = from_tokens / max(from_tokens + from_errors, 1e-30)
    has_inputs = An.sum(1) > 0
    weight = (infl + w) if count_sources else (infl + w) * has_inputs
    non_error = 1 - An[:, error_like].sum(1)
    completeness = float((non_error * weight).sum() / weight.sum().clamp_min(1e-30))
    return {"replacement_score": replacement, "completeness_score": completeness}


def position_influence(graph: AttributionGraph, logit: int = 0) -> dict[str, torch.Tensor]:
    """Influence on one logit node (index into the logit nodes), by kind, [n_layers, S] for features
    and errors and [S] for tokens: where in the prompt, and at which layer, the answer is computed."""
    w = torch.zeros(graph.n_nodes)
    w[graph.logit_index(logit)] = 1.0
    infl = influence(normalized(graph.adjacency), w)
    L, S, nf = graph.n_layers, graph.n_pos, graph.n_features
    feats = torch.zeros(L, S)
    if nf:
        feats.index_put_((graph.features[:, 0], graph.features[:, 1]), infl[:nf], accumulate=True)
    errors = infl[nf:nf + graph.n_errors].view(L, S)
    tokens = infl[nf + graph.n_errors: nf + graph.n_errors + S]
    return {"features": feats, "errors": errors, "tokens": tokens}


# -- interventions -----------------------------------------------------------------------------------
@torch.no_grad()
def intervene(model: HookedModel, transcoders: Transcoders, graph: AttributionGraph, nodes: Sequence[int],
              scale: float = 0.0) -> dict[str, Any]:
    """Scale the activations of feature `nodes` by `scale` (0: ablate) in the real model, by adding
    (scale − 1)·a·(decoder) to the MLP outputs they write, and compare the change of every logit node
    with two predictions of the graph: its direct edges only, and the change carried through the
    graph's features (linearised: an active feature's activation moves with its pre-activation).
    The edit is checked to reach the MLP outputs; if it does not, nothing is reported."""
    check_graph_model(graph, model)
    nodes = [int(n) for n in nodes]
    bad = [n for n in nodes if not 0 <= n < graph.n_features]
    if bad:
        raise InputError(f"Nodes {bad[:5]} are not feature nodes (features are 0–{graph.n_features - 1}).")
    L, S, d = graph.n_layers, graph.n_pos, transcoders.d_model
    device = next(model.parameters()).device
    tokens = torch.tensor([graph.tokens], device=device)
    delta = torch.zeros(L, S, d, device=device)
    for n in nodes:
        l0, p, f = (int(v) for v in graph.features[n])
        dec = transcoders.decoder(l0)[f]  # [n_out, d]
        delta[l0:l0 + dec.shape[0], p] += (scale - 1) * float(graph.activations[n]) * dec.float()
    seen: dict[int, torch.Tensor] = {}

    def add(act, hook, l):
        return act + delta[l].reshape(act.shape).to(act.dtype)

    def check(act, hook, l):
        seen[l] = per_token(act.detach().float(), 1, S)
        return act

    _, clean = run_collect(model, tokens, [output_hook(l) for l in range(L)])
    hooks = [(output_hook(l), lambda a, hook, l=l: add(a, hook, l)) for l in range(L)]
    hooks += [(output_hook(l), lambda a, hook, l=l: check(a, hook, l)) for l in range(L)]
    logits = uncap_logits(model, model.run_with_hooks(tokens, fwd_hooks=hooks))[0, -1].float()
    first = min(int(graph.features[n, 0]) for n in nodes) if nodes else 0
    took = float((seen[first][0] - per_token(clean[output_hook(first)], 1, S)[0].float() - delta[first]).abs().max()) \
        if nodes else 0.0
    if took > 1e-4 * max(1.0, float(delta[first].abs().max())):
        raise DoesNotApplyError(f"{describe(model).label}: a feature intervention does not apply: the edit at "
                                f"{output_hook(first)} did not take effect, so its logit change cannot be reported.")
    clean_logits = uncap_logits(model, model(tokens))[0, -1].float()
    ids = graph.logit_tokens.to(device)
    actual = (logits - clean_logits)[ids].cpu()

    A = graph.adjacency
    nf = graph.n_features
    a = graph.activations.clamp_min(1e-12)
    d_src = torch.zeros(nf)
    d_src[nodes] = (scale - 1) * graph.activations[nodes]
    logit_rows = A[graph.n_nodes - graph.n_logits:, :nf] / a  # per unit of each feature's activation
    direct = logit_rows @ d_src
    M = A[:nf, :nf] / a  # feature -> feature, per unit
    change = d_src.clone()
    clamped = torch.zeros(nf, dtype=torch.bool)
    clamped[nodes] = True
    for _ in range(L):
        change = torch.where(clamped, d_src, M @ change)
    through = logit_rows @ change
    return {"nodes": nodes, "scale": scale, "logit_tokens": graph.logit_tokens.tolist(),
            "actual": actual.tolist(), "predicted_direct": direct.tolist(), "predicted_graph": through.tolist()}


# -- files ---------------------------------------------------------------------------------------------
def check_graph_model(graph: AttributionGraph, model: HookedModel) -> None:
    """A clear error when `graph` was not built on `model` (its logits on the prompt must match)."""
    n_layers, vocab = int(model.cfg.n_layers), int(model.cfg.d_vocab)
    ids = [*graph.tokens, *graph.logit_tokens.tolist()]
    if graph.n_layers != n_layers or (ids and max(ids) >= vocab):
        raise InputError(f"This graph was built on a model with {graph.n_layers} layers ({graph.model_name!r}); this "
                         f"model has {n_layers} layers and a vocabulary of {vocab}. Load it with the model it was "
                         "built on, or build a new graph.")
    with torch.no_grad():
        logits = uncap_logits(model, model(torch.tensor([graph.tokens], device=next(model.parameters()).device)))
        logits = logits[0, -1].float().cpu()
    saved = torch.tensor(graph.meta.get("logits_clean", []))
    now = logits[graph.logit_tokens]
    if saved.shape != now.shape or float((saved - now).abs().max()) > 1e-3 * max(1.0, float(saved.abs().max())):
        raise InputError(f"This graph does not match this model: its logits on the graph's prompt differ from the ones "
                         f"saved with the graph (built on {graph.model_name!r}). Load it with the model it was built "
                         "on, or build a new graph.")


def graph_files(graph: AttributionGraph) -> dict[str, Union[str, bytes]]:
    """{graph.safetensors: the tensors, graph.json: prompt, tokens and metadata}: what `save_graph`
    writes and what the report puts beside each graph's viewer. The adjacency is stored sparse (an
    int32 flat index and a float32 value per edge) when that is smaller."""
    flat = graph.adjacency.flatten()
    where = flat.nonzero().flatten()
    if len(where) * 2 < len(flat) and len(flat) < 2 ** 31:  # sparse is smaller: an int32 index and a value per edge
        adjacency = {"adjacency_index": where.to(torch.int32), "adjacency_values": flat[where].contiguous()}
    else:
        adjacency = {"adjacency": graph.adjacency.contiguous()}
    tensors = save({"features": graph.features.contiguous(), "activations": graph.activations.float().contiguous(),
                    "logit_tokens": graph.logit_tokens.contiguous(),
                    "logit_probs": graph.logit_probs.float().contiguous(),
                    **adjacency, "bias": graph.bias.contiguous(), "values": graph.values.contiguous()})
    meta = json.dumps(strict_json({"kind": "workbench.AttributionGraph", "format_version": GRAPH_FORMAT,
                                   "model_name": graph.model_name, "tokens": graph.tokens,
                                   "token_strs": graph.token_strs,
                                   "n_layers": graph.n_layers, "transcoders": graph.transcoders, "meta": graph.meta}),
                      indent=1, allow_nan=False)
    return {GRAPH_FILE: tensors, GRAPH_META_FILE: meta}


def save_graph(graph: AttributionGraph, folder: Union[str, Path]) -> Path:
    """graph.safetensors + graph.json, written into a new folder atomically (an existing folder the
    workbench did not write is refused)."""
    def build(tmp: Path) -> None:
        for name, data in graph_files(graph).items():
            (tmp / name).write_bytes(data) if isinstance(data, bytes) else (tmp / name).write_text(data)

    return write_output_folder(Path(folder), "attribution graph", build)


def load_graph(folder: Union[str, Path], model: Optional[HookedModel] = None) -> AttributionGraph:
    """A graph written by `save_graph`; with `model`, checked to belong to it."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / GRAPH_META_FILE).read_text())
        t = load_file(str(folder / GRAPH_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not an attribution graph: it needs {GRAPH_META_FILE} and "
                              f"{GRAPH_FILE}.") from None
    except Exception as err:
        raise CheckpointError(f"The attribution graph in {folder} is damaged ({type(err).__name__}: {err}).") from err
    graph = _graph_from_files(folder, meta, t)
    if model is not None:
        check_graph_model(graph, model)
    return graph


def _graph_from_files(folder: Path, meta: Any, t: dict[str, torch.Tensor]) -> AttributionGraph:
    """The graph held by graph.json (`meta`) and graph.safetensors (`t`), each field checked for its type,
    shape and range first: a damaged file is refused here, never loaded to fail (or mislead) later."""
    json_path, tensor_path = folder / GRAPH_META_FILE, folder / GRAPH_FILE

    def damaged(path: Path, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the file is damaged. Build the graph again.")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(meta, dict) or meta.get("kind") != "workbench.AttributionGraph":
        raise CheckpointError(f"{json_path} is not an attribution graph file (it should hold a JSON object with "
                              "kind 'workbench.AttributionGraph').")
    version = meta.get("format_version", 1)
    if not is_int(version) or version < 1:
        raise damaged(json_path, f"format_version should be a positive integer, got {version!r}")
    if version > GRAPH_FORMAT:
        raise CheckpointError(f"{json_path} is graph format {version}, newer than this workbench reads "
                              f"({GRAPH_FORMAT}); upgrade the workbench to load it.")
    sparse = ("adjacency_index", "adjacency_values")
    needed = ["features", "activations", "logit_tokens", "logit_probs", "bias", "values"]
    missing = [k for k in needed if k not in t] + ([] if "adjacency" in t or all(k in t for k in sparse)
                                                   else ["adjacency (or adjacency_index and adjacency_values)"])
    missing += [k for k in ("model_name", "tokens", "token_strs", "n_layers") if k not in meta]
    if missing:
        raise CheckpointError(f"The attribution graph in {folder} lacks {', '.join(missing)}; the files are damaged "
                              "or incomplete. Build the graph again.")

    # graph.json
    n_layers, tokens, token_strs = meta["n_layers"], meta["tokens"], meta["token_strs"]
    extra = meta.get("meta", {})
    for key, ok, want in (
            ("model_name", isinstance(meta["model_name"], str), "text"),
            ("transcoders", isinstance(meta.get("transcoders", ""), str), "text"),
            ("n_layers", is_int(n_layers) and n_layers >= 1, "a positive integer"),
            ("tokens", isinstance(tokens, list) and len(tokens) > 0 and all(is_int(x) and x >= 0 for x in tokens),
             "a non-empty list of token ids (integers ≥ 0)"),
            ("token_strs", isinstance(token_strs, list) and all(isinstance(x, str) for x in token_strs)
             and len(token_strs) == (len(tokens) if isinstance(tokens, list) else -1),
             "a list of strings, one per token"),
            ("meta", isinstance(extra, dict), "a JSON object")):
        if not ok:
            value = meta.get(key)
            raise damaged(json_path, f"{key} should be {want}, got {value!r:.80}" if not isinstance(value, list)
                          else f"{key} should be {want}, got a list of {len(value)}")

    # graph.safetensors: dtypes and shapes
    def tensor(name: str, floating: bool, shape: tuple[Optional[int], ...]) -> torch.Tensor:
        x = t[name]
        kind_ok = x.is_floating_point() if floating else not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool
        if not kind_ok or x.ndim != len(shape) or any(w is not None and n != w for n, w in zip(x.shape, shape)):
            want = "×".join("n" if w is None else str(w) for w in shape)
            raise damaged(tensor_path, f"{name} should be a {'float' if floating else 'integer'} tensor of shape "
                                       f"[{want}], got {x.dtype} {list(x.shape)}")
        if floating and not bool(torch.isfinite(x).all()):
            raise damaged(tensor_path, f"{name} holds NaN or inf values")
        return x.long() if not floating else x

    features = tensor("features", False, (None, 3))
    nf = int(features.shape[0])
    activations = tensor("activations", True, (nf,))
    logit_tokens = tensor("logit_tokens", False, (None,))
    n_logits = int(logit_tokens.shape[0])
    logit_probs = tensor("logit_probs", True, (n_logits,))
    S = len(tokens)
    N = nf + n_layers * S + S + n_logits
    bias, values = tensor("bias", True, (N,)), tensor("values", True, (N,))
    if nf and (int(features[:, 0].min()) < 0 or int(features[:, 0].max()) >= n_layers or int(features[:, 1].min()) < 0
               or int(features[:, 1].max()) >= S or int(features[:, 2].min()) < 0):
        raise damaged(tensor_path, f"features lists (layer, position, id) outside the graph's {n_layers} layers and "
                                   f"{S} positions, or a negative feature id")
    if n_logits and int(logit_tokens.min()) < 0:
        raise damaged(tensor_path, "logit_tokens holds a negative token id")
    for key, check, want in (("logit_strs", lambda v: isinstance(v, str), "strings"),
                             ("logits_clean", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                              and math.isfinite(v), "finite numbers")):
        if key in extra and not (isinstance(extra[key], list) and len(extra[key]) == n_logits
                                 and all(check(v) for v in extra[key])):
            raise damaged(json_path, f"meta.{key} should be a list of {n_logits} {want}, one per logit node")

    # the adjacency, dense or as an edge list
    if "adjacency" in t:
        adjacency = tensor("adjacency", True, (N, N))
    else:
        index, edge_values = tensor("adjacency_index", False, (None,)), tensor("adjacency_values", True, (None,))
        if index.shape != edge_values.shape or (len(index) and (int(index.min()) < 0 or int(index.max()) >= N * N)):
            raise damaged(tensor_path, f"the edge list does not fit the {N} × {N} adjacency ({tuple(index.shape)} "
                                       f"indices, {tuple(edge_values.shape)} values)")
        adjacency = torch.zeros(N * N).index_put_((index,), edge_values.float()).view(N, N)
    return AttributionGraph(meta["model_name"], list(tokens), list(token_strs), n_layers, features, activations,
                            logit_tokens, logit_probs, adjacency, bias, values, meta.get("transcoders", ""), extra)


def viewer_data(graph: AttributionGraph, max_nodes: int = 400, max_edges: int = 4000,
                examples: Optional[dict[tuple[int, int], list[tuple[str, float]]]] = None,
                hrefs: Optional[dict[tuple[int, int], str]] = None) -> dict[str, Any]:
    """The payload of `workbench.report.widgets.graph_viewer`: the `max_nodes` most influential features and
    errors (tokens and logits always) and the strongest `max_edges` edges among them, each with its
    cut so the viewer's sliders re-prune. `examples` and `hrefs` are keyed by (layer, feature id)."""
    pr = prune(graph, 1.0, 1.0)
    N, first_token = graph.n_nodes, graph.n_features + graph.n_errors
    ranked = [int(i) for i in pr.node_cut[:first_token].argsort()[:max_nodes]]
    shown = sorted(ranked + list(range(first_token, N)))
    index = {n: i for i, n in enumerate(shown)}
    nodes = []
    for n in shown:
        info = graph.node(n)
        key = (info["layer"], info["feature"])
        nodes.append({"id": index[n], "kind": info["kind"], "layer": info["layer"], "pos": info["pos"],
                      "label": info["label"], "activation": _finite(float(graph.activations[n]) if n < graph.n_features
                                                                    else float(graph.values[n])),
                      "influence": _finite(float(pr.node_influence[n])),
                      "node_cut": _finite(float(pr.node_cut[n])) if n < first_token else 0.0,
                      "href": (hrefs or {}).get(key) if info["kind"] == "feature" else None,
                      "examples": [[s, _finite(v)] for s, v in (examples or {}).get(key, [])][:5]
                      if info["kind"] == "feature" else []})
    sel = torch.tensor(shown)
    sub = graph.adjacency[sel][:, sel]
    cut = pr.edge_cut[sel][:, sel]
    t_idx, s_idx = sub.nonzero(as_tuple=True)
    order = cut[t_idx, s_idx].argsort()[:max_edges]
    edges = [[int(s_idx[k]), int(t_idx[k]), _finite(float(sub[t_idx[k], s_idx[k]])),
              _finite(float(cut[t_idx[k], s_idx[k]]))]
             for k in order]
    return {"tokens": graph.token_strs, "n_layers": graph.n_layers, "nodes": nodes, "edges": edges,
            "node_threshold": 0.8, "edge_threshold": 0.98}


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0
