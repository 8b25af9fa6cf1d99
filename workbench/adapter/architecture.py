"""What a model is, as far as the analyses are concerned: `Architecture` (read from the config and
checked on a run by `workbench.adapter.probe.describe`), the error an analysis raises where a piece
it needs was not verified, and the few facts about a model object every part of the adapter asks
(is it a TransformerBridge, which device, which norm module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.model.hooked import HookedModel

NormKind = Literal["LN", "RMS", "none"]
Positional = Literal["learned", "rotary", "alibi", "none"]
KnockoutMethod = Literal["attn_scores", "recompute_z"]
Piece = Literal["fold", "embedding", "residual", "z edits", "qkv edits", "knockout"]


class DoesNotApplyError(WorkbenchError):
    """An analysis, or a part of one, that this model's architecture cannot support. The message
    names the architecture and the missing piece."""


@dataclass(frozen=True)
class Architecture:
    """What a model is, as far as the analyses are concerned: read from its config, then checked by
    running it (see `workbench.adapter`)."""

    family: str
    """'workbench', or the Hugging Face model_type ('gpt2', 'llama', 'gemma2', ...)."""
    class_name: str
    """The model class: 'Transformer', or the Hugging Face class, e.g. 'LlamaForCausalLM'."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Query heads per layer."""
    n_kv_heads: int
    """Key/value heads per layer (fewer than n_heads under grouped-query attention)."""
    d_model: int
    """Residual stream width."""
    d_head: int
    """Width of each head."""
    d_vocab: int
    """Vocabulary size."""
    norm: NormKind
    """'LN' (LayerNorm: centres and scales), 'RMS' (scales only) or 'none'."""
    norm_offset: float
    """Added to every norm weight: 1.0 where RMSNorm scales by (1 + w) (Gemma, Gemma 2), else 0.0."""
    positional: Positional
    """'learned' (W_pos), 'rotary', 'alibi' or 'none'."""
    parallel: bool
    """Attention and MLP read the same residual stream (GPT-NeoX, GPT-J, Phi): no hook_resid_mid."""
    post_norms: bool
    """A norm on each sublayer's output before the residual add (Gemma 2)."""
    has_mlp: bool
    """The blocks have MLPs."""
    embed_scale: float
    """Factor between the (normalised) token embedding and what enters the residual stream (√d_model on Gemma)."""
    embed_norm: bool
    """A LayerNorm on the token embedding before the first block (BLOOM)."""
    logit_softcap: Optional[float]
    """c in logits = c·tanh(x / c) (Gemma 2), or None."""
    fired: frozenset[str]
    """Hook names that fired on the probe run."""
    knockout: Optional[KnockoutMethod]
    """How attention is knocked out, or None where no edit could be verified."""
    problems: tuple[tuple[str, str], ...] = field(default=())
    """(piece, what failed) for every check that did not pass."""

    @property
    def label(self) -> str:
        """'llama (LlamaForCausalLM)': how errors and notes name the architecture."""
        return self.family if self.family == "workbench" else f"{self.family} ({self.class_name})"

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: several query heads share a key/value head."""
        return self.n_kv_heads < self.n_heads

    def problem(self, piece: str) -> Optional[str]:
        """What failed for `piece`, or None when its check passed."""
        return dict(self.problems).get(piece)

    def require(self, piece: Piece, what: str) -> None:
        """Raise DoesNotApplyError, naming the architecture, unless `piece` was verified."""
        why = self.problem(piece)
        if why is not None:
            raise DoesNotApplyError(f"{self.label}: {what} does not apply: {why}.")

    def require_hooks(self, names: Sequence[str], what: str) -> None:
        """Raise DoesNotApplyError unless every hook in `names` fired on the probe run."""
        missing = [n for n in names if n not in self.fired]
        if missing:
            raise DoesNotApplyError(f"{self.label}: {what} does not apply: the model never fires "
                                    f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
                                    f"{' (parallel attention and MLP blocks)' if self.parallel else ''}.")

    def notes(self) -> list[str]:
        """What a reader of weight-space circuits on this architecture should know."""
        out = []
        if self.positional == "rotary":
            out.append("rotary positions: token QK circuits are the attention score at relative distance 0 "
                       "(rotary turns q and k by position after hook_q/hook_k)")
        if self.positional == "alibi":
            out.append("ALiBi positions: each head also adds a linear penalty on distance, not in the QK circuits")
        if self.grouped:
            out.append(f"grouped-query attention: {self.n_heads} query heads share {self.n_kv_heads} key/value "
                       "heads; W_K and W_V are expanded to one copy per query head")
        if self.post_norms:
            out.append("post-sublayer norms: W_O carries the post-attention norm's scale, and its per-token "
                       "1/rms is held constant, like every norm's")
        if self.logit_softcap is not None:
            out.append(f"logits are soft-capped (c = {self.logit_softcap:g}); direct logit attribution "
                       "splits the logit before the cap")
        return out


def _is_bridge(model: HookedModel) -> bool:
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


def _device(model: HookedModel) -> torch.device:
    return next(model.parameters()).device


def _block_norm(block: Any, name: str) -> Any:
    """A block's norm submodule by its TransformerLens name ('ln1', 'ln1_post', ...), or None."""
    return block._modules.get(name)
