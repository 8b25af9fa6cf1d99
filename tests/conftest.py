"""Tiny CPU models and isolated caches for the test suite. No network, no downloads."""

from __future__ import annotations

import os

import pytest
import torch

from workbench.data import DataConfig
from workbench.model import ModelConfig, Transformer
from workbench.tokenizer import TextCodec, byte_tokenizer
from workbench.train import TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub must fail fast
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "wb-cache"))


def tiny_config(**overrides) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=None, n_ctx=24, d_vocab=257, seed=0)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def attn_model() -> Transformer:
    return Transformer(tiny_config(), tokenizer=TextCodec(byte_tokenizer())).eval()


@pytest.fixture
def mlp_model() -> Transformer:
    return Transformer(tiny_config(d_mlp=64), tokenizer=TextCodec(byte_tokenizer())).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 257, (3, 20), generator=torch.Generator().manual_seed(0))


def tiny_train_config(**overrides) -> TrainConfig:
    """A run of a few seconds on synthetic data only (no corpus to read)."""
    base = dict(model=tiny_config(n_ctx=32), data=DataConfig(synthetic_fraction=1.0), batch_size=8,
                n_steps=20, warmup_steps=2, eval_every=5, log_every=2, n_checkpoints=5)
    return TrainConfig(**{**base, **overrides})
