"""The modular-addition task: every pair with its answer, a seeded split, and a modulus too large for
its tables refused."""

from __future__ import annotations

import pytest
import torch

from workbench.data.modular import MAX_P, is_prime, modular_data
from workbench.errors import ConfigError


def test_the_data_are_every_pair_with_its_sum_and_a_seeded_split():
    data = modular_data(13, 0.5, seed=3)
    a, b, eq = data.tokens_N3.T
    assert len(data.labels_N) == 169 and torch.equal(data.labels_N, (a + b) % 13) and (eq == 13).all()
    assert len(data.train_idx) == round(0.5 * 169) and len(data.train_idx) + len(data.test_idx) == 169
    assert not set(data.train_idx.tolist()) & set(data.test_idx.tolist())
    assert torch.equal(modular_data(13, 0.5, seed=3).train_idx, data.train_idx)
    assert not torch.equal(modular_data(13, 0.5, seed=4).train_idx, data.train_idx)


def test_a_modulus_outside_the_tables_or_a_split_outside_zero_one_is_a_config_error():
    with pytest.raises(ConfigError, match="at most 1024"):
        modular_data(MAX_P + 1, 0.5)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        modular_data(11, 1.0)


def test_is_prime():
    assert is_prime(53) and is_prime(113) and is_prime(2) and not is_prime(51) and not is_prime(1)
