"""The logit lens and the attention viewer's data: exact where they must be."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

import workbench
from workbench.lens import LensMismatchError, logit_lens
from workbench.widgets import attention_viewer


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


def test_the_attention_viewer_carries_every_weight_to_one_255th(attn_model, tokens):
    _, cache = attn_model.run_with_cache(tokens[:1], names_filter=lambda n: n.endswith("hook_pattern"))
    patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(2)]).numpy()
    S = patterns.shape[-1]
    widget = attention_viewer([f"t{i}" for i in range(S)], patterns, "a <prompt>", "what to look for")
    data = json.loads(re.search(r"<script type='application/json' class='wb-data'>(.*?)</script>",
                                widget.html).group(1).replace("<\\/", "</"))
    tri = np.frombuffer(base64.b64decode(data["tril"]), dtype=np.uint8).reshape(2, 4, -1) / 255
    rows, cols = np.tril_indices(S)
    assert np.abs(tri - patterns[:, :, rows, cols]).max() <= 0.5 / 255 + 1e-9
    assert data["tokens"][3] == "t3" and "a &lt;prompt&gt;" in widget.html and widget.caption == "what to look for"
    with pytest.raises(ValueError, match="do not match"):
        attention_viewer(["x"], patterns, "t", "c")
