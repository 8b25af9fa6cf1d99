"""The attention and graph viewers' data: exact where they must be."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

from workbench.report.widgets import attention_viewer, graph_viewer


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


def _graph() -> dict:
    """Two tokens, one layer: both embeddings, a feature, an error node and a logit."""
    node = {"activation": 1.0, "influence": 0.0, "node_cut": 0.0, "href": None, "examples": []}
    return {"tokens": ["The", " cat"], "n_layers": 1, "node_threshold": 0.8, "edge_threshold": 0.98, "nodes": [
        {**node, "id": 0, "kind": "embedding", "layer": -1, "pos": 0, "label": "The"},
        {**node, "id": 1, "kind": "embedding", "layer": -1, "pos": 1, "label": " cat"},
        {**node, "id": 7, "kind": "feature", "layer": 0, "pos": 1, "label": "cats </script><!--<script>",
         "activation": 2.5, "influence": 0.25, "node_cut": 0.3, "href": "features/7.html",
         "examples": [["a </script> cat", 3.0], ["dogs & cats", 1.5]]},
        {**node, "id": 8, "kind": "error", "layer": 0, "pos": 1, "label": "error", "node_cut": 0.9},
        {**node, "id": 9, "kind": "logit", "layer": 1, "pos": 1, "label": "' sat' (p=0.4)"}],
        "edges": [[0, 7, 0.5, 0.1], [1, 7, -1.25, 0.5], [7, 9, 2.0, 0.0], [8, 9, 0.125, 0.99]]}


def _payload_of(widget) -> dict:
    return json.loads(re.search(r"<script type='application/json' class='wb-data'>(.*?)</script>",
                                widget.html).group(1).replace("<\\/", "</"))


def test_the_graph_viewer_carries_the_graph_unchanged():
    widget = graph_viewer(_graph(), "a <graph>", "what to look for")
    assert _payload_of(widget) == _graph()
    assert widget.html.startswith("<div class='wb-graph' id='graph-") and "a &lt;graph&gt;" in widget.html
    assert widget.caption == "what to look for"
    assert widget.html == graph_viewer(_graph(), "a <graph>", "c").html  # a deterministic id
    assert re.search(r"id='([^']+)'", widget.html).group(1) != re.search(
        r"id='([^']+)'", graph_viewer(_graph(), "another", "c").html).group(1)


def test_a_label_cannot_close_the_graph_viewers_script_tag():
    widget = graph_viewer(_graph(), "t", "c")
    assert widget.html.count("</script>") == 1 and "<!--" not in widget.html
    assert _payload_of(widget)["nodes"][2]["label"] == "cats </script><!--<script>"
    assert _payload_of(widget)["nodes"][2]["examples"][0][0] == "a </script> cat"


def test_the_graph_viewer_fills_in_optional_keys_and_takes_numpy_numbers():
    g = _graph()
    del g["nodes"][0]["href"], g["nodes"][0]["examples"], g["node_threshold"], g["edge_threshold"]
    g["nodes"][2]["activation"], g["edges"][0] = np.float32(2.5), [np.int64(0), np.int64(7), np.float64(0.5), 0.1]
    data = _payload_of(graph_viewer(g, "t", "c"))
    assert data == _graph()


@pytest.mark.parametrize("break_it, message", [
    (lambda g: g["edges"].append([7, 99, 1.0, 0.0]), r"edge 4 \(7 -> 99\) has target node 99, which is not in nodes"),
    (lambda g: g["nodes"][2].pop("node_cut"), r"node 2 \(id 7\) lacks \['node_cut'\]"),
    (lambda g: g.pop("edges"), r"data lacks \['edges'\]"),
    (lambda g: g["nodes"][3].update(kind="transcoder"), "node 8 has kind 'transcoder'"),
    (lambda g: g["nodes"][2].update(layer=1), r"node 7 \(feature\) is at layer 1"),
    (lambda g: g["nodes"][4].update(pos=2), "node 9 is at position 2, outside the 2 tokens"),
    (lambda g: g["nodes"][3].update(id=7), "node id 7 appears twice"),
    (lambda g: g["edges"][0].__setitem__(2, float("nan")), "edge 0's weight is nan"),
    (lambda g: g["edges"][0].pop(), r"edge 0 is \[0, 7, 0.5\]"),
])
def test_a_malformed_graph_is_refused_with_a_clear_message(break_it, message):
    g = _graph()
    break_it(g)
    with pytest.raises(ValueError, match="graph_viewer: " + message):
        graph_viewer(g, "t", "c")
