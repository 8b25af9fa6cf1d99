"""The one-line viewers: each shows the model's own numbers, on a workbench model and on a
TransformerBridge, and refuses what it cannot show with a clear error."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

import workbench
from workbench.adapter.tokens import token_strings
from workbench.compute.lens import logit_lens
from workbench.errors import InputError
from workbench.report import show_attention, show_feature, show_graph, show_logit_lens
from workbench.report.scripts import PAGE
from workbench.sae.modules import SAEConfig, make_sae


@pytest.fixture(autouse=True)
def _fresh_page():
    PAGE.forget()
    yield
    PAGE.forget()


def _payload(widget) -> dict:
    text = re.search(r"<script type='application/json' class='wb-data'>(.*?)</script>", widget.html, re.S).group(1)
    return json.loads(text.replace("<\\/", "</"))


def _patterns(model, tokens_1S: torch.Tensor) -> np.ndarray:
    _, cache = model.run_with_cache(tokens_1S, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    return torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(model.cfg.n_layers)]).numpy()


@pytest.fixture(params=["workbench", "bridge"])
def model(request, attn_model, tiny_gpt2):
    return attn_model if request.param == "workbench" else workbench.load(f"hf:{tiny_gpt2}", device="cpu")


def test_the_attention_viewer_shows_the_models_patterns(model):
    text = "the cat sat on the mat"
    tokens = model.to_tokens(text)
    data = _payload(show_attention(model, text, layer=1))
    S = tokens.shape[1]
    tri = np.frombuffer(base64.b64decode(data["tril"]), dtype=np.uint8).reshape(1, data["H"], -1) / 255
    rows, cols = np.tril_indices(S)
    assert np.abs(tri - _patterns(model, tokens)[1:, :, rows, cols]).max() <= 0.5 / 255 + 1e-6
    assert data["tokens"] == token_strings(model, tokens[0]) and data["layers"] == ["layer 1"]
    every = _payload(show_attention(model, tokens[0]))  # token ids work too; every layer by default
    assert every["L"] == model.cfg.n_layers and every["tokens"] == data["tokens"]


def test_the_logit_lens_shows_each_layers_top_prediction(model):
    text = "the cat sat on the mat"
    widget = show_logit_lens(model, text)
    assert widget.needs == ("widgets", "plotly") and widget.caption.startswith("Each row reads")
    heatmap = _payload(widget)["figure"]["data"][0]
    lens = logit_lens(model, model.to_tokens(text), k=1)
    assert heatmap["y"] == lens.readouts == ["embed", *(f"after L{l}" for l in range(model.cfg.n_layers))]
    assert heatmap["text"] == [token_strings(model, row.tolist()) for row in lens.top_ids_RSK[..., 0]]


def test_a_feature_card_shows_where_the_feature_fires(attn_model):
    sae = make_sae(SAEConfig(d_in=32, d_sae=8, architecture="relu", hook_name="blocks.0.hook_resid_post"), seed=0)
    rows = torch.randint(0, 257, (6, 12), generator=torch.Generator().manual_seed(0))
    _, cache = attn_model.run_with_cache(rows, names_filter="blocks.0.hook_resid_post")
    acts = sae.encode(cache["blocks.0.hook_resid_post"])[:, 1:, 3].detach()  # position 0 is never counted
    card = show_feature(attn_model, sae, 3, tokens=rows)
    assert card.html.startswith("<div class='wb-feature'>") and "Feature 3 of 8" in card.html
    shown = [float(a) for a in re.findall(r"<div class='ctx'><b>([-\d.]+)</b>", card.html)]
    assert shown and shown[0] == pytest.approx(float(acts.max()), abs=0.006)
    assert "data-act=" in card.html and "6 rows of 12 tokens" in card.caption
    with pytest.raises(InputError, match="latents 0–7"):
        show_feature(attn_model, sae, 8, tokens=rows)


def test_the_graph_viewer_takes_a_graph_or_its_payload():
    node = {"activation": 1.0, "influence": 0.5, "node_cut": 0.0}
    data = {"tokens": ["a", "b"], "n_layers": 1, "edges": [[0, 1, 0.5, 0.0]], "nodes": [
        {**node, "id": 0, "kind": "embedding", "layer": -1, "pos": 0, "label": "a"},
        {**node, "id": 1, "kind": "logit", "layer": 1, "pos": 1, "label": "' c'"}]}
    widget = show_graph(data)
    assert _payload(widget)["edges"] == data["edges"] and "attribution graph: &#x27;ab&#x27;" in widget.html
    with pytest.raises(InputError, match="AttributionGraph"):
        show_graph([data])


def test_what_a_viewer_cannot_show_is_refused_clearly(attn_model):
    with pytest.raises(InputError, match="one prompt"):
        show_attention(attn_model, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(InputError, match="reads at most 24"):
        show_attention(attn_model, torch.zeros(30, dtype=torch.long))
    with pytest.raises(InputError, match="layers 0–1"):
        show_attention(attn_model, "abc", layer=2)
    attn_model.tokenizer = None
    with pytest.raises(InputError, match="no tokenizer"):
        show_logit_lens(attn_model, "abc")
