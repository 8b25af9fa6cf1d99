"""One prompt's attribution graph (`AttributionGraph`: its nodes, ordered features, errors, tokens,
logits, and its adjacency) and how to build it (`GraphConfig`: the node definitions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from workbench.errors import ConfigError


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
