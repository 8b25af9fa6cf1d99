"""Text generation for the workbench `Transformer`: TransformerLens's `generate`, with a KV cache.

    model.generate("def f(x):", max_new_tokens=20)                 # a string back
    model.generate(["a", "longer prompt"], do_sample=False)       # left-padded batch, list of strings
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate)]):
        model.generate("def f(x):", seed=0)                         # the ablated model, read as text

Shape letters as in `workbench.model.transformer`, plus C (the cache's capacity, in positions) and
N (prompt plus generated positions).

The cache holds each layer's keys and values [B, H, C, K] in buffers allocated once, so a new token
costs one position's work (its attention reads the T positions held). Every hook still fires on
every step: with the cache it sees only the new positions (hook_q/k/v/z and the residual hooks
[B, 1, ...], hook_pattern [B, H, 1, T]), as TransformerLens's do, and the cache keeps the keys and
values as the hooks left them, so an edit of `hook_k` holds for later tokens too.

Left padding: a batch of prompts of unequal lengths is padded on the left and carries an attention
mask [B, S]. Pad keys are masked out of every real token's attention, and positions count real
tokens only, so each row generates what it would alone (a pad query attends to itself only, which
keeps its softmax finite; nothing real reads it).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Protocol, Union

import torch

from workbench.errors import InputError

GenerateReturn = Literal["input", "str", "tokens"]


class GeneratesText(Protocol):
    """What `generate` asks of a model: the workbench `Transformer` (which imports this module)."""

    cfg: Any
    tokenizer: Any
    W_E: torch.Tensor

    def __call__(self, tokens: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                 past_kv_cache: Optional["KVCache"] = None) -> torch.Tensor: ...

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def to_tokens(self, input: str, prepend_bos: Optional[bool] = None) -> torch.Tensor: ...


# -- the cache ------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for the positions run so far, with which of them are real.

    `Transformer.forward(tokens, past_kv_cache=cache)` runs the new positions only, attending to all
    the cached ones, and appends them. Capacity defaults to the model's n_ctx; the buffers are made
    on first use, in the dtype and on the device of the keys."""

    def __init__(self, cfg: Any, batch_size: int, capacity: Optional[int] = None, keep_weights: bool = False):
        capacity = cfg.n_ctx if capacity is None else capacity
        if not 0 < capacity <= cfg.n_ctx:
            raise InputError(f"A KV cache holds 1 to n_ctx={cfg.n_ctx} positions, not {capacity}.")
        self.batch_size, self.capacity = batch_size, capacity
        self.keep_weights = keep_weights
        """Whether each layer's fused Q/K/V weights are read once, for the cache's life (as in one
        `generate` call, under no_grad), instead of on every forward pass."""
        self.layers = [KVCacheEntry(self) for _ in range(cfg.n_layers)]
        self.length = 0
        """Positions held (committed by the forward pass that ran them)."""
        self.padded = False
        """Whether any position held is padding (then masks and positions are per row)."""
        self.real_BC: Optional[torch.Tensor] = None  # which held positions are real tokens, once padded
        self.next_pos_B: Optional[torch.Tensor] = None  # each row's next real position, once padded
        self._next_pos_B: Optional[torch.Tensor] = None
        self.mask_B1ST: Optional[torch.Tensor] = None
        """This forward pass's attention mask (True: attend), or None where plain causal attention fits:
        S == T (from an empty cache) or S == 1 (one new token sees every held one)."""
        self._new = 0

    def begin(self, tokens_BS: torch.Tensor, attention_mask_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Make room for S new positions (real unless the mask says 0) and set this pass's attention
        mask; returns their positions [B, S] for the positional embedding."""
        B, S = tokens_BS.shape
        start, end = self.length, self.length + S
        if B != self.batch_size:
            raise InputError(f"This KV cache holds a batch of {self.batch_size}, not {B}; make one per batch.")
        if end > self.capacity:
            raise InputError(f"The KV cache holds {self.capacity} positions; {start} are used, and {S} more do not "
                             "fit. Make a larger cache (at most n_ctx), or start again with a shorter input.")
        device = tokens_BS.device
        real_BS = None
        if attention_mask_BS is not None and attention_mask_BS.ndim == 1:
            attention_mask_BS = attention_mask_BS[None]  # one row, as the tokens [S] become [1, S]
        if attention_mask_BS is not None:
            if attention_mask_BS.shape != tokens_BS.shape:
                raise InputError(f"attention_mask has shape {tuple(attention_mask_BS.shape)}; it must match the "
                                 f"tokens, {tuple(tokens_BS.shape)} (1 for a real token, 0 for padding).")
            real_BS = attention_mask_BS.to(device=device, dtype=torch.bool)
            if not self.padded and not bool(real_BS.all()):
                self.padded = True
                self.real_BC = torch.ones(B, self.capacity, dtype=torch.bool, device=device)
                self.next_pos_B = torch.full((B,), start, dtype=torch.long, device=device)
        q_S1 = torch.arange(start, end, device=device)[:, None]
        if not self.padded:
            self.mask_B1ST = None if start == 0 or S == 1 else (torch.arange(end, device=device) <= q_S1)[None, None]
            positions_BS = q_S1.T.expand(B, S)
        else:
            assert self.real_BC is not None and self.next_pos_B is not None
            real_BS = torch.ones_like(tokens_BS, dtype=torch.bool) if real_BS is None else real_BS
            self.real_BC[:, start:end] = real_BS
            positions_BS = (self.next_pos_B[:, None] + real_BS.cumsum(1) - 1).clamp_min(0)
            self._next_pos_B = self.next_pos_B + real_BS.sum(1)
            k_1T = torch.arange(end, device=device)[None]
            allowed_BST = ((k_1T <= q_S1)[None] & self.real_BC[:, None, :end]) | (k_1T == q_S1)[None]
            self.mask_B1ST = allowed_BST[:, None]
        self._new = S
        return positions_BS

    def commit(self) -> None:
        """The forward pass finished: the new positions are held from now on (a pass that raised
        leaves the cache as it was)."""
        self.length += self._new
        self._new = 0
        if self.padded:
            self.next_pos_B = self._next_pos_B


class KVCacheEntry:
    """One layer's keys and values, [B, H, C, K] each, filled up to the cache's length."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.k_BHCK: Optional[torch.Tensor] = None
        self.v_BHCK: Optional[torch.Tensor] = None
        self._qkv: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def qkv_weights(self, attn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's fused Q/K/V weight and bias (`Attention.qkv_weights`): made once for the cache's life
        when it keeps weights (`generate`'s does: 1.46x the tokens/s at batch 1 on attn-only-2l, 1.22x
        at batch 16), else on every call."""
        if not self.cache.keep_weights:
            return attn.qkv_weights()
        if self._qkv is None:
            self._qkv = attn.qkv_weights()
        return self._qkv

    @property
    def mask_B1ST(self) -> Optional[torch.Tensor]:
        """The attention mask of the pass under way (see KVCache.mask_B1ST)."""
        return self.cache.mask_B1ST

    def append(self, k_BSHK: torch.Tensor, v_BSHK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values after the held ones; returns all of them, [B, T, H, K] views."""
        B, S, H, K = k_BSHK.shape
        if self.k_BHCK is None or self.k_BHCK.dtype != k_BSHK.dtype or self.k_BHCK.device != k_BSHK.device:
            if self.cache.length:
                raise InputError("The KV cache was filled in another dtype or on another device; make a new one.")
            self.k_BHCK = k_BSHK.new_empty(B, H, self.cache.capacity, K)
            self.v_BHCK = v_BSHK.new_empty(B, H, self.cache.capacity, K)
        assert self.v_BHCK is not None
        start, end = self.cache.length, self.cache.length + S
        self.k_BHCK[:, :, start:end] = k_BSHK.transpose(1, 2)
        self.v_BHCK[:, :, start:end] = v_BSHK.transpose(1, 2)
        return self.k_BHCK[:, :, :end].transpose(1, 2), self.v_BHCK[:, :, :end].transpose(1, 2)


# -- sampling -------------------------------------------------------------------------------------
def sample_logits(logits_BV: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0, tokens_BN: Optional[torch.Tensor] = None,
                  real_BN: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None
                  ) -> torch.Tensor:
    """The next token of each row [B], as TransformerLens's `sample_logits` picks it: temperature 0 is
    greedy; otherwise the logits are divided by the temperature, lowered by `freq_penalty` times each
    token's count in `tokens_BN` (its real positions `real_BN` only, when given), cut to the `top_k`
    most likely tokens and then to the smallest set holding `top_p` of the probability (TransformerLens
    ignores top_p when top_k is given; here both apply, as in Hugging Face), and sampled with
    `generator` (the global RNG when None)."""
    if temperature == 0.0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() if temperature == 1.0 else logits_BV.float() / temperature
    if freq_penalty > 0:
        if tokens_BN is None:
            raise InputError("freq_penalty needs the tokens so far (tokens_BN) to count.")
        real_BN = torch.ones_like(tokens_BN, dtype=torch.bool) if real_BN is None else real_BN
        counts_BV = torch.zeros_like(logits_BV).scatter_add_(1, tokens_BN, real_BN.to(logits_BV.dtype))
        logits_BV = logits_BV - freq_penalty * counts_BV
    if top_k is not None:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        cut_BV = probs_BV.cumsum(-1) - probs_BV > top_p  # the more likely tokens already hold top_p
        logits_BV = logits_BV.masked_fill(cut_BV.scatter(-1, order_BV, cut_BV), float("-inf"))
    # multinomial with replacement, as torch.distributions.Categorical.sample draws it
    return torch.multinomial(logits_BV.softmax(-1), 1, replacement=True, generator=generator)[:, 0]


# -- the loop -------------------------------------------------------------------------------------
def generate(self: GeneratesText, input: Union[str, list[str], torch.Tensor] = "", max_new_tokens: int = 10,
             stop_at_eos: bool = True, eos_token_id: Optional[Union[int, list[int]]] = None, do_sample: bool = True,
             top_k: Optional[int] = None, top_p: Optional[float] = None, temperature: float = 1.0,
             freq_penalty: float = 0.0, use_past_kv_cache: bool = True, prepend_bos: Optional[bool] = None,
             padding_side: Optional[Literal["left", "right"]] = None, return_type: GenerateReturn = "input",
             verbose: bool = True, *, attention_mask: Optional[torch.Tensor] = None, seed: Optional[int] = None
             ) -> Union[str, list[str], torch.Tensor]:
    """Sample up to `max_new_tokens` tokens after each prompt (TransformerLens's `generate`).

    `input` is a string, a list of strings (padded on the left, with an attention mask) or token ids
    [B, S] (with `attention_mask` [B, S] if they are padded). `return_type` 'input' gives back what
    came in (a string, a list of strings, or tokens [B, N]); 'str' and 'tokens' choose. Text comes back
    as TransformerLens returns it: one string for one row, without special tokens (padding, BOS, end of
    text); an empty string starts from the BOS (<|endoftext|>).
    Hooks attached to the model fire on every step. A row stops after a stop token (`eos_token_id`,
    else the tokenizer's end-of-text; with neither, nothing stops it early) and is filled with that
    token until every row has stopped. `seed` samples with a generator of its own; without it,
    `torch.manual_seed` before the call fixes the text. Prompt plus new tokens must fit in n_ctx."""
    _check_arguments(max_new_tokens, top_k, top_p, temperature, freq_penalty, padding_side, return_type)
    if return_type == "str" and self.tokenizer is None:
        raise InputError("This model has no tokenizer to decode with; ask for return_type='tokens'.")
    tokens_BS, mask_BS, bos_B = _prompt(self, input, prepend_bos, attention_mask)
    B, S = tokens_BS.shape
    if S + max_new_tokens > self.cfg.n_ctx:
        raise InputError(f"The prompt has {S} tokens and max_new_tokens={max_new_tokens}: {S + max_new_tokens} "
                         f"positions exceed the model's n_ctx={self.cfg.n_ctx}. Ask for at most "
                         f"{max(self.cfg.n_ctx - S, 0)} new tokens, or shorten the prompt.")
    stops = _stop_tokens(self, stop_at_eos, eos_token_id)
    device = tokens_BS.device
    out_BN = torch.empty(B, S + max_new_tokens, dtype=torch.long, device=device)
    out_BN[:, :S] = tokens_BS
    real_BN = None
    if mask_BS is not None:
        real_BN = torch.ones(B, S + max_new_tokens, dtype=torch.bool, device=device)
        real_BN[:, :S] = mask_BS
    stops_t = torch.tensor(stops, dtype=torch.long, device=device)
    finished_B = torch.zeros(B, dtype=torch.bool, device=device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(self.cfg, B, S + max_new_tokens, keep_weights=True) if use_past_kv_cache and max_new_tokens \
        else None
    n = S
    with torch.no_grad():
        for step in _progress(max_new_tokens, verbose):
            one = cache is not None and step > 0  # with the cache: the prompt once, then the last token only
            mask_BS = None if one or real_BN is None else real_BN[:, :n]
            logits_BV = self(out_BN[:, n - 1:n] if one else out_BN[:, :n], attention_mask=mask_BS,
                             past_kv_cache=cache)[:, -1]
            if do_sample:
                next_B = sample_logits(logits_BV, top_k, top_p, temperature, freq_penalty, out_BN[:, :n],
                                       None if real_BN is None else real_BN[:, :n], generator)
            else:
                next_B = logits_BV.argmax(-1)
            if stops:
                next_B = next_B.masked_fill(finished_B, stops[0])
                finished_B |= torch.isin(next_B, stops_t)
            out_BN[:, n] = next_B
            n += 1
            if stops and bool(finished_B.all()):
                break
    out_BN = out_BN[:, :n]
    if return_type == "tokens" or (return_type == "input" and isinstance(input, torch.Tensor)):
        return out_BN
    texts = _decode(self, out_BN, None if real_BN is None else real_BN[:, :n], S, bos_B, stops)
    return texts[0] if isinstance(input, str) or len(texts) == 1 else texts  # as TransformerLens returns text


def _check_arguments(max_new_tokens: Any, top_k: Any, top_p: Any, temperature: Any, freq_penalty: Any,
                     padding_side: Any, return_type: Any) -> None:
    checks = [
        (isinstance(max_new_tokens, int) and max_new_tokens >= 0, "max_new_tokens", max_new_tokens,
         "an integer ≥ 0"),
        (top_k is None or (isinstance(top_k, int) and top_k > 0), "top_k", top_k, "a positive integer or None"),
        (top_p is None or 0 < top_p <= 1, "top_p", top_p, "in (0, 1] or None"),
        (temperature >= 0, "temperature", temperature, "≥ 0 (0 is greedy)"),
        (freq_penalty >= 0, "freq_penalty", freq_penalty, "≥ 0"),
        (return_type in ("input", "str", "tokens"), "return_type", return_type, "'input', 'str' or 'tokens'"),
        (padding_side in (None, "left"), "padding_side", padding_side,
         "'left' or None: generation pads prompts on the left, so that each row's last token is real"),
    ]
    for ok, name, value, expected in checks:
        if not ok:
            raise InputError(f"generate: {name} must be {expected}, got {value!r}.")


def _prompt(model: GeneratesText, input: Any, prepend_bos: Optional[bool], attention_mask: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[bool]]:
    """Prompt tokens [B, S] on the model's device, their mask [B, S] (None when no row is padded), and
    whether each row starts with a BOS that was not in its text."""
    device = model.W_E.device
    if isinstance(input, torch.Tensor):
        tokens_BS = model.check_tokens(input.to(device))
        if attention_mask is not None:
            mask_BS = attention_mask.to(device=device, dtype=torch.bool)
            mask_BS = mask_BS[None] if mask_BS.ndim == 1 else mask_BS
            if mask_BS.shape != tokens_BS.shape:
                raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must match the "
                                 f"tokens, {tuple(tokens_BS.shape)}.")
            if not bool(mask_BS[:, -1].all()):
                raise InputError("attention_mask: a row ends in padding. generate continues each row from its last "
                                 "token, so pad prompts on the left.")
            return tokens_BS, (None if bool(mask_BS.all()) else mask_BS), [False] * len(tokens_BS)
        return tokens_BS, None, [False] * len(tokens_BS)
    if attention_mask is not None:
        raise InputError("attention_mask goes with token ids; strings are padded and masked by generate itself.")
    texts = [input] if isinstance(input, str) else input
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InputError(f"generate takes a string, a non-empty list of strings, or token ids [batch, pos]; got "
                         f"{type(input).__name__}.")
    if model.tokenizer is None:
        raise InputError("This model has no tokenizer, so it cannot read text; pass token ids [batch, pos] instead "
                         "(and decode the output yourself).")
    # One prompt at a time, so that each row's real length is known; then padded on the left here. An
    # empty prompt starts from the BOS (<|endoftext|>, where the training documents begin), as with
    # TransformerLens's defaults.
    bos = bool(model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos)
    with_bos = [bos or not t for t in texts]
    if any(not t for t in texts) and getattr(model.tokenizer, "bos_token_id", None) is None:
        raise InputError("An empty prompt starts from the BOS token, and this model's tokenizer has none; "
                         "give each prompt at least one token.")
    rows = [model.to_tokens(t, prepend_bos=b)[0] for t, b in zip(texts, with_bos)]
    S = max(len(r) for r in rows)
    pad = _eos_of(model.tokenizer)
    tokens_BS = torch.full((len(rows), S), 0 if pad is None else pad, dtype=torch.long, device=device)
    mask_BS = torch.zeros(len(rows), S, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        tokens_BS[i, S - len(row):] = row
        mask_BS[i, S - len(row):] = True
    return tokens_BS, (None if bool(mask_BS.all()) else mask_BS), with_bos


def _eos_of(tokenizer: Any) -> Optional[int]:
    """The end-of-text id of a workbench (`TextCodec`) or Hugging Face tokenizer; None if it has none."""
    return None if tokenizer is None else tokenizer.eos_token_id


def _stop_tokens(model: GeneratesText, stop_at_eos: bool, eos_token_id: Any) -> list[int]:
    if not stop_at_eos:
        return []
    if eos_token_id is None:
        eos = _eos_of(model.tokenizer)
        return [] if eos is None else [eos]
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and 0 <= i < model.cfg.d_vocab for i in ids):
        raise InputError(f"eos_token_id must be a token id or a list of them in [0, {model.cfg.d_vocab}); "
                         f"got {eos_token_id!r}.")
    return ids


def _progress(n: int, verbose: bool) -> Any:
    if not verbose:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc="generate", unit="tok")


def _decode(model: GeneratesText, out_BN: torch.Tensor, real_BN: Optional[torch.Tensor], S: int,
            bos_B: list[bool], stops: list[int]) -> list[str]:
    """Each row as text: its real tokens up to its stop token, without special tokens (BOS, end of text,
    padding), as TransformerLens decodes (`skip_special_tokens=True`)."""
    if model.tokenizer is None:
        raise InputError("This model has no tokenizer to decode with; ask for return_type='tokens'.")
    tok = model.tokenizer
    special = {getattr(tok, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    real = None if real_BN is None else real_BN.tolist()
    texts = []
    for i, row in enumerate(out_BN.tolist()):
        end = next((j + 1 for j in range(S, len(row)) if row[j] in stops), len(row))
        ids = [t for j, t in enumerate(row[:end]) if real is None or real[i][j]]
        ids = ids[1:] if bos_B[i] else ids
        texts.append(tok.decode([t for t in ids if t not in special]))
    return texts
