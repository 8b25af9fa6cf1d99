"""The hookable Transformer: a GPT-style decoder with TransformerLens hook names and weight layout.

Shape letters, used in names and comments throughout the workbench:
    B batch, S query position, T key position, D d_model, H heads, K d_head,
    M d_mlp, V d_vocab, L layers.

Every activation passes through a `HookPoint`, so `run_with_cache`, `run_with_hooks` and
`hooks()` from `transformer_lens.HookedRootModule` work unchanged. Weights are stored per layer
in TransformerLens's layout (`blocks.{l}.attn.W_Q` is [H, D, K]) and stacked on the model
(`model.W_Q` is [L, H, D, K]), so `FactoredMatrix` and TL-style analysis code work on it.

Speed: the attention pattern is only materialised when a hook on `hook_attn_scores` or
`hook_pattern` asks for it, or under bf16 on a CPU (where that is faster); otherwise attention runs
through `scaled_dot_product_attention`. Q, K and V come from one fused matmul, and a read-only hook
on a LayerNorm scale keeps the fused LayerNorm kernel.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from workbench.config import check_types, from_dict
from workbench.errors import HookNameError, InputError, check_field, unknown_name_message
from workbench.model.generation import KVCache, KVCacheEntry, generate
from workbench.model.lens_surface import HeadCircuits, LensConfig, LensSurface

ReturnType = Optional[Literal["logits", "loss", "both"]]  # None: run for the hooks only (TransformerLens's)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a workbench Transformer. Field names follow TransformerLens's config."""

    n_layers: int = 2
    """Number of transformer blocks (1 to 48)."""
    d_model: int = 64
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads per layer."""
    d_head: int = 16
    """Width of each head's query, key and value."""
    d_mlp: Optional[int] = None
    """Hidden width of the MLPs; None makes the model attention-only."""
    act_fn: Literal["gelu", "relu"] = "gelu"
    """MLP non-linearity."""
    normalization_type: Optional[Literal["LN"]] = "LN"
    """'LN' for LayerNorm before each sublayer and the unembedding, None for no normalisation."""
    n_ctx: int = 128
    """Longest sequence the model accepts (the learned positional embedding has n_ctx rows)."""
    d_vocab: int = 257
    """Vocabulary size."""
    init_range: Optional[float] = None
    """Std of the normal weight init; None means 0.8 / sqrt(d_model), TransformerLens's default."""
    seed: int = 0
    """Seed of the weight init (its own torch.Generator; the global RNG is left alone)."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "ModelConfig"
        check_field(isinstance(self.n_layers, int) and 1 <= self.n_layers <= 48, own, "n_layers",
                    self.n_layers, "an integer from 1 to 48")
        for name in ("d_model", "n_heads", "d_head", "n_ctx", "d_vocab"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        check_field(self.d_mlp is None or (isinstance(self.d_mlp, int) and self.d_mlp > 0), own,
                    "d_mlp", self.d_mlp, "a positive integer, or None for an attention-only model")
        check_field(self.act_fn in ("gelu", "relu"), own, "act_fn", self.act_fn, "'gelu' or 'relu'")
        check_field(self.normalization_type in ("LN", None), own, "normalization_type",
                    self.normalization_type, "'LN' or None")
        check_field(self.init_range is None or self.init_range > 0, own, "init_range",
                    self.init_range, "a positive float or None")
        check_field(self.seed >= 0, own, "seed", self.seed, "an integer ≥ 0")

    @property
    def attn_only(self) -> bool:
        """True when the model has no MLPs."""
        return self.d_mlp is None

    @property
    def initializer_range(self) -> float:
        """The init std actually used."""
        return self.init_range if self.init_range is not None else 0.8 / math.sqrt(self.d_model)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "ModelConfig":
        """Build from parsed JSON, naming any key that is not a field or value of the wrong type."""
        return from_dict(cls, data, where)


class BoundConfig(LensConfig, ModelConfig):
    """The config a `Transformer` holds as `model.cfg`: the ModelConfig's fields (so the same `to_dict`,
    and equal to it), bound to the model so that it also answers what TransformerLens code reads
    (`device`, `default_prepend_bos`, ...: `workbench.model.lens_surface.LensConfig`)."""


def _hooked(hook: HookPoint) -> bool:
    """Whether any forward or backward hook is attached to `hook` (so its value must exist)."""
    return bool(hook.fwd_hooks or hook.bwd_hooks)


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens's hooks: hook_scale [B, S, 1] and hook_normalized [B, S, D]."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()  # [B, S, 1]
        self.hook_normalized = HookPoint()  # [B, S, D]

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if not _hooked(self.hook_scale):
            return self.hook_normalized(self._fused(x_BSD))
        if not self.hook_scale.bwd_hooks:
            # When the scale is only read (run_with_cache), keep the fused kernel: the hook gets the
            # scale, and unless it returns another tensor (an edit, or a detached copy that freezes
            # it) or changes its values (checked by value, so edits through .data count too), the
            # fused output is the same number.
            if torch.is_grad_enabled() and x_BSD.requires_grad:  # a scale with a gradient, as the hook may use it
                out_BSD = None
                var_BS1, _ = torch.var_mean(x_BSD, -1, correction=0, keepdim=True)
                given_BS1 = (var_BS1 + self.eps).sqrt()
            else:  # the fused kernel's own 1/scale: no extra pass over x (measured 3 ms per call at 16×256×256)
                out_BSD, _, rstd_BS1 = torch.native_layer_norm(x_BSD, x_BSD.shape[-1:], self.w, self.b, self.eps)
                given_BS1 = rstd_BS1.reciprocal()
            kept_BS1 = given_BS1.clone()
            scale_BS1 = self.hook_scale(given_BS1)
            if scale_BS1 is given_BS1 and torch.equal(scale_BS1, kept_BS1):
                return self.hook_normalized(self._fused(x_BSD) if out_BSD is None else out_BSD)
        else:  # a backward hook needs the gradient to flow through the scale
            scale_BS1 = self.hook_scale((x_BSD.var(-1, correction=0, keepdim=True) + self.eps).sqrt())
        x_BSD = x_BSD - x_BSD.mean(-1, keepdim=True)
        return self.hook_normalized(x_BSD / scale_BS1 * self.w + self.b)

    def _fused(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_BSD, x_BSD.shape[-1:], self.w, self.b, self.eps)


def _causal_bias(S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[S, S]: 0 on and below the diagonal, -inf above it (added to the attention scores); made once
    per shape, except inside torch.compile, which folds it into the graph."""
    if torch.compiler.is_compiling():
        return torch.full((S, S), float("-inf"), dtype=dtype, device=device).triu(1)
    return _cached_causal_bias(S, dtype, device)


@functools.lru_cache(maxsize=8)
def _cached_causal_bias(S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((S, S), float("-inf"), dtype=dtype, device=device).triu(1)


class Attention(HeadCircuits, nn.Module):
    """Causal multi-head attention with weights in TransformerLens's per-head layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, K = cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.W_Q = nn.Parameter(torch.empty(H, D, K))
        self.W_K = nn.Parameter(torch.empty(H, D, K))
        self.W_V = nn.Parameter(torch.empty(H, D, K))
        self.W_O = nn.Parameter(torch.empty(H, K, D))
        self.b_Q = nn.Parameter(torch.zeros(H, K))
        self.b_K = nn.Parameter(torch.zeros(H, K))
        self.b_V = nn.Parameter(torch.zeros(H, K))
        self.b_O = nn.Parameter(torch.zeros(D))
        self.hook_q = HookPoint()  # [B, S, H, K]
        self.hook_k = HookPoint()  # [B, T, H, K]
        self.hook_v = HookPoint()  # [B, T, H, K]
        self.hook_attn_scores = HookPoint()  # [B, H, S, T], -inf above the diagonal
        self.hook_pattern = HookPoint()  # [B, H, S, T]
        self.hook_z = HookPoint()  # [B, S, H, K]

    def forward(self, x_BSD: torch.Tensor, kv: Optional[KVCacheEntry] = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, K = self.cfg.n_heads, self.cfg.d_head
        W_D3HK, b_3HK = self.qkv_weights() if kv is None else kv.qkv_weights(self)  # the cache keeps them
        qkv_BS3HK = torch.addmm(b_3HK, x_BSD.reshape(B * S, -1), W_D3HK).view(B, S, 3, H, K)
        q_BSHK, k_BTHK, v_BTHK = qkv_BS3HK.unbind(2)  # one stack in backward, not three zero-fills
        q_BSHK, k_BTHK, v_BTHK = self.hook_q(q_BSHK), self.hook_k(k_BTHK), self.hook_v(v_BTHK)
        mask_B1ST = None  # None: causal, with S == T (or one query, which sees every key)
        if kv is not None:  # generation: attend to the cached positions too (model/generation.py)
            k_BTHK, v_BTHK = kv.append(k_BTHK, v_BTHK)
            mask_B1ST = kv.mask_B1ST
        if _hooked(self.hook_attn_scores) or _hooked(self.hook_pattern) or _materialise_on(q_BSHK):
            z_BSHK = self._attend_materialised(q_BSHK, k_BTHK, v_BTHK, mask_B1ST)
        else:
            z_BHSK = F.scaled_dot_product_attention(
                q_BSHK.transpose(1, 2), k_BTHK.transpose(1, 2), v_BTHK.transpose(1, 2), attn_mask=mask_B1ST,
                is_causal=mask_B1ST is None and S > 1
            )
            z_BSHK = z_BHSK.transpose(1, 2)
        z_BSHK = self.hook_z(z_BSHK)
        out_BD = torch.addmm(self.b_O, z_BSHK.reshape(B * S, H * K), self.W_O.reshape(H * K, -1))
        return out_BD.view(B, S, -1)

    def qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_Q, W_K, W_V as one [D, 3HK] matrix and their biases [3HK], for one matmul instead of three
        einsums; the re-layout is tiny next to the activations (3·D·H·K numbers against B·S·3·H·K)."""
        H, K = self.cfg.n_heads, self.cfg.d_head
        W_D3HK = torch.stack((self.W_Q, self.W_K, self.W_V)).permute(2, 0, 1, 3).reshape(-1, 3 * H * K)
        return W_D3HK, torch.stack((self.b_Q, self.b_K, self.b_V)).reshape(3 * H * K)

    def _attend_materialised(self, q_BSHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHK: torch.Tensor,
                             mask_B1ST: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention through an explicit pattern, which is also what the output is computed from, so
        any edit of it through hook_pattern (or hook_attn_scores) takes effect. Scaling and the causal
        mask happen inside one baddbmm; the softmax is taken in fp32 when the scores are bf16/fp16.
        (Measured: once the pattern exists, pattern @ V is cheaper on CPU than a second, fused
        attention pass, so a read-only pattern hook gains nothing from keeping the fused kernel.)"""
        B, S, H, K = q_BSHK.shape
        T = k_BTHK.shape[1]
        q_XSK = q_BSHK.transpose(1, 2).reshape(B * H, S, K)
        k_XKT = k_BTHK.permute(0, 2, 3, 1).reshape(B * H, K, T)
        if mask_B1ST is None:  # [S, S], or [1, 1] for one query
            bias = _causal_bias(S, q_XSK.dtype, q_XSK.device)
        else:
            bias = torch.zeros((), dtype=q_XSK.dtype, device=q_XSK.device).masked_fill(~mask_B1ST, float("-inf"))
            bias = bias.expand(B, H, S, T).reshape(B * H, S, T)
        scores_XST = torch.baddbmm(bias, q_XSK, k_XKT, alpha=1 / math.sqrt(K))
        scores_BHST = self.hook_attn_scores(scores_XST.view(B, H, S, T))
        low = scores_BHST.dtype in (torch.bfloat16, torch.float16)
        pattern_BHST = self.hook_pattern(scores_BHST.softmax(-1, dtype=torch.float32 if low else None))
        v_XTK = v_BTHK.transpose(1, 2).reshape(B * H, T, K)
        z_XSK = torch.bmm(pattern_BHST.to(v_BTHK.dtype).reshape(B * H, S, T), v_XTK)  # reshape: a view here
        return z_XSK.view(B, H, S, K).transpose(1, 2)


def _materialise_on(q_BSHK: torch.Tensor) -> bool:
    """Whether unhooked attention also takes the materialised path: bf16 on CPU, where the fused
    kernel's backward is the slow part (measured on the 2-core development machine: 45 ms against
    26 ms forward + backward for one layer at batch 16 × 256, 8 heads of 32; the whole-step effect
    is in benchmarks/train_speed.py)."""
    return q_BSHK.dtype == torch.bfloat16 and q_BSHK.device.type == "cpu"


class MLP(nn.Module):
    """Two-layer MLP: hook_pre [B, S, M] before the non-linearity, hook_post [B, S, M] after."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.d_mlp is not None
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = F.gelu if cfg.act_fn == "gelu" else F.relu
        self.hook_pre = HookPoint()  # [B, S, M]
        self.hook_post = HookPoint()  # [B, S, M]

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        pre_BSM = self.hook_pre(x_BSD @ self.W_in + self.b_in)
        post_BSM = self.hook_post(self.act(pre_BSM))
        return post_BSM @ self.W_out + self.b_out


class TransformerBlock(nn.Module):
    """Pre-norm block. Attention-only blocks have no hook_resid_mid, as in TransformerLens."""

    hook_out_is_single_residual_stream = True  # TransformerLens 4's logit lens asks: the output is the one stream

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model) if cfg.normalization_type == "LN" else nn.Identity()
        self.attn = Attention(cfg)
        self.hook_resid_pre = HookPoint()  # [B, S, D]
        self.hook_attn_out = HookPoint()  # [B, S, D]
        if not cfg.attn_only:
            self.ln2 = LayerNorm(cfg.d_model) if cfg.normalization_type == "LN" else nn.Identity()
            self.mlp = MLP(cfg)
            self.hook_resid_mid = HookPoint()  # [B, S, D]
            self.hook_mlp_out = HookPoint()  # [B, S, D]
        self.hook_resid_post = HookPoint()  # [B, S, D]

    def forward(self, resid_BSD: torch.Tensor, kv: Optional[KVCacheEntry] = None) -> torch.Tensor:
        resid_BSD = self.hook_resid_pre(resid_BSD)
        resid_BSD = resid_BSD + self.hook_attn_out(self.attn(self.ln1(resid_BSD), kv))
        if hasattr(self, "mlp"):
            resid_BSD = self.hook_resid_mid(resid_BSD)
            resid_BSD = resid_BSD + self.hook_mlp_out(self.mlp(self.ln2(resid_BSD)))
        return self.hook_resid_post(resid_BSD)


class Embed(nn.Module):
    """Token embedding W_E [V, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens_BS, self.W_E)


class PosEmbed(nn.Module):
    """Learned positional embedding W_pos [n_ctx, D], broadcast over the batch (or at positions [B, S])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))

    def forward(self, tokens_BS: torch.Tensor, positions_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S = tokens_BS.shape
        return self.W_pos[:S].expand(B, S, -1) if positions_BS is None else F.embedding(positions_BS, self.W_pos)


class Unembed(nn.Module):
    """Unembedding W_U [D, V] and b_U [V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return x_BSD @ self.W_U + self.b_U


class Transformer(LensSurface, HookedRootModule):
    """A hookable decoder-only Transformer; see the module docstring for names and shapes, and
    `workbench.model.lens_surface` for the TransformerLens surface (tokens, weights, the cache)."""

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = BoundConfig.bind(cfg, self)
        self.tokenizer = tokenizer
        self.folder: Optional[Path] = None  # the model folder it was loaded from, if any
        self.meta: dict[str, Any] = {}  # that folder's config.json (training config, step, ...)
        cfg = self.cfg  # every part holds the one config, bound to this model
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()  # [B, S, D]
        self.pos_embed = PosEmbed(cfg)
        self.hook_pos_embed = HookPoint()  # [B, S, D]
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model) if cfg.normalization_type == "LN" else nn.Identity()
        self.unembed = Unembed(cfg)
        self.init_weights()
        self.setup()

    # -- construction -------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit LayerNorm, from cfg.seed."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        std = self.cfg.initializer_range
        with torch.no_grad():
            for name, param in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf.startswith("W_"):
                    param.copy_(torch.randn(param.shape, generator=gen) * std)
                elif leaf == "w":
                    param.fill_(1.0)
                else:
                    param.zero_()

    # -- hooks --------------------------------------------------------------------------------
    @contextmanager
    def hooks(self, fwd_hooks=[], bwd_hooks=[], reset_hooks_end=True, clear_contexts=False):  # noqa: B006 (TL signature)
        """TransformerLens's hooks() context manager; an unknown hook name is an error up front."""
        for name, _ in [*fwd_hooks, *bwd_hooks]:
            self.check_hook_name(name)
        with super().hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as model:
            yield model

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False):
        """TransformerLens's add_hook, with a helpful error for an unknown hook name."""
        self.check_hook_name(name)
        return super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level,
                                prepend=prepend)

    def check_hook_name(self, name: Any) -> None:
        """Raise HookNameError, suggesting the nearest valid names, if `name` is not a hook."""
        if isinstance(name, str) and name not in self.hook_dict:
            raise HookNameError(unknown_name_message("hook name", name, self.hook_dict,
                                                     listed_by="`workbench info <model>`"))

    def run_with_cache(self, *args: Any, names_filter: Any = None, **kwargs: Any):
        """TransformerLens's run_with_cache; a listed hook name that does not exist is an error."""
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if isinstance(names, (list, tuple)):
            for name in names:
                self.check_hook_name(name)
            names_filter = list(names)
        return super().run_with_cache(*args, names_filter=names_filter, **kwargs)

    # -- forward ------------------------------------------------------------------------------
    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validate token ids [B, S] (or [S], or text, which to_tokens reads) and return them as a [B, S] long
        tensor."""
        if isinstance(tokens, str) or (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
            tokens = self.to_tokens(tokens)  # text, as TransformerLens's forward takes it
        if not isinstance(tokens, torch.Tensor):
            raise InputError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}; "
                             "use model.to_tokens(text) for strings.")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise InputError(f"tokens must have shape [batch, pos], got {tuple(tokens.shape)}.")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise InputError(f"Sequence length {tokens.shape[1]} exceeds n_ctx={self.cfg.n_ctx}; "
                             f"truncate to at most {self.cfg.n_ctx} tokens or split the sequence.")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.d_vocab):
            raise InputError(f"Token ids must lie in [0, {self.cfg.d_vocab}) for d_vocab="
                             f"{self.cfg.d_vocab}; got ids from {int(tokens.min())} to {int(tokens.max())}. "
                             "Was the input made by another tokenizer?")
        return tokens.long()

    def forward(self, tokens: torch.Tensor, return_type: ReturnType = "logits", *,
                attention_mask: Optional[torch.Tensor] = None, past_kv_cache: Optional[KVCache] = None,
                start_at_layer: Optional[int] = None, stop_at_layer: Optional[int] = None):
        """tokens [B, S] -> logits [B, S, V], mean next-token loss [], or (logits, loss). The tokens follow
        those `past_kv_cache` holds, if given; `attention_mask` [B, S] is 0 on (left) padding.

        As in TransformerLens: with `start_at_layer` l, `tokens` is the residual stream [B, S, D]
        entering block l (blocks.l.hook_resid_pre); with `stop_at_layer` l, the run stops before
        block l and returns the residual stream there (l = n_layers: after the last block, before
        ln_final). Neither goes with a KV cache, a mask or a loss."""
        if return_type not in ("logits", "loss", "both", None):
            raise InputError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}.")
        if attention_mask is not None and return_type in ("loss", "both"):
            raise InputError("No loss with an attention_mask: padded positions have no next token to predict. "
                             "Ask for return_type='logits' and score the real positions yourself.")
        L = self.cfg.n_layers
        if start_at_layer is not None or stop_at_layer is not None:
            start, stop = start_at_layer or 0, L if stop_at_layer is None else stop_at_layer
            if not (0 <= start <= stop <= L):
                raise InputError(f"Need 0 <= start_at_layer <= stop_at_layer <= n_layers = {L}; got "
                                 f"{start_at_layer} and {stop_at_layer}.")
            if attention_mask is not None or past_kv_cache is not None or (
                    start_at_layer is not None and return_type in ("loss", "both")):
                raise InputError("start_at_layer and stop_at_layer go without attention_mask, past_kv_cache and, "
                                 "with start_at_layer, without a loss (there are no tokens to predict).")
        if start_at_layer is None:
            tokens_BS = self.check_tokens(tokens)
            if attention_mask is not None and past_kv_cache is None and bool(attention_mask.bool().all()):
                attention_mask = None  # nothing is padded: the plain causal forward
            kv = past_kv_cache
            if kv is None and attention_mask is not None:  # padded rows: masks and positions as with a cache
                kv = KVCache(self.cfg, *tokens_BS.shape)
            pos_BS = None if kv is None else kv.begin(tokens_BS, attention_mask)  # [B, S] positions, per row if padded
            resid_BSD = self.hook_embed(self.embed(tokens_BS)) + self.hook_pos_embed(self.pos_embed(tokens_BS, pos_BS))
        else:
            if tokens.ndim != 3 or tokens.shape[-1] != self.cfg.d_model or not tokens.is_floating_point():
                raise InputError(f"With start_at_layer the input is the residual stream [batch, seq, "
                                 f"{self.cfg.d_model}]; got {tuple(tokens.shape)} of {tokens.dtype}.")
            resid_BSD, kv, tokens_BS = tokens, None, None
        for i in range(start_at_layer or 0, L if stop_at_layer is None else stop_at_layer):
            resid_BSD = self.blocks[i](resid_BSD, None if kv is None else kv.layers[i])
        if stop_at_layer is not None:
            return resid_BSD
        if kv is not None:
            kv.commit()
        x_BSD = self.ln_final(resid_BSD)  # its hooks fire for return_type=None too
        if return_type is None:
            return None
        logits_BSV = self.unembed(x_BSD)
        if return_type == "logits":
            return logits_BSV
        loss = lm_loss(logits_BSV, tokens_BS)
        return loss if return_type == "loss" else (logits_BSV, loss)

    generate = generate  # TransformerLens's sampling loop, with a KV cache (model/generation.py)

    def hook_shapes(self, seq_len: int = 8) -> dict[str, tuple[int, ...]]:
        """Every hook name with the shape of its activation on a [1, seq_len] input."""
        with torch.no_grad():
            tokens = torch.zeros(1, min(seq_len, self.cfg.n_ctx), dtype=torch.long, device=self.W_E.device)
            _, cache = self.run_with_cache(tokens)
        return {name: tuple(cache[name].shape) for name in self.hook_dict}

    @property
    def n_params(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits_BSV: torch.Tensor, tokens_BS: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy: mean [] or per token [B, S-1]."""
    B, S, V = logits_BSV.shape
    loss = F.cross_entropy(logits_BSV[:, :-1].reshape(-1, V), tokens_BS[:, 1:].reshape(-1),
                           reduction="none" if per_token else "mean")
    return loss.view(B, S - 1) if per_token else loss
