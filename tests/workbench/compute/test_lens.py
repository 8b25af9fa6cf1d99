"""The logit lens: exact where it must be, refused where it cannot be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from workbench.compute.lens import LensMismatchError, logit_lens


def test_the_lens_after_the_last_layer_is_the_models_own_prediction(mlp_model, tokens):
    lens = logit_lens(mlp_model, tokens[:1])
    probs = mlp_model(tokens[:1])[0].softmax(-1)
    assert lens.readouts == ["embed", "after L0", "after L1"] and lens.max_error < 1e-5
    assert np.allclose(lens.top_probs_RSK[-1, :, 0], probs.max(-1).values.detach().numpy(), atol=1e-6)
    nxt = probs[:-1].gather(-1, tokens[0, 1:, None])[:, 0].detach().numpy()
    assert np.allclose(lens.next_prob_RS[-1, :-1], nxt, atol=1e-6) and np.isnan(lens.next_prob_RS[-1, -1])


def test_the_lens_reads_a_transformer_bridge(tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    lens = logit_lens(bridge, torch.tensor([[5, 17, 30, 2, 9]]))
    assert lens.top_ids_RSK.shape == (3, 5, 5) and lens.max_error < 1e-3


def test_a_lens_that_does_not_reproduce_the_logits_is_refused(attn_model, tokens, monkeypatch):
    real = attn_model.run_with_cache

    def softcapped(*args, **kwargs):  # as if the model changed its logits after the unembedding
        logits, cache = real(*args, **kwargs)
        return 30 * torch.tanh(logits / 30), cache

    monkeypatch.setattr(attn_model, "run_with_cache", softcapped)
    with pytest.raises(LensMismatchError, match="does not reproduce its logits"):
        logit_lens(attn_model, tokens[:1])
