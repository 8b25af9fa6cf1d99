"""Synthetic sparse-feature data with known features, to score an SAE against the truth.

x = Σᵢ fᵢ dᵢ over n unit-norm directions dᵢ in d dimensions, each feature active with probability
mean_active / n and then uniform on [0, 1]. The superposition toy models' exported ground truth
(`workbench.model.toy_models.export_ground_truth`) is read by `load_ground_truth` into the same form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file

from workbench.config import check_types
from workbench.errors import CheckpointError, check_field


@dataclass(frozen=True)
class SyntheticFeatures:
    """Known features and a sampler of their sparse combinations."""

    n_features: int = 128
    """Number of true features."""
    d: int = 64
    """Dimension of the activations."""
    mean_active: float = 5.0
    """Expected number of active features per sample."""
    seed: int = 0
    """Seed of the directions (and, offset, of the samples)."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "SyntheticFeatures"
        check_field(self.n_features > 0 and self.d > 0, own, "n_features/d", (self.n_features, self.d), "positive")
        check_field(0 < self.mean_active <= self.n_features, own, "mean_active", self.mean_active,
                    f"in (0, n_features = {self.n_features}]")

    @property
    def directions(self) -> torch.Tensor:
        """[n_features, d] unit-norm true feature directions."""
        gen = torch.Generator().manual_seed(self.seed)
        D = torch.randn(self.n_features, self.d, generator=gen)
        return D / D.norm(dim=1, keepdim=True)

    def sample(self, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d], true activations f [n, n_features])."""
        gen = torch.Generator().manual_seed(self.seed * 7919 + seed)
        p = self.mean_active / self.n_features
        f = torch.rand(n, self.n_features, generator=gen) * (torch.rand(n, self.n_features, generator=gen) < p)
        return f @ self.directions, f


def load_ground_truth(folder: Union[str, Path], instance: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden activations [N, m], true features [N, n], true directions [n, m]) of one instance of a
    superposition export."""
    path = Path(folder) / f"instance_{instance:03d}.safetensors"
    try:
        data = load_file(str(path))
    except FileNotFoundError as err:
        have = sorted(p.name for p in Path(folder).glob("instance_*.safetensors"))
        raise CheckpointError(f"No ground truth for instance {instance} in {folder}; it has {have}.") from err
    return data["hidden"], data["features"], data["directions"]
