"""The one reader of token strings: readable for every tokenizer kind, the id for a model without one."""

from __future__ import annotations

import torch

import workbench
from workbench.adapter.tokens import token_strings


def test_a_model_without_a_tokenizer_shows_each_id_as_its_number(attn_model):
    attn_model.tokenizer = None
    assert token_strings(attn_model, torch.tensor([[3, 0, 17]])) == ["3", "0", "17"]


def test_a_shipped_model_shows_escaped_text_and_a_bridge_its_byte_level_bpe(tiny_gpt2):
    model = workbench.load("attn-only-2l", device="cpu")
    ids = model.tokenizer.encode("def f(x):\n    return x")
    strings = token_strings(model, ids)
    assert "".join(strings).replace("\\n", "\n") == "def f(x):\n    return x"
    assert all("\n" not in s for s in strings)
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    bridge_ids = bridge.tokenizer("a\nb")["input_ids"]
    assert token_strings(bridge, torch.tensor(bridge_ids))[-3:] == ["a", "\\n", "b"]
