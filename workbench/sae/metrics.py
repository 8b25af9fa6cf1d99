"""SAE metrics, each defined once (x: activations [N, d], x̂: reconstruction, f: latents [N, d_sae]).

    L0                 mean number of non-zero latents per token
    L1                 mean Σ|fᵢ| per token
    MSE                mean over tokens of ‖x − x̂‖² (summed over d: independent of batch size)
    FVU                Σ‖x − x̂‖² / Σ‖x − x̄‖²; explained variance = R² about the mean = 1 − FVU
    cosine             mean cos(x, x̂)
    l2 ratio           mean ‖x̂‖ / ‖x‖ (below 1: shrinkage)
    dead / dense       latents that never fire / fire on more than `dense_threshold` of tokens
    MMCS               mean over true features of the max cosine with any decoder row

`ReconstructionStats` accumulates them over batches, so the answer does not depend on how the
evaluation data is split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def l0(f: torch.Tensor) -> float:
    return float((f != 0).sum(-1).float().mean())


def l1(f: torch.Tensor) -> float:
    return float(f.abs().sum(-1).mean())


def mse_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum(-1).mean())


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return 1.0 - fvu(x, x_hat)


def cosine(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean())


def l2_ratio(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).mean())


def mmcs(true_directions: torch.Tensor, W_dec: torch.Tensor, threshold: float = 0.9) -> tuple[float, float]:
    """(mean max cosine similarity of each true feature [n, d] with the decoder rows [d_sae, d],
    fraction of true features whose best match is above `threshold`)."""
    t = torch.nn.functional.normalize(true_directions.float(), dim=-1)
    w = torch.nn.functional.normalize(W_dec.detach().float(), dim=-1)
    best = (t @ w.T).max(dim=1).values
    return float(best.mean()), float((best > threshold).float().mean())


@dataclass
class ReconstructionStats:
    """Streaming sums for every reconstruction metric; `add` batches, then `summary()`."""

    d_sae: int
    dense_threshold: float = 0.1
    n: int = 0
    sq_err: float = 0.0
    sum_x: torch.Tensor = None  # type: ignore[assignment]
    sum_x_sq: float = 0.0
    l0_sum: float = 0.0
    l1_sum: float = 0.0
    cos_sum: float = 0.0
    ratio_sum: float = 0.0
    fired: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        f = f.detach().float()
        fired = (f != 0).sum(0).float()
        self.add_counts(x, x_hat, fired, float(fired.sum()), float(f.abs().sum()))

    def add_counts(self, x: torch.Tensor, x_hat: torch.Tensor, fired: torch.Tensor, l0_sum: float,
                   l1_sum: float) -> None:
        """`add` for callers that already counted each latent's firings, L0 and L1 (the sum over
        the batch): a trainer holding only the k kept latents per token never builds f."""
        x, x_hat = x.detach().float(), x_hat.detach().float()
        if self.fired is None:
            self.fired = torch.zeros(self.d_sae, device=fired.device)
            self.sum_x = torch.zeros(x.shape[-1], device=x.device, dtype=torch.float64)
        self.n += x.shape[0]
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sum_x += x.sum(0).double()
        self.sum_x_sq += float(x.double().pow(2).sum())
        self.l0_sum += l0_sum
        self.l1_sum += l1_sum
        self.cos_sum += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        self.ratio_sum += float((x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum())
        self.fired += fired

    def density(self) -> torch.Tensor:
        """[d_sae] fraction of tokens on which each latent fired."""
        return self.fired / max(self.n, 1)

    def summary(self) -> dict[str, float]:
        total_var = self.sum_x_sq - float(self.sum_x.pow(2).sum()) / max(self.n, 1)  # Σ‖x − x̄‖²
        fvu_ = self.sq_err / max(total_var, 1e-12)
        density = self.density()
        return {"l0": self.l0_sum / self.n, "l1": self.l1_sum / self.n, "mse": self.sq_err / self.n,
                "fvu": fvu_, "explained_variance": 1 - fvu_, "cosine": self.cos_sum / self.n,
                "l2_ratio": self.ratio_sum / self.n, "dead_fraction": float((density == 0).float().mean()),
                "dense_fraction": float((density > self.dense_threshold).float().mean()), "tokens": self.n}
