"""Toy models of superposition: the measures on hand-built weights with known answers, the paper's
n = 5, m = 2 result, the linear model's limit, the data, the export and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from workbench.errors import ConfigError, InputError
from workbench.model.toy_models import (
    AbsModel,
    ToyConfig,
    ToyModel,
    angles_between_neighbours,
    classify_phase,
    dims_per_feature,
    export_ground_truth,
    feature_dimensionality,
    feature_norms,
    instance_losses,
    superposition,
    train_config,
    train_toy,
)


def _polygon(k: int) -> torch.Tensor:
    """W [2, k]: k unit vectors evenly spaced round the circle."""
    theta = torch.arange(k) * 2 * math.pi / k
    return torch.stack([theta.cos(), theta.sin()])


def _tetrahedron() -> torch.Tensor:
    """W [3, 4]: the vertices of a regular tetrahedron, unit length."""
    v = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / math.sqrt(3)
    return v.T


@pytest.mark.parametrize("W,expected", [
    (torch.eye(3), 1.0),                              # an orthogonal basis: one dimension each
    (torch.tensor([[1.0, -1.0]]), 1 / 2),             # an antipodal pair
    (_polygon(5), 2 / 5),                             # a regular pentagon in 2D
    (_tetrahedron(), 3 / 4),                          # a regular tetrahedron in 3D
])
def test_dimensionality_of_known_geometries(W, expected):
    D = feature_dimensionality(W)
    assert torch.allclose(D, torch.full_like(D, expected), atol=1e-5)
    assert dims_per_feature(W) == pytest.approx(expected, abs=1e-5)  # unit vectors: the same answer


def test_a_zero_vector_has_dimensionality_zero_and_no_superposition():
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # feature 2 is not represented
    assert feature_dimensionality(W).tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert superposition(W).tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert superposition(torch.tensor([[1.0, -1.0]])).tolist() == pytest.approx([1.0, 1.0])


def test_phase_classification_and_angles_on_hand_built_weights():
    W = torch.tensor([[[0.02, 1.0]], [[1.0, -1.0]], [[1.0, 0.1]], [[0.7, 0.7]]])
    assert classify_phase(W).tolist() == [1, 2, 0, 0]  # dedicated, superposition, not represented, linear split
    with pytest.raises(InputError, match="2 features in 1 dimension"):
        classify_phase(torch.eye(2)[None])
    assert angles_between_neighbours(_polygon(5)).tolist() == pytest.approx([72.0] * 5, abs=1e-3)


@pytest.fixture(scope="module")
def five_two():
    """n = 5, m = 2, importance 0.9^i: dense, and 8 seeds at each of two high sparsities."""
    return train_config(ToyConfig(sparsities=(0.0, 0.98, 0.99), n_seeds=8), progress=False)


def test_dense_five_features_in_two_dimensions_keep_two_orthogonal_features(five_two):
    for k in range(8):  # the 8 dense instances
        W = five_two.W[k].detach()
        on = feature_norms(W) > 0.5
        assert on.sum() == 2
        a, b = W[:, on].T
        assert abs(float(a @ b)) / float(a.norm() * b.norm()) < 0.1  # near-orthogonal


def test_sparse_five_features_form_a_pentagon_in_every_seed(five_two):
    """Covers S = 0.98 and 0.99 (feature probability 0.02 and 0.01): 16 of 16 instances. At 1−S of
    0.05–0.1 some seeds settle as two antipodal pairs instead (see docs/analyses/superposition.md)."""
    for k in range(8, 24):
        W = five_two.W[k].detach()
        assert (feature_norms(W) > 0.5).all()
        angles = angles_between_neighbours(W)
        assert len(angles) == 5 and (angles - 72).abs().max() < 10, angles


def test_the_linear_model_never_represents_more_than_m_features():
    cfg = ToyConfig(n_features=6, n_hidden=2, sparsities=(0.0, 0.7, 0.9, 0.99), n_seeds=2, kind="linear",
                    n_steps=2000)
    W = train_config(cfg, progress=False).W.detach()
    assert ((feature_norms(W) > 0.5).sum(-1) <= 2).all()


def test_each_instance_has_its_own_seed_sparsity_and_importance():
    cfg = ToyConfig(sparsities=(0.1, 0.5), n_seeds=2, importance=(1.0, 0.5, 0.25, 0.1, 0.0))
    model = ToyModel.from_config(cfg)
    assert model.sparsity.tolist() == pytest.approx([0.1, 0.1, 0.5, 0.5])
    assert model.importance[3].tolist() == pytest.approx([1.0, 0.5, 0.25, 0.1, 0.0])
    alone = ToyModel(5, 2, torch.tensor([0.5]), torch.ones(1, 5), seeds=[cfg.seed * 1000 + 3])
    assert torch.equal(model.W[3], alone.W[0]) and not torch.equal(model.W[2], model.W[3])


@pytest.mark.parametrize("correlation", ["none", "correlated", "anticorrelated"])
def test_feature_data_has_the_asked_for_density_and_correlation(correlation):
    model = ToyModel(4, 2, torch.tensor([0.0, 0.8]), torch.ones(2, 4), correlation=correlation)
    x = model.generate_batch(20_000, torch.Generator().manual_seed(0))  # [instances, batch, features]
    present = x > 0
    density = present.float().mean(dim=(1, 2))
    dense = 0.5 if correlation == "anticorrelated" else 1.0  # one of each pair at most
    assert density.tolist() == pytest.approx([dense, 0.2], abs=0.01) and x.max() <= 1 and x.min() >= 0
    assert x[1][present[1]].mean() == pytest.approx(0.5, abs=0.01)  # present values are uniform on [0, 1]
    pairs = present[1].view(-1, 2, 2)
    if correlation == "correlated":
        assert torch.equal(pairs[..., 0], pairs[..., 1])
    if correlation == "anticorrelated":
        assert not (pairs[..., 0] & pairs[..., 1]).any()


@pytest.mark.parametrize("kind", ["relu", ["relu", "linear", "linear"]])
def test_closed_form_gradients_equal_autograd(kind):
    model = ToyModel(6, 3, torch.tensor([0.0, 0.5, 0.9]), torch.rand(3, 6), kind=kind)
    with torch.no_grad():
        model.b.copy_(torch.randn(3, 6) * 0.1)
    x = model.generate_batch(64, torch.Generator().manual_seed(0))
    model.loss(x).backward()
    loss, dW, db = model.loss_and_grads(x)
    assert loss == pytest.approx(float(model.loss(x).detach()), rel=1e-5)
    assert torch.allclose(dW, model.W.grad, atol=1e-6) and torch.allclose(db, model.b.grad, atol=1e-6)


def test_compiled_and_eager_training_agree():
    a, b = (ToyModel(5, 2, torch.tensor([0.0, 0.9]), torch.ones(2, 5)) for _ in range(2))
    train_toy(a, 50, 128, 1e-2, progress=False, compile=True)
    train_toy(b, 50, 128, 1e-2, progress=False, compile=False)
    assert torch.allclose(a.W, b.W, atol=1e-4)


def test_ground_truth_export(tmp_path):
    model = ToyModel(5, 2, torch.tensor([0.5, 0.9]), torch.ones(2, 5))
    out = export_ground_truth(model, [1], tmp_path / "gt", n_samples=256)
    data = load_file(str(out / "instance_001.safetensors"))
    assert data["hidden"].shape == (256, 2) and data["features"].shape == (256, 5)
    assert data["directions"].shape == (5, 2)
    assert torch.allclose(data["hidden"], data["features"] @ data["directions"], atol=1e-6)  # h = W x
    assert (data["features"] > 0).float().mean() == pytest.approx(0.1, abs=0.05)
    assert "instance_001" in (out / "config.json").read_text()
    with pytest.raises(InputError, match="out of range"):
        export_ground_truth(model, [2], tmp_path / "gt2")


def test_the_absolute_value_model_learns():
    model = AbsModel(6, 4, torch.tensor([0.0, 0.9]), torch.ones(2, 6))
    before = instance_losses(model)
    train_toy(model, 300, 256, 1e-2, progress=False)
    assert (instance_losses(model) < 0.7 * before).all()


def test_bad_settings_are_clear_errors():
    with pytest.warns(UserWarning, match="no superposition is possible"):
        ToyConfig(n_features=3, n_hidden=3)
    with pytest.raises(ConfigError, match="sparsities"):
        ToyConfig(sparsities=(0.5, 1.0))
    with pytest.raises(ConfigError, match="sparsities"):
        ToyConfig(sparsities=(-0.1,))
    with pytest.raises(ConfigError, match="importance"):
        ToyConfig(importance=(1.0, 0.5))
    with pytest.raises(ConfigError, match="n_steps"):
        ToyConfig(n_steps=0)
    with pytest.raises(ConfigError, match="n_steps"):
        train_toy(ToyModel(5, 2, torch.tensor([0.5]), torch.ones(1, 5)), -3)
    with pytest.raises(InputError, match="importance"):
        ToyModel(5, 2, torch.tensor([0.5]), torch.ones(1, 4))
