"""Causal tracing and attention knockout: the invariants that make their numbers mean something."""

from __future__ import annotations

import json

import pytest
import torch

from analyses.fact_recall import FactRecallConfig, load_facts
from workbench.cache.collect import run_collect
from workbench.compute.causal_tracing import FactPrompt, attention_knockout, causal_trace, encode_fact, position_groups
from workbench.errors import ConfigError, InputError

FACT = FactPrompt("Tavo Rim is at ", "Tavo Rim", "P")  # byte tokens: fits the tiny model's 24 positions


def test_encoding_finds_the_subject_tokens(attn_model):
    enc = encode_fact(attn_model, FACT)
    a, b = enc.subject
    assert attn_model.to_string(enc.tokens[0, a:b]) == "Tavo Rim"
    groups = position_groups(enc)
    assert groups["last subject token"] == [b - 1] and groups["last token"] == [enc.tokens.shape[1] - 1]


def test_no_corruption_means_no_effect(attn_model):
    t = causal_trace(attn_model, encode_fact(attn_model, FACT), noise=0.0, n_samples=1)
    assert t["p_corrupt"] == pytest.approx(t["p_clean"], abs=1e-7)
    for comp in ("resid", "attn"):
        assert abs(t[comp]).max() < 1e-6


def test_restoring_every_layer_at_every_position_gives_back_the_clean_probability(attn_model):
    enc = encode_fact(attn_model, FACT)
    L = attn_model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_post" for l in range(L)]
    logits, clean = run_collect(attn_model, enc.tokens, names)
    a, b = enc.subject

    noise = torch.randn(b - a, attn_model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def corrupt(x, hook):
        x = x.clone()
        x[:, a:b] += noise  # (a constant shift would vanish in LayerNorm)
        return x

    restore = [(n, lambda x, hook, n=n: clean[n].clone()) for n in names]
    corrupted = attn_model.run_with_hooks(enc.tokens, fwd_hooks=[("hook_embed", corrupt)])
    restored = attn_model.run_with_hooks(enc.tokens, fwd_hooks=[("hook_embed", corrupt), *restore])
    p = lambda lg: float(lg[0, -1].detach().softmax(-1)[enc.target])  # noqa: E731
    assert p(restored) == pytest.approx(p(logits), abs=1e-7)
    assert (corrupted - logits).abs().max() > 1e-3  # the corruption did change the output
    assert torch.allclose(restored, logits, atol=1e-6)
    # and the batched trace agrees with a single restoration done by hand
    t = causal_trace(attn_model, enc, noise=1.0, components=("resid",), n_samples=1, seed=3)
    assert t["resid"].shape == (L, enc.tokens.shape[1])


def test_knockout_of_nothing_changes_nothing_and_of_everything_changes_something(attn_model):
    enc = encode_fact(attn_model, FACT)
    p_clean, p = attention_knockout(attn_model, enc, [])
    assert (abs(p - p_clean) < 1e-7).all()
    _, p = attention_knockout(attn_model, enc, list(range(1, enc.tokens.shape[1] - 1)), window=2)
    assert (abs(p - p_clean) > 1e-7).any()


def test_bad_facts_are_clear_errors(attn_model, tmp_path):
    with pytest.raises(InputError, match="row 4: the subject 'Nobody'"):
        encode_fact(attn_model, FactPrompt("The home of Tavo is", "Nobody", "P"), row=4)
    with pytest.raises(InputError, match="row 2: the target ' Paris' is 6 tokens"):
        encode_fact(attn_model, FactPrompt("Tavo lives in", "Tavo", " Paris"), row=2)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="no facts"):
        load_facts(str(tmp_path / "empty.json"))
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "a b", "subject": "a", "target": "c"}, {"prompt": "x"}]))
    with pytest.raises(InputError, match="row 1: missing"):
        load_facts(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="noise"):
        FactRecallConfig(noise=0.0)
