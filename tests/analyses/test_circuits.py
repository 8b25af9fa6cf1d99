"""The circuits analysis on the shipped models, a TransformerBridge, a large vocabulary and bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import workbench
from analyses.circuits import CircuitsConfig, compute, figures
from tests.conftest import NoAttention, tiny_config
from workbench.errors import ConfigError, InputError

SMALL = CircuitsConfig(seq_len=8, n_sequences=4, n_random=8, text_rows=2, text_len=16)


@pytest.fixture(scope="module")
def result_2l():
    return compute(workbench.load("attn-only-2l", device="cpu"), CircuitsConfig())


def test_induction_head_reads_the_previous_token_head_by_k_composition(result_2l):
    r = result_2l
    ind, prev = r.induction_head, r.prev_token_head
    assert ind.startswith("L1") and prev is not None and prev.startswith("L0")
    assert r.top_sender(ind, "K") == prev  # its largest K-composition
    k = r.composition_of(prev, ind, "K")
    assert k >= 1.3 * r.baselines["K"]
    assert k > r.composition_of(prev, ind, "Q") and k > r.composition_of(prev, ind, "V")
    assert r.baselines["K"] == pytest.approx(1 / np.sqrt(128), rel=0.1)


def test_induction_head_copies_and_its_keys_carry_the_circuit(result_2l):
    r = result_2l
    assert r.stats["OV"]["copying"][r.at(r.induction_head)] >= 0.9
    i = r.sender_heads.index(r.prev_token_head)
    k, q, v = (r.path_patching[c][i] - r.clean_loss for c in ("k", "q", "v"))
    assert k > 0.5 and k > 3 * max(q, v)  # the previous-token head matters through the keys
    prev = r.at(r.prev_token_head)
    assert r.stats["QK positional"]["previous position"][prev] > 0.9  # from position alone, it looks one back


def test_direct_logit_attribution_credits_the_induction_head_on_the_repeated_half(result_2l):
    rep = result_2l.dla["repeated half"]
    heads_only = {k: v for k, v in rep.items() if k.startswith("L")}
    assert max(heads_only, key=heads_only.get) == result_2l.induction_head
    assert "text" in result_2l.dla and set(result_2l.dla["text"]) == set(rep)


def test_report_has_every_plot(result_2l):
    figs = figures(result_2l)
    for name in ("OV circuits", "QK circuits", "positional QK pattern", "K-composition", "Q-composition",
                 "V-composition", "direct logit attribution", "circuit statistics", "path patching"):
        assert name in figs, name
    assert "100 of 257 tokens" in figs["OV circuits"].layout.title.text
    assert len(figs["OV circuits"].data) == 8  # one per head, picked from a dropdown
    assert result_2l.metrics()["K_composition_ratio_to_baseline"] >= 1.3


def test_one_layer_model_has_no_composition_and_says_so():
    r = compute(workbench.load("attn-only-1l", device="cpu"), SMALL)
    assert r.prev_token_head is None and not r.sender_heads
    assert any("layer 0" in n for n in r.notes)
    figs = figures(r)
    assert "K-composition" not in figs and "notes" in figs


def test_runs_on_a_transformer_bridge(tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    r = compute(bridge, SMALL)
    assert r.stats["OV"]["copying"].shape == (2, 2) and r.composition["K"].shape == (2, 2, 2, 2)
    assert set(r.dla) == {"text", "repeated half"} and "MLP 1" in r.dla["text"]
    assert "positional QK pattern" in figures(r)


def test_a_large_vocabulary_is_sampled_with_a_note():
    model = workbench.Transformer(tiny_config(d_vocab=30_000, d_model=16, d_head=4)).eval()
    r = compute(model, replace(SMALL, max_rows=500))
    assert any("500 of 30,000 rows" in n for n in r.notes)
    assert r.ov_NTT.shape == (8, 100, 100)


def test_bad_heads_and_models_are_clear_errors(attn_model):
    with pytest.raises(InputError, match="out of range"):
        compute(attn_model, replace(SMALL, induction_head="L5H0"))
    with pytest.raises(InputError, match="earlier layer"):
        compute(attn_model, replace(SMALL, induction_head="L1H0", prev_token_head="L1H2"))
    with pytest.raises(InputError, match="no attention layers"):
        compute(NoAttention(), SMALL)
    with pytest.raises(ConfigError, match="max_rows"):
        CircuitsConfig(max_rows=0)


def test_chosen_heads_are_used(attn_model):
    r = compute(attn_model, replace(SMALL, induction_head="L1H2", prev_token_head="L0H3"))
    assert (r.induction_head, r.prev_token_head) == ("L1H2", "L0H3")
    assert "chosen induction head" in r.headlines()[0]
