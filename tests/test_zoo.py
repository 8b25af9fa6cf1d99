"""The shipped toy models: present, small, loadable, and doing what their presets promise.

Induction is checked on the three kinds of repeated sequence the induction-heads analysis reports
(analyses.induction_heads.KINDS): random tokens over the whole vocabulary, random tokens at the
frequencies of the model's held-out text, and passages of that held-out text.
"""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

import workbench
from analyses.induction_heads import KINDS
from workbench.artifacts import list_checkpoints
from workbench.cache.collect import half_losses, per_token_loss
from workbench.cache.rows import held_out_text, probe_tokens, text_probe_tokens
from workbench.compute.attention_scores import induction_score, previous_token_score
from workbench.model.loading import models_dir, shipped_models

SHIPPED = ("attn-only-1l", "attn-only-2l", "gelu-2l")
INDUCTION_MODELS = ("attn-only-2l", "gelu-2l")
UNSEEN_LENGTHS = (40, 50)  # the presets train on repeated segments of at most 32 tokens


@lru_cache(maxsize=None)
def _model(name):
    return workbench.load(name, device="cpu")


def _sequence(model, kind, seq_len=40, seed=123):
    """[16, 1 + 2 * seq_len] tokens of one kind, after the BOS; prefix length 1."""
    if kind == "printable ASCII":  # the issue's own reproduction: characters 33..126, uniformly
        body = torch.randint(33, 127, (16, seq_len), generator=torch.Generator().manual_seed(seed))
        return torch.cat([torch.full((16, 1), 256), body, body], dim=1)
    if KINDS[kind] == "uniform":
        return probe_tokens(model, seq_len, 2, 16, seed, prepend_bos=True)[0]
    text, _ = held_out_text(model)
    return text_probe_tokens(model, KINDS[kind], text, seq_len, 2, 16, seed, prepend_bos=True)[0]


def _run(model, tokens, fwd_hooks=()):
    """(per-token loss [B, S-1], each layer's attention pattern [B, H, S, S])."""
    store = {}

    def keep(pattern, hook):
        store[hook.name] = pattern

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), keep), *fwd_hooks])
    return per_token_loss(logits, tokens), [store[f"blocks.{l}.attn.hook_pattern"] for l in range(model.cfg.n_layers)]


def test_every_preset_is_shipped_trained_with_checkpoints():
    assert set(SHIPPED) <= set(shipped_models())
    for name in SHIPPED:
        folder = models_dir() / name
        steps = [s for s, _ in list_checkpoints(folder)]
        assert steps[0] == 0 and len(steps) >= 6
        model = workbench.load(name, checkpoint=steps[len(steps) // 2], device="cpu")
        assert model.meta["step"] == steps[len(steps) // 2]


def test_shipped_models_are_small():
    # attn-only-2l and gelu-2l keep a checkpoint every 100 steps across their phase change;
    # facts ships its final weights only (5.6 MB); modular-addition 16 log-spaced checkpoints in fp16 (7.6 MB);
    # facts and gelu-2l their transcoders in fp16 (3.3 MB and 0.3 MB)
    total = sum(p.stat().st_size for p in models_dir().rglob("*") if p.is_file())
    assert total < 55e6, f"models/ holds {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", SHIPPED)
def test_presets_trained_within_ten_minutes(name):
    meta = json.loads((models_dir() / name / "config.json").read_text())
    assert meta["train_seconds"] <= 600


@pytest.mark.parametrize("name", INDUCTION_MODELS)
@pytest.mark.parametrize("kind", [*KINDS, "printable ASCII"])
def test_induction_heads_work_by_the_real_mechanism(name, kind):
    model = _model(name)
    loss, (layer0, layer1) = _run(model, _sequence(model, kind))
    induction = induction_score(layer1, 40, prefix=1)
    prev = previous_token_score(layer0)
    assert induction.max() >= 0.4, induction
    assert prev.max() >= 0.4, prev
    # the mechanism: without the layer-0 previous-token head, layer 1 can no longer find the token to copy
    head = int(prev.argmax())

    def ablate_prev_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    _, (_, ablated1) = _run(model, _sequence(model, kind), [("blocks.0.attn.hook_z", ablate_prev_head)])
    assert induction_score(ablated1, 40, prefix=1).max() < 0.5 * induction.max()


@pytest.mark.parametrize("name", INDUCTION_MODELS)
@pytest.mark.parametrize("kind", KINDS)
def test_the_second_copy_is_predicted(name, kind):
    model = _model(name)
    loss, _ = _run(model, _sequence(model, kind))
    first, second = half_losses(loss, 1, 40)
    if KINDS[kind] == "passage":
        # Held-out text costs only 1.6-2.1 nats per byte the first time, so a 2-nat drop is out of
        # reach. The 2 nats asked of the other kinds are 36% (random tokens) and 59% (text-frequency
        # tokens) of their first-copy loss; of a passage we ask more: two thirds of it.
        assert second <= first / 3, (first, second)
    else:
        assert first - second >= 2.0, (first, second)


@pytest.mark.parametrize("seq_len", (20, *UNSEEN_LENGTHS))
def test_attn_only_2l_inducts_at_lengths_it_never_saw(seq_len):
    model = _model("attn-only-2l")
    for kind in KINDS:
        _, (_, layer1) = _run(model, _sequence(model, kind, seq_len))
        assert induction_score(layer1, seq_len, prefix=1).max() >= 0.4, kind


@pytest.mark.parametrize("kind", [*KINDS, "printable ASCII"])
def test_attn_only_1l_has_no_induction_head(kind):
    model = _model("attn-only-1l")
    loss, (layer0,) = _run(model, _sequence(model, kind))
    assert induction_score(layer0, 40, prefix=1).max() < 0.2
    first, second = half_losses(loss, 1, 40)
    assert first - second < 0.5  # nothing to gain from the repeat without an induction head


def test_gelu_2l_has_mlps_and_learned_text():
    model = _model("gelu-2l")
    assert not model.cfg.attn_only
    assert model.meta["val_loss_text"] < 2.5  # nats per byte; uniform would be ln(257) = 5.55
