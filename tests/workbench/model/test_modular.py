"""The modular-addition model's answer logits: the fast training forward equals the hooked model, its
gradients too, and refuses any other model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import workbench
from tests.conftest import tiny_modular_config as tiny
from workbench.data.modular import modular_data
from workbench.errors import InputError
from workbench.model.modular import answer_logits, answer_logits_fast, is_modular_model


def test_the_fast_training_forward_equals_the_hooked_model_and_its_gradients():
    cfg = tiny(p=13)
    model = workbench.Transformer(cfg.model)
    data = modular_data(13, 0.5)
    fast = answer_logits_fast(model, data.tokens_N3)
    assert torch.allclose(fast, answer_logits(model, data.tokens_N3), atol=1e-5)
    grads = []
    for fn in (answer_logits, answer_logits_fast):
        model.zero_grad()
        torch.nn.functional.cross_entropy(fn(model, data.tokens_N3), data.labels_N).backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    for name, g in grads[0].items():  # W_pos[0..1]'s row of '=' and the like get zero, not None, from the hooked path
        assert torch.allclose(g, grads[1].get(name, torch.zeros_like(g)), atol=1e-6), name
    with pytest.raises(InputError, match="for the modular-addition model"):
        answer_logits_fast(workbench.Transformer(replace(cfg.model, normalization_type="LN")), data.tokens_N3)


def test_a_model_is_modular_when_its_training_record_says_so(attn_model):
    model = workbench.Transformer(tiny().model)
    assert not is_modular_model(model) and not is_modular_model(attn_model) and not is_modular_model("x")
    model.meta = {"train": tiny().to_dict()}
    assert is_modular_model(model)
