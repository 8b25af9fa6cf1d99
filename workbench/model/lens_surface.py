"""TransformerLens's model surface on the workbench `Transformer`: what TransformerLens's own modules
(`ActivationCache`, `patching`, `head_detector`, `evals`, `utilities.test_prompt`, `SVDInterpreter`)
and ARENA-style notebook code read from a model.

    logits, cache = model.run_with_cache(tokens)      # a transformer_lens.ActivationCache
    cache["pattern", 1]; cache.decompose_resid(); cache.logit_attrs(stack, " x")
    model.to_tokens(["a b", "a"])                     # [2, 3]: padded on the right with <|endoftext|>
    model.to_str_tokens("def f"); model.to_single_token("x"); model.get_token_position("f", "def f")
    model.OV[1, 3]; model.blocks[1].attn.QK           # FactoredMatrix views of the weights
    model.cfg.device                                  # where the weights are now (follows .to())

Three mixins, so that `transformer.py` stays the model itself: `LensConfig` (the config attributes
TransformerLens reads, mixed into the model's config), `LensSurface` (tokens, weights and the cache,
mixed into `Transformer`) and `HeadCircuits` (`QK`/`OV` of one attention layer, mixed into
`Attention`). What differs from TransformerLens, and why, is written where it happens: no per-head
`hook_result` (the cache computes `result` from `hook_z` on first use), no split-QKV or attention-in
hooks, weights as trained (LayerNorm not folded in), no BOS by default (the models were trained on
rows of packed text, without one), and `ln*.hook_normalized` after the LayerNorm's weight and bias
(the sublayer's input, which the workbench's transcoders read; TransformerLens hooks it before them).

Shape letters as in `workbench.model.transformer` (B batch, S position, L layers, H heads, D d_model,
K d_head, M d_mlp, V d_vocab).
"""

from __future__ import annotations

import copy
import math
import re
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from transformer_lens import ActivationCache, FactoredMatrix
from transformer_lens.utilities import composition_scores, get_act_name

from workbench.errors import HookNameError, InputError

TokenInput = Union[str, int, torch.Tensor]


# -- the config ---------------------------------------------------------------------------------------
class LensConfig:
    """The attributes TransformerLens code reads from `model.cfg` beyond the `ModelConfig` fields, each
    true to the workbench model. Mixed into the config a `Transformer` holds (`bind` makes it), so the
    saved fields, `to_dict` and equality stay those of `ModelConfig`; `device` and `dtype` are read
    from the model's weights, so they follow `.to()`."""

    # The fields and properties of ModelConfig, which this is mixed into:
    d_vocab: int
    d_head: int
    attn_only: bool

    @classmethod
    def bind(cls, cfg: Any, model: torch.nn.Module) -> Any:
        """A copy of the config `cfg` that also answers what TransformerLens reads about `model`."""
        bound = cls(**cfg.to_dict())
        # once, at creation (the config's values never change); a weak reference, so that a model and its
        # config do not keep each other alive after the last user reference is gone
        object.__setattr__(bound, "_model", weakref.ref(model))
        return bound

    def __eq__(self, other: object) -> bool:
        """Equal to a `ModelConfig` (bound or not) with the same fields."""
        if not hasattr(other, "to_dict") or not (isinstance(other, LensConfig) or isinstance(self, type(other))):
            return NotImplemented
        return self.to_dict() == other.to_dict()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return super().__hash__()  # the ModelConfig's: a hash of the fields

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A copy bound to the copy of its model when the model is being copied (deepcopy puts the new
        model in `memo` before copying its attributes), else to the same model."""
        ref = self.__dict__.get("_model")
        model = ref() if ref is not None else None
        new = copy.copy(self)  # the fields are numbers and strings
        if model is not None:
            object.__setattr__(new, "_model", weakref.ref(memo.get(id(model), model)))
        memo[id(self)] = new
        return new

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its model (a weak reference cannot be pickled); `Transformer.__setstate__`
        binds it again."""
        return {k: v for k, v in self.__dict__.items() if k != "_model"}

    def _bound_model(self) -> torch.nn.Module:
        ref = self.__dict__.get("_model")
        model = ref() if ref is not None else None
        if model is None:
            raise InputError("This config is not bound to a model (Transformer(cfg).cfg is), so it has no device "
                             "or dtype.")
        return model

    @property
    def device(self) -> torch.device:
        """The device of the model's weights."""
        return self._bound_model().embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights."""
        return self._bound_model().embed.W_E.dtype

    @property
    def model_name(self) -> str:
        """The model folder's name ('attn-only-2l'), as `workbench.adapter.provenance.model_name_of`
        names a model; '' for a model built in memory."""
        folder = getattr(self._bound_model(), "folder", None)
        return Path(folder).name if folder is not None else ""

    @property
    def d_vocab_out(self) -> int:
        """Width of the logits: the vocabulary."""
        return self.d_vocab

    @property
    def attn_scale(self) -> float:
        """The scores are divided by sqrt(d_head)."""
        return math.sqrt(self.d_head)

    n_devices = 1
    """One device holds the whole model."""
    default_prepend_bos = False
    """False: the workbench's models were trained on rows cut from packed text (documents joined by
    <|endoftext|>), never starting with a BOS, so text is tokenized as it is unless prepend_bos=True."""
    tokenizer_prepends_bos = False
    """The workbench's tokenizers add no special token."""
    tokenizer_appends_eos = False
    """Nor at the end."""
    positional_embedding_type = "standard"
    """A learned absolute positional embedding (W_pos [n_ctx, D]), added to the token embedding."""
    original_architecture = "workbench.Transformer"
    """The class that defines the model (a Hugging Face class name, for TransformerLens's bridges)."""
    n_key_value_heads = None
    """None: every head has its own keys and values (no grouped-query attention)."""
    eps = 1e-5
    """The epsilon of every LayerNorm (workbench.model.transformer.LayerNorm's)."""
    attention_dir = "causal"
    use_attn_scale = True
    use_attn_result = False
    """No per-head result hook (`blocks.{l}.attn.hook_result`); the activation cache computes
    `cache["result", l]` from hook_z and W_O when asked."""
    use_split_qkv_input = False
    """No per-head copies of the attention input (hook_q_input/k_input/v_input)."""
    use_attn_in = False
    """No hook_attn_in."""
    use_hook_mlp_in = False
    """No hook_mlp_in: the MLP's input is hook_resid_mid (before ln2) or ln2.hook_normalized."""
    use_local_attn = False
    final_rms = False
    gated_mlp = False
    parallel_attn_mlp = False
    rmsnorm_uses_offset = False
    output_logits_soft_cap = -1.0
    """No soft cap on the logits (TransformerLens's value for none)."""
    attn_scores_soft_cap = -1.0
    """No soft cap on the attention scores."""


# -- the activation cache -----------------------------------------------------------------------------
class LensCache(ActivationCache):
    """TransformerLens's `ActivationCache`, with two things the workbench model needs: `cache["result", l]`
    (per-head outputs [B, S, H, D], which the model has no hook for) is computed from hook_z and W_O on
    first use, as `compute_head_results` does; and a name the model has no hook for is a `HookNameError`
    that says so (still a KeyError), instead of a bare KeyError. The neuron readers refuse an
    attention-only model with an InputError, where TransformerLens would fail an assertion on cfg.d_mlp."""

    def __getitem__(self, key: Any) -> torch.Tensor:
        try:
            return super().__getitem__(key)
        except KeyError:
            pass
        wants_result = ((isinstance(key, str) and key.endswith("attn.hook_result"))
                        or (isinstance(key, tuple) and len(key) > 0 and key[0] == "result"))
        if wants_result and not all(f"blocks.{l}.attn.hook_result" in self.cache_dict
                                    for l in range(self.model.cfg.n_layers)):
            self.compute_head_results()  # every layer's, from hook_z: an error names a hook_z left out
            try:
                return super().__getitem__(key)
            except KeyError:
                pass
        raise self.model.missing_activation(key) from None

    def get_neuron_results(self, layer: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        """TransformerLens's, refusing clearly on an attention-only model (which has no neurons)."""
        self._require_mlp("get_neuron_results")
        return super().get_neuron_results(layer, *args, **kwargs)

    def stack_neuron_results(self, layer: int, *args: Any, **kwargs: Any) -> Any:
        """TransformerLens's, refusing clearly on an attention-only model (which has no neurons)."""
        self._require_mlp("stack_neuron_results")
        return super().stack_neuron_results(layer, *args, **kwargs)

    def _require_mlp(self, what: str) -> None:
        if self.model.cfg.attn_only:
            raise InputError(f"{what}: this model is attention-only, so it has no MLP neurons.")


# -- the attention layer's circuits -------------------------------------------------------------------
class HeadCircuits:
    """`QK` and `OV` of one attention layer as `FactoredMatrix`es [H, D, D] (TransformerLens's
    `Attention.QK` / `.OV`), from the layer's weights as trained."""

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q @ W_K^T per head: [H, D, D] as [H, D, K] @ [H, K, D]."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V @ W_O per head: [H, D, D] as [H, D, K] @ [H, K, D]."""
        return FactoredMatrix(self.W_V, self.W_O)


# -- the model ----------------------------------------------------------------------------------------
class LensSurface:
    """TransformerLens's model surface, mixed into the workbench `Transformer`: `run_with_cache` returning
    an `ActivationCache`, the tokenizer helpers with TransformerLens's signatures, the stacked weights
    and their `FactoredMatrix` circuits, and the weight readers `ActivationCache` calls."""

    # What the Transformer this is mixed into has:
    cfg: Any
    tokenizer: Any
    hook_dict: dict[str, Any]
    blocks: Any
    embed: Any
    pos_embed: Any
    unembed: Any

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled: its config is bound to it again (a pickled config leaves its model out)."""
        super().__setstate__(state)  # type: ignore[misc]
        cfg = self.__dict__.get("cfg")
        if isinstance(cfg, LensConfig):
            object.__setattr__(cfg, "_model", weakref.ref(self))

    # -- the cache ------------------------------------------------------------------------------------
    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False,
                       **kwargs: Any) -> tuple[Any, Any]:
        """TransformerLens's run_with_cache: (the forward's output, a `transformer_lens.ActivationCache` of
        every hook, or of those `names_filter` keeps). `return_cache_object=False` gives the plain dict."""
        out, cache_dict = super().run_with_cache(  # type: ignore[misc]
            *model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache_dict
        return out, LensCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def missing_activation(self, key: Any) -> KeyError:
        """The error for a cache lookup that found nothing: the hook does not exist in this model (an
        attention-only model has no MLP hooks, one without LayerNorm no scale), or it was not cached."""
        parts = list(key) if isinstance(key, tuple) else [key]
        if len(parts) > 1 and isinstance(parts[1], int) and parts[1] < 0:
            parts[1] += self.cfg.n_layers  # ("resid_post", -1): counted from the end, as the cache does
        try:
            name = get_act_name(*parts)
        except Exception:  # not an activation name in any spelling TransformerLens knows
            return KeyError(key)
        if name in self.hook_dict:
            return KeyError(f"{name!r} is a hook of this model but is not in this cache: run_with_cache's "
                            "names_filter left it out.")
        layer = re.match(r"blocks\.(\d+)\.", name)  # the name came from the user: its layer is in it
        if layer is not None and int(layer.group(1)) >= self.cfg.n_layers:
            why = f": it has {self.cfg.n_layers} layer(s), 0 to {self.cfg.n_layers - 1}."
        elif self.cfg.attn_only and ("mlp" in name or "resid_mid" in name or ".ln2." in name):
            why = ": it is attention-only (no MLP, so no hook_resid_mid, hook_mlp_out, ln2 or mlp hooks)."
        elif self.cfg.normalization_type is None and ("ln" in name or "hook_scale" in name or "normalized" in name):
            why = ": it has no LayerNorm (so no hook_scale or hook_normalized)."
        else:
            why = "."
        return HookNameError(f"This model has no hook {name!r}{why} `workbench info <model>` lists its "
                             f"{len(self.hook_dict)} hooks.")

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Refuses True: the model has no per-head result hook. `cache["result", l]`,
        `cache.stack_head_results()` and `cache.get_full_resid_decomposition()` work without it."""
        self._refuse_flag("use_attn_result", use_attn_result, "a per-head result hook (blocks.{l}.attn.hook_result); "
                          "cache['result', l] and cache.stack_head_results() compute the head results from hook_z")

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Refuses True: the model has no per-head query/key/value inputs (so no direct path patching)."""
        self._refuse_flag("use_split_qkv_input", use_split_qkv_input,
                          "per-head query/key/value inputs (hook_q_input, hook_k_input, hook_v_input)")

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Refuses True: the model has no hook_attn_in."""
        self._refuse_flag("use_attn_in", use_attn_in, "a per-head attention input (hook_attn_in)")

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Refuses True: the model has no hook_mlp_in (its MLP reads ln2's output, hook_normalized)."""
        self._refuse_flag("use_hook_mlp_in", use_hook_mlp_in, "hook_mlp_in (the MLP's input is ln2.hook_normalized)")

    def _refuse_flag(self, flag: str, value: bool, missing: str) -> None:
        if value:
            raise InputError(f"set_{flag}(True): the workbench Transformer has no {missing}. Its hooks are fixed; "
                             "`workbench info <model>` lists them.")

    # -- tokens and text ------------------------------------------------------------------------------
    def _require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise InputError(f"{what}: this model has no tokenizer (it was built or saved without one), so it cannot "
                             "read or write text; pass token ids [batch, pos] instead.")
        return self.tokenizer

    def to_tokens(self, input: Union[str, list[str]], prepend_bos: Optional[bool] = None,
                  padding_side: Optional[Literal["left", "right"]] = None, move_to_device: bool = True,
                  truncate: bool = True) -> torch.Tensor:
        """Text (a string or a list of strings) -> token ids [B, S], as TransformerLens's to_tokens: a BOS
        (<|endoftext|>) first if `prepend_bos` (default `cfg.default_prepend_bos`, False), each row cut to
        n_ctx if `truncate` (TransformerLens keeps n_ctx - 1 without a BOS: it cuts before stripping the BOS its
        tokenizer adds), and a batch of unequal lengths padded with the pad token (<|endoftext|>) on
        `padding_side` (default the tokenizer's, 'right')."""
        tok = self._require_tokenizer("to_tokens")
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise InputError(f"to_tokens takes a string or a non-empty list of strings, got {type(input).__name__}; "
                             "token ids need no tokenizing.")
        side = tok.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}.")
        rows = [tok.encode(t) for t in texts]
        if self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos:
            if tok.bos_token_id is None:
                raise InputError("prepend_bos=True: this model's tokenizer has no BOS token (nor <|endoftext|>).")
            rows = [[tok.bos_token_id, *r] for r in rows]
        if truncate:
            rows = [r[: self.cfg.n_ctx] for r in rows]
        S = max(len(r) for r in rows)
        if any(len(r) != S for r in rows):
            if tok.pad_token_id is None:
                raise InputError("These texts tokenize to different lengths and this model's tokenizer has no pad "
                                 "token; call to_tokens on each one.")
            pads = [[tok.pad_token_id] * (S - len(r)) for r in rows]
            rows = [r + p if side == "right" else p + r for r, p in zip(rows, pads)]
        tokens_BS = torch.tensor(rows, dtype=torch.long).reshape(len(rows), S)
        return tokens_BS.to(self.cfg.device) if move_to_device else tokens_BS

    def to_str_tokens(self, input: Union[str, list, torch.Tensor, np.ndarray], prepend_bos: Optional[bool] = None,
                      padding_side: Optional[Literal["left", "right"]] = None) -> Union[list[str], list[list[str]]]:
        """Each token as its text: of a string (tokenized as to_tokens does), of token ids [S] or [1, S]
        (a tensor or array), or of a list of either (one list each). Tokens are decoded one at a time,
        as TransformerLens does, so a byte that is part of a longer character reads '�'."""
        tok = self._require_tokenizer("to_str_tokens")
        if isinstance(input, list):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]  # type: ignore[misc]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        elif isinstance(input, (torch.Tensor, np.ndarray)):
            ids = torch.as_tensor(input).squeeze()
            ids = ids[None] if ids.ndim == 0 else ids
            if ids.ndim != 1:
                raise InputError(f"to_str_tokens takes the ids of one sequence, [S] or [1, S]; got shape "
                                 f"{tuple(input.shape)} (pass a list of rows for a batch).")
        else:
            raise InputError(f"to_str_tokens takes a string, token ids or a list of either, got "
                             f"{type(input).__name__}.")
        return tok.batch_decode([[int(t)] for t in ids.tolist()])

    def to_string(self, tokens: Union[torch.Tensor, np.ndarray, Sequence[int], Sequence[Sequence[int]]]
                  ) -> Union[str, list[str]]:
        """Token ids -> text: [S] (or one id) to a string, [B, S] to a list of strings."""
        tok = self._require_tokenizer("to_string")
        ids = torch.as_tensor(tokens if not isinstance(tokens, torch.Tensor) else tokens.detach().cpu())
        if ids.ndim == 2:
            return tok.batch_decode(ids.tolist())
        if ids.ndim > 2:
            raise InputError(f"to_string takes token ids [S] or [B, S], got shape {tuple(ids.shape)}.")
        return tok.decode([int(t) for t in ids.reshape(-1).tolist()])

    def to_single_token(self, string: str) -> int:
        """The id of the one token `string` is (no BOS); an InputError if it is more than one token."""
        ids = self.to_tokens(string, prepend_bos=False)[0]
        if ids.numel() != 1:
            raise InputError(f"{string!r} is not a single token: it tokenizes to {ids.numel()} tokens "
                             f"{self.to_str_tokens(ids)}.")
        return int(ids.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The text of one token id."""
        return self.to_str_tokens(torch.tensor([int(int_token)]))[0]  # type: ignore[return-value]

    def get_token_position(self, single_token: TokenInput, input: Union[str, torch.Tensor],
                           mode: Literal["first", "last"] = "first", prepend_bos: Optional[bool] = None,
                           padding_side: Optional[Literal["left", "right"]] = None) -> int:
        """Position of `single_token` (a string of one token, or an id) in `input` (a string, tokenized as
        to_tokens does, or ids [S] / [1, S]): its first or last occurrence; an InputError if absent."""
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last', got {mode!r}.")
        ids = (self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) if isinstance(input, str)
               else input)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise InputError(f"get_token_position searches one sequence, [S] or [1, S]; got {tuple(ids.shape)}.")
            ids = ids[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (ids == token).nonzero().flatten()
        if where.numel() == 0:
            raise InputError(f"Token {token} ({self.to_single_str_token(token)!r}) does not occur in the input.")
        return int(where[0] if mode == "first" else where[-1])

    def tokens_to_residual_directions(self, tokens: TokenInput) -> torch.Tensor:
        """The unembedding directions of tokens: one token (a string, an id or a 1-element tensor) -> [D],
        ids [...] -> [..., D] (columns of W_U, as trained: the final LayerNorm is not folded in)."""
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, torch.Tensor):
            token = int(tokens.item())
        elif isinstance(tokens, (int, np.integer)):
            token = int(tokens)
        else:
            raise InputError(f"tokens must be a string, an id or a tensor of ids, got {type(tokens).__name__}.")
        return self.W_U[:, token]

    # -- weights, stacked over layers (TransformerLens's names and shapes) ----------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """[V, D]"""
        return self.embed.W_E

    @property
    def W_pos(self) -> torch.Tensor:
        """[n_ctx, D]"""
        return self.pos_embed.W_pos

    @property
    def W_E_pos(self) -> torch.Tensor:
        """[V + n_ctx, D]: W_E over W_pos, the basis of everything the first layer can read."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    @property
    def W_U(self) -> torch.Tensor:
        """[D, V]"""
        return self.unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:
        """[V]"""
        return self.unembed.b_U

    def _stack(self, owner: str, attr: str) -> torch.Tensor:
        if owner == "mlp" and self.cfg.attn_only:
            # not AttributeError: nn.Module.__getattr__ would swallow it and blame a missing attribute
            raise InputError(f"{attr}: this model is attention-only and has no MLP weights.")
        return torch.stack([getattr(getattr(b, owner), attr) for b in self.blocks])

    W_Q = property(lambda self: self._stack("attn", "W_Q"), doc="[L, H, D, K]")
    W_K = property(lambda self: self._stack("attn", "W_K"), doc="[L, H, D, K]")
    W_V = property(lambda self: self._stack("attn", "W_V"), doc="[L, H, D, K]")
    W_O = property(lambda self: self._stack("attn", "W_O"), doc="[L, H, K, D]")
    b_Q = property(lambda self: self._stack("attn", "b_Q"), doc="[L, H, K]")
    b_K = property(lambda self: self._stack("attn", "b_K"), doc="[L, H, K]")
    b_V = property(lambda self: self._stack("attn", "b_V"), doc="[L, H, K]")
    b_O = property(lambda self: self._stack("attn", "b_O"), doc="[L, D]")
    W_in = property(lambda self: self._stack("mlp", "W_in"), doc="[L, D, M]")
    b_in = property(lambda self: self._stack("mlp", "b_in"), doc="[L, M]")
    W_out = property(lambda self: self._stack("mlp", "W_out"), doc="[L, M, D]")
    b_out = property(lambda self: self._stack("mlp", "b_out"), doc="[L, D]")

    @property
    def QK(self) -> FactoredMatrix:
        """Every head's W_Q @ W_K^T: [L, H, D, D] as a FactoredMatrix ([L, H, D, K] @ [L, H, K, D])."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Every head's W_V @ W_O: [L, H, D, D] as a FactoredMatrix ([L, H, D, K] @ [L, H, K, D])."""
        return FactoredMatrix(self.W_V, self.W_O)

    def all_composition_scores(self, mode: Literal["Q", "K", "V"]) -> torch.Tensor:
        """Composition scores [L, H, L, H] of every earlier head's OV into every later head's Q, K or V
        input (Elhage et al. 2021), 0 where the second head is not in a later layer. HookedTransformer's
        tensor; TransformerLens 4's bridges wrap the same numbers in a `CompositionScores`."""
        if mode not in ("Q", "K", "V"):
            raise InputError(f"mode must be one of 'Q', 'K', 'V', got {mode!r}.")
        left = self.OV
        right = {"Q": self.QK, "K": self.QK.T, "V": left}[mode]
        scores = composition_scores(left, right, broadcast_dims=True)
        layer = torch.arange(self.cfg.n_layers, device=scores.device)
        later = layer[:, None, None, None] < layer[None, None, :, None]
        return torch.where(later, scores, torch.zeros_like(scores))

    @property
    def all_head_labels(self) -> list[str]:
        """'L0H0', 'L0H1', ... for every head, in the order of stack_head_results."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """[D] the sum of the output biases (b_O, and b_out unless `include_mlp_biases` is False) of the
        layers before `layer`, plus that layer's b_O if `mlp_input`: the bias part of the residual
        stream there, as `ActivationCache.get_full_resid_decomposition` reads it."""
        bias_D = torch.zeros(self.cfg.d_model, device=self.cfg.device, dtype=self.cfg.dtype)
        for block in self.blocks[:layer]:
            bias_D = bias_D + block.attn.b_O
            if include_mlp_biases and not self.cfg.attn_only:
                bias_D = bias_D + block.mlp.b_out
        if mlp_input:
            if not layer < self.cfg.n_layers:
                raise InputError(f"mlp_input=True needs a layer below n_layers={self.cfg.n_layers}, got {layer}.")
            bias_D = bias_D + self.blocks[layer].attn.b_O
        return bias_D
