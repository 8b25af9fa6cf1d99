"""The shipped toy models: present, small, loadable, and doing what their presets promise."""

from __future__ import annotations

import json

import pytest
import torch

import workbench
from workbench.artifacts import list_checkpoints
from workbench.attention_scores import induction_score, previous_token_score
from workbench.data import repeated_sequence
from workbench.loading import models_dir, shipped_models

SHIPPED = ("attn-only-1l", "attn-only-2l", "gelu-2l")
UNSEEN_LENGTHS = (40, 50)  # the presets train on repeated segments of at most 32 tokens


def _patterns(model, seq_len, fwd_hooks=()):
    rep = repeated_sequence(16, seq_len, 256, seed=123)
    store = {}

    def keep(pattern, hook):
        store[hook.name] = pattern

    hooks = [(lambda n: n.endswith("hook_pattern"), keep), *fwd_hooks]
    with torch.no_grad():
        model.run_with_hooks(rep, fwd_hooks=hooks)
    return [store[f"blocks.{l}.attn.hook_pattern"] for l in range(model.cfg.n_layers)]


def test_every_preset_is_shipped_trained_with_checkpoints():
    assert set(SHIPPED) <= set(shipped_models())
    for name in SHIPPED:
        folder = models_dir() / name
        steps = [s for s, _ in list_checkpoints(folder)]
        assert steps[0] == 0 and len(steps) >= 6
        model = workbench.load(name, checkpoint=steps[len(steps) // 2], device="cpu")
        assert model.meta["step"] == steps[len(steps) // 2]


def test_shipped_models_are_small():
    # attn-only-2l keeps a checkpoint every 400 steps (19 in all) to resolve its phase change;
    # facts ships its final weights only (5.6 MB)
    total = sum(p.stat().st_size for p in models_dir().rglob("*") if p.is_file())
    assert total < 40e6, f"models/ holds {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", SHIPPED)
def test_presets_trained_within_ten_minutes(name):
    meta = json.loads((models_dir() / name / "config.json").read_text())
    assert meta["train_seconds"] <= 600


@pytest.mark.parametrize("seq_len", (20, *UNSEEN_LENGTHS))
def test_attn_only_2l_has_induction_heads_by_the_real_mechanism(seq_len):
    model = workbench.load("attn-only-2l", device="cpu")
    layer0, layer1 = _patterns(model, seq_len)
    induction = induction_score(layer1, seq_len)
    prev = previous_token_score(layer0)
    assert induction.max() >= 0.4, induction
    assert prev.max() >= 0.4, prev
    # the mechanism: without the layer-0 previous-token head, layer 1 can no longer find the token to copy
    head = int(prev.argmax())

    def ablate_prev_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    _, ablated1 = _patterns(model, seq_len, [("blocks.0.attn.hook_z", ablate_prev_head)])
    assert induction_score(ablated1, seq_len).max() < 0.5 * induction.max()


@pytest.mark.parametrize("seq_len", (20, *UNSEEN_LENGTHS))
def test_attn_only_1l_has_no_induction_head(seq_len):
    (layer0,) = _patterns(workbench.load("attn-only-1l", device="cpu"), seq_len)
    assert induction_score(layer0, seq_len).max() < 0.2


def test_gelu_2l_has_mlps_and_learned_text():
    model = workbench.load("gelu-2l", device="cpu")
    assert not model.cfg.attn_only
    assert model.meta["val_loss_text"] < 2.5  # nats per byte; uniform would be ln(257) = 5.55
