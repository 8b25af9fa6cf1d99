"""Sparse autoencoder architectures, registered by name (their files: `workbench.sae.files`).

Every SAE has W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] and computes

    pre = (x - b_dec) W_enc + b_enc          f = activation(pre)          x̂ = f W_dec + b_dec

    relu       f = ReLU(pre); loss adds λ Σᵢ fᵢ ‖W_dec,i‖ (Anthropic's April 2024 update)
    topk       f = ReLU(the k largest pre per token); AuxK loss on dead latents (Gao et al. 2024)
    batchtopk  the k·B largest pre over the whole batch; inference uses a learned threshold,
               so it is saved as a jumprelu SAE with that threshold (as SAELens does)
    jumprelu   f = pre · H(pre − θ), θ stored directly (not as a log), trained with a
               straight-through estimator and an L0 penalty (Rajamanoharan et al. 2024)

An SAE is saved as `cfg.json` + `sae_weights.safetensors` in SAELens's layout (`workbench.sae.files`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.config import check_types
from workbench.errors import ConfigError, InputError, check_field, unknown_name_message
from workbench.sae.kernels import sparse_code, topk_indices
from workbench.train.distributed import Dist


@dataclass(frozen=True)
class SAEConfig:
    """One sparse autoencoder: its shape, architecture and sparsity settings."""

    d_in: int
    """Width of the activations it reads."""
    d_sae: int
    """Number of latents (the dictionary size)."""
    architecture: str = "topk"
    """'relu' (alias 'standard'), 'topk', 'batchtopk' or 'jumprelu'."""
    k: int = 32
    """Latents kept per token (topk, batchtopk)."""
    l1_coefficient: float = 5.0
    """Sparsity penalty λ: on Σ fᵢ‖W_dec,i‖ (relu) or on L0 (jumprelu)."""
    aux_k: Optional[int] = None
    """Dead latents used by the AuxK loss (topk, batchtopk); None: d_in // 2."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss."""
    jumprelu_init_threshold: float = 0.3
    """Initial θ of every latent (jumprelu). Adam moves θ by about lr per step whatever λ is, so
    on short runs the start matters (for activations normalised to E‖x‖ = √d_in: 0.3 kept 95% of
    latents alive on gelu-2l, 0.5 killed 87%)."""
    jumprelu_bandwidth: float = 0.2
    """Width ε of the straight-through estimator's kernel (jumprelu)."""
    hook_name: str = ""
    """The model hook the SAE reads (metadata; saved in cfg.json)."""
    model_name: str = ""
    """The model it was trained on (metadata)."""
    target_hook: str = ""
    """A transcoder's target: it reads `hook_name` and predicts this hook (e.g. blocks.0.hook_mlp_out
    from blocks.0.ln2.hook_normalized). Empty: an autoencoder, which reconstructs its input."""
    skip: bool = False
    """A transcoder with a linear skip connection x W_skip added to its output (Paulo et al.,
    "Transcoders Beat Sparse Autoencoders", 2025)."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "SAEConfig"
        check_field(not self.skip or bool(self.target_hook), own, "skip", self.skip,
                    "False for an autoencoder (a skip connection needs a target_hook: it is a transcoder's)")
        for name in ("d_in", "d_sae", "k"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        arch = ARCH_ALIASES.get(self.architecture, self.architecture)
        if arch not in ARCHITECTURES:
            raise ConfigError(unknown_name_message("SAE architecture", self.architecture, ARCHITECTURES))
        if arch in ("topk", "batchtopk"):
            check_field(self.k <= self.d_sae, own, "k", self.k, f"at most d_sae = {self.d_sae}")
        check_field(self.l1_coefficient >= 0, own, "l1_coefficient", self.l1_coefficient, "≥ 0")
        check_field(self.jumprelu_bandwidth > 0, own, "jumprelu_bandwidth", self.jumprelu_bandwidth, "positive")

    @property
    def arch(self) -> str:
        """The canonical architecture name."""
        return ARCH_ALIASES.get(self.architecture, self.architecture)

    @property
    def is_transcoder(self) -> bool:
        return bool(self.target_hook)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainOut:
    """One training forward pass: the reconstruction and the latents, dense (`f`) or as the k
    kept (`idx`, `vals`) per token."""

    x_hat: torch.Tensor
    pre: torch.Tensor
    f: Optional[torch.Tensor] = None
    idx: Optional[torch.Tensor] = None
    vals: Optional[torch.Tensor] = None
    weighted_l1: Optional[torch.Tensor] = None
    """Σ over the batch of Σᵢ fᵢ ‖W_dec,i‖ (ReLU SAEs), with gradient."""
    x: Optional[torch.Tensor] = None
    """The input, for a sparse AuxK pass (TopK SAEs)."""

    def counts(self, d_sae: int) -> tuple[torch.Tensor, float, float]:
        """(times each latent fired [d_sae], Σ L0, Σ L1) over the batch, in one pass."""
        with torch.no_grad():
            if self.idx is not None:
                active = self.vals > 0
                fired = torch.bincount(self.idx[active], minlength=d_sae).float()
                return fired, float(active.sum()), float(self.vals.sum())
            fired = torch.count_nonzero(self.f, dim=0).float()  # no [batch, d_sae] mask built
            return fired, float(fired.sum()), float(self.f.sum())  # every architecture's f is ≥ 0


class SAE(nn.Module):
    """Base class: parameters, encode/decode and the reconstruction loss. Subclasses set the
    activation and the sparsity loss."""

    decoder_init_norm = 0.1
    dist: Dist = Dist()
    """The process group a data-parallel trainer sets, so that batch statistics inside a step are
    taken over every rank's share of the batch (a single process by default)."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * self.decoder_init_norm
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.contiguous())  # tied initialisation, in its own (row-major) layout
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: x − b_dec for an autoencoder, x itself for a transcoder (whose
        b_dec lives in the output space)."""
        return x if self.cfg.is_transcoder else x - self.b_dec

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self.centre(x) @ self.W_enc + self.b_enc  # (addmm is slower on CPU: it copies the bias first)

    def skip_out(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """A transcoder's skip connection x W_skip, or None."""
        return x @ self.W_skip if self.cfg.skip else None

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations f [..., d_sae] (the inference form)."""
        self.check_input(x)
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction (an autoencoder) or the prediction of the target hook (a transcoder)."""
        out = self.decode(self.encode(x))
        skip = self.skip_out(x)
        return out if skip is None else out + skip

    def check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise InputError(f"This SAE reads d_in = {self.d_in} but got activations of width {x.shape[-1]} "
                             f"(shape {list(x.shape)}); was it trained on another hook"
                             f"{' than ' + self.cfg.hook_name if self.cfg.hook_name else ''}?")

    def train_forward(self, x: torch.Tensor) -> TrainOut:
        """The forward pass used for training (dense by default)."""
        pre = self.pre_acts(x)
        f = self.activate(pre)
        return TrainOut(self.decode(f), pre, f=f)

    def sparsity_loss(self, out: TrainOut, coefficient: float) -> torch.Tensor:
        return out.x_hat.new_zeros(())

    def aux_loss(self, target: torch.Tensor, out: TrainOut, dead: torch.Tensor) -> torch.Tensor:
        return target.new_zeros(())

    @torch.no_grad()
    def after_step(self) -> None:
        """Anything to do after an optimizer step (e.g. keep decoder rows unit norm)."""

    def fold_scale(self, scale: float, scale_out: Optional[float] = None) -> None:
        """Make an SAE trained on x · scale (and a transcoder trained to predict y · scale_out) act on
        raw activations: outputs identical (divided by scale_out), weights rescaled."""
        scale_out = scale if scale_out is None else scale_out
        with torch.no_grad():
            self.W_enc.mul_(scale)
            self.W_dec.div_(scale_out)
            self.b_dec.div_(scale_out)
            if self.cfg.skip:
                self.W_skip.mul_(scale / scale_out)

    def inference_state(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        """(SAELens architecture name, tensors, extra cfg fields) for saving."""
        return "standard", self._weights(), {}

    def _weights(self) -> dict[str, torch.Tensor]:
        names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("W_skip",) if self.cfg.skip else ())
        return {n: getattr(self, n).detach() for n in names}


class ReLUSAE(SAE):
    """f = ReLU(pre); sparsity loss λ Σᵢ fᵢ ‖W_dec,i‖."""

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)

    def train_forward(self, x: torch.Tensor) -> TrainOut:
        """Decode and the decoder-norm-weighted L1 in one matmul, f [W_dec | ‖W_dec‖]: the backward
        then builds the gradient for f once, instead of adding a broadcast [batch, d_sae] term
        (measured: a third of a step at d_sae 4096)."""
        f = F.relu(self.pre_acts(x))
        y = f @ torch.cat([self.W_dec, self.W_dec.norm(dim=1, keepdim=True)], dim=1)
        return TrainOut(y[:, :-1] + self.b_dec, None, f=f, weighted_l1=y[:, -1].sum())

    def sparsity_loss(self, out: TrainOut, coefficient: float) -> torch.Tensor:
        return coefficient * out.weighted_l1 / out.f.shape[0]


class TopKSAE(SAE):
    """f = ReLU of each token's k largest pre-activations; unit-norm decoder rows; AuxK loss."""

    decoder_init_norm = 1.0

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        top = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))

    def _sparse(self, x: torch.Tensor, pre: torch.Tensor, idx: torch.Tensor, relu: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ReLU of pre at idx, or pre itself, with a sparse backward; their decoded sum without b_dec)."""
        b_dec = None if self.cfg.is_transcoder else self.b_dec
        return sparse_code(x, b_dec, self.W_enc, self.b_enc, self.W_dec, idx, pre, relu=relu)

    def train_forward(self, x: torch.Tensor) -> TrainOut:
        """Dense encoder forward (to find the top k), everything after it sparse (`kernels.sparse_code`)."""
        with torch.no_grad():  # addmm: the bias comes free with the matmul here (+1% against +10% for a separate add)
            pre = torch.addmm(self.b_enc, self.centre(x), self.W_enc)
        idx = topk_indices(pre, self.cfg.k)
        vals, decoded = self._sparse(x, pre, idx)
        return TrainOut(decoded + self.b_dec, pre, idx=idx, vals=vals, x=x)

    def aux_loss(self, target: torch.Tensor, out: TrainOut, dead: torch.Tensor) -> torch.Tensor:
        """Reconstruct the residual target − x̂ from the k_aux largest dead latents, normalised by the
        residual's variance and scaled down while few latents are dead (Gao et al. 2024). Their
        pre-activations are used as they are, without the ReLU: a dead latent's are mostly negative,
        and through a ReLU it would get no gradient to come back with (as SAELens does)."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return target.new_zeros(())
        k_aux = min(self.cfg.aux_k or self.d_in // 2, n_dead)
        residual = (target - out.x_hat).detach()
        dead_ids = dead.nonzero().squeeze(1)  # only the dead columns are searched, not a masked copy of pre
        idx = dead_ids[topk_indices(out.pre.index_select(1, dead_ids), k_aux)]
        assert out.x is not None  # TopK's train_forward always sets it
        _, recon = self._sparse(out.x, out.pre, idx, relu=False)
        denom = centred_sq_mean(residual, self.dist).clamp_min(1e-12)
        scale = min(n_dead / k_aux, 1.0)
        return self.cfg.aux_coefficient * scale * (recon - residual).pow(2).sum(-1).mean() / denom

    @torch.no_grad()
    def after_step(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def inference_state(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        return "topk", self._weights(), {"k": self.cfg.k}


class BatchTopKSAE(TopKSAE):
    """Training: the k·B largest pre-activations over the batch. The threshold θ, a running mean
    of the smallest kept activation, replaces the batch at inference (f = pre · [pre > θ])."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.register_buffer("threshold", torch.tensor(0.0))

    def train_forward(self, x: torch.Tensor) -> TrainOut:
        pre = self.pre_acts(x)
        acts = F.relu(pre)
        if self.dist.active:
            return self._train_forward_distributed(pre, acts)
        flat = acts.flatten()
        top = flat.topk(min(self.cfg.k * acts.shape[0], flat.numel()))
        f = torch.zeros_like(flat).scatter_(0, top.indices, top.values).view_as(acts)
        with torch.no_grad():
            kept = top.values[top.values > 0]
            if kept.numel():
                self.threshold.lerp_(kept.min(), 0.01 if self.threshold > 0 else 1.0)
        return TrainOut(self.decode(f), pre, f=f)

    def _train_forward_distributed(self, pre: torch.Tensor, acts: torch.Tensor) -> TrainOut:
        """The k·B largest over the whole batch, every rank's share: the cut is the (k·B)-th largest of
        the ranks' own candidates, gathered (each rank's top k·B, since the whole batch's top k·B are
        among them)."""
        n = self.cfg.k * acts.shape[0] * self.dist.world
        with torch.no_grad():
            flat = acts.flatten()
            mine = flat.topk(min(n, flat.numel())).values
            cut = self.dist.cat(mine).topk(min(n, mine.numel() * self.dist.world)).values[-1]
            keep = acts >= cut if cut > 0 else acts > 0
        f = acts * keep
        with torch.no_grad():
            low = cut if cut > 0 else _global_min(flat[flat > 0], self.dist)
            if torch.isfinite(low) and low > 0:
                self.threshold.lerp_(low, 0.01 if self.threshold > 0 else 1.0)
        return TrainOut(self.decode(f), pre, f=f)

    def aux_loss(self, target: torch.Tensor, out: TrainOut, dead: torch.Tensor) -> torch.Tensor:
        return target.new_zeros(())  # BatchTopK's batch-level selection already revives rarely used latents

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def inference_state(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        weights = self._weights()
        weights["threshold"] = self.threshold.expand(self.d_sae).clone()
        return "jumprelu", weights, {"trained_as": "batchtopk", "k": self.cfg.k}


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ): the usual gradient for pre, a kernel-density estimate for θ."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        grad_threshold = -(threshold / eps) * near * grad
        return grad * (pre > threshold), grad_threshold.sum(dim=tuple(range(grad.ndim - 1))), None


class _Step(torch.autograd.Function):
    """H(pre − θ) with the straight-through estimator for θ (used for the L0 penalty)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(pre.dtype)
        return None, (-(1.0 / eps) * near * grad).sum(dim=tuple(range(grad.ndim - 1))), None


class JumpReLUSAE(SAE):
    """f = pre · H(pre − θ); L0 penalty λ Σᵢ H(preᵢ − θᵢ) through the straight-through estimator."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.training:
            return _JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        return pre * (pre > self.threshold)

    def sparsity_loss(self, out: TrainOut, coefficient: float) -> torch.Tensor:
        return coefficient * _Step.apply(out.pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        self.threshold.clamp_(min=1e-6)

    def fold_scale(self, scale: float, scale_out: Optional[float] = None) -> None:
        super().fold_scale(scale, scale_out)  # pre = (x s − b) W + c is unchanged, so θ is too

    def inference_state(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        weights = self._weights()
        weights["threshold"] = self.threshold.detach()
        return "jumprelu", weights, {}


ARCHITECTURES: dict[str, Callable[..., SAE]] = {"relu": ReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE,
                                                 "jumprelu": JumpReLUSAE}
ARCH_ALIASES = {"standard": "relu"}


def register_architecture(name: str, cls: Callable[..., SAE]) -> None:
    """Add an architecture (a subclass of SAE) under `name`."""
    ARCHITECTURES[name] = cls


def make_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    """A freshly initialised SAE of the configured architecture."""
    return ARCHITECTURES[cfg.arch](cfg, seed)


def centred_sq_mean(r: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Mean over the rows of every rank of ‖r − mean(r)‖², the mean taken over every rank too
    (two passes, as one process computes it)."""
    if not dist.active:
        return (r - r.mean(0)).pow(2).sum(-1).mean()
    count = dist.sum_(torch.tensor([float(len(r))], device=r.device, dtype=r.dtype))
    mean = dist.sum_(r.sum(0)) / count
    return dist.sum_((r - mean).pow(2).sum().reshape(1))[0] / count[0]


def _global_min(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The smallest of `values` over every rank (inf where there are none)."""
    mine = values.min() if values.numel() else values.new_tensor(float("inf"))
    return dist.cat(mine.reshape(1)).min()


def geometric_median(points: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points` [N, d]."""
    median = points.mean(0)
    for _ in range(iters):
        weights = 1 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * max(1.0, float(median.norm())):
            return new
        median = new
    return median
