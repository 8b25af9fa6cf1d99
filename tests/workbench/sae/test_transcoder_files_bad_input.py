"""Damaged or foreign transcoder sets and graph files, impossible widths and a model whose output is not
finite: each ends in a clear WorkbenchError (or `error: ...` and exit 2 from the command), never a
traceback and never a silent load. And one rule for a text prompt: the model's BOS comes first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import workbench
from tests.conftest import tiny_config
from workbench.adapter import describe
from workbench.artifacts import TRANSCODERS_MANIFEST
from workbench.cache.rows import special_ids
from workbench.cli import main
from workbench.compute.attribution_graph import build_graph, load_graph, save_graph
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.errors import CheckpointError, InputError, WorkbenchError
from workbench.model.transformer import Transformer
from workbench.sae.transcoders import (
    as_transcoders,
    load_transcoders,
    make_transcoders,
)

PROMPT = "def f(x): return f(x"


def _model(**overrides) -> Transformer:
    return Transformer(tiny_config(d_mlp=64, n_ctx=32, **overrides), tokenizer=TextCodec(byte_tokenizer())).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _model()


@pytest.fixture(scope="module")
def tc(model):
    return as_transcoders(make_transcoders(model, 64, "topk", k=4), 2, "")


@pytest.fixture(scope="module")
def tc_folder(tc, tmp_path_factory) -> Path:
    return tc.save(tmp_path_factory.mktemp("tc") / "set")


@pytest.fixture(scope="module")
def graph(model, tc):
    return build_graph(model, tc, PROMPT, progress=False)


# -- transcoders.json ------------------------------------------------------------------------------
REMOVE = object()


def _manifest_copy(tc_folder: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the set whose transcoders.json has `changes` (REMOVE takes a key out)."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tc_folder, folder)
    manifest = json.loads((folder / TRANSCODERS_MANIFEST).read_text())
    for key, value in changes.items():
        if value is REMOVE:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (folder / TRANSCODERS_MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("changes, match", [
    ({"n_layers": REMOVE}, "n_layers"),
    ({"n_layers": "two"}, "n_layers"),
    ({"n_layers": 3}, "layers"),
    ({"folders": {"zero": "layer_0", "1": "layer_1"}}, "layer"),
    ({"folders": {"0": "layer_0", "1": "layer_1", "7": "layer_1"}}, "layer"),
    ({"folders": None}, "folders"),
    ({"folders": ["layer_0", "layer_1"]}, "folders"),
    ({"folders": {"0": 5, "1": "layer_1"}}, "folder"),
    ({"model_name": 12}, "model_name"),
    ({"type": "sideways"}, "type"),
], ids=["no n_layers", "string n_layers", "n_layers beyond the folders", "non-integer layer key", "an extra layer",
        "folders null", "folders a list", "a folder that is not text", "model_name not text", "unknown type"])
def test_a_damaged_manifest_is_refused(tc_folder, tmp_path, changes, match):
    folder = _manifest_copy(tc_folder, tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_transcoders(folder)


@pytest.mark.parametrize("where", ["../x", "/etc", "layer_0/../../x", ""])
def test_a_manifest_folder_outside_the_set_is_refused(tc_folder, tmp_path, where):
    (tmp_path / "x").mkdir()
    folder = _manifest_copy(tc_folder, tmp_path, folders={"0": where, "1": "layer_1"})
    with pytest.raises(CheckpointError, match="inside"):
        load_transcoders(folder)


def test_the_command_says_error_for_a_damaged_manifest(tc_folder, tmp_path, capsys):
    folder = _manifest_copy(tc_folder, tmp_path, n_layers=None)
    assert main(["transcoder", "export", "--transcoders", str(folder), "--out", str(tmp_path / "ct")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# -- the model's name ------------------------------------------------------------------------------
def test_transcoders_of_another_model_of_the_same_shape_are_refused(model, tc):
    from workbench.adapter.provenance import model_name_of  # the one reader of a model's name

    other = as_transcoders({f"layer_{l}": m for l, m in enumerate(tc.modules())}, 2, "gpt2")
    named = _model()
    named.folder = Path("/somewhere/gelu-2l")
    assert model_name_of(named) == "gelu-2l" and model_name_of(model) == ""
    with pytest.raises(InputError, match="'gpt2'.*'gelu-2l'"):
        other.check_model(named)
    with pytest.raises(InputError, match="gpt2"):
        build_graph(named, other, PROMPT, progress=False)
    other.check_model(model)  # a model with no name: only the shapes can be checked
    tc.check_model(named)  # a set with no name likewise
    for same in ("gelu-2l", "hf:gelu-2l", "hf_gelu-2l", "someone/gelu-2l", "/models/gelu-2l"):
        as_transcoders({f"layer_{l}": m for l, m in enumerate(tc.modules())}, 2, same).check_model(named)


# -- the trainer's input ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("m") / "tiny-mlp"
    workbench.save_model(_model(), folder)
    return folder


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("m") / "tiny-nan"
    m = _model()
    with torch.no_grad():
        m.unembed.W_U.fill_(float("nan"))
    workbench.save_model(m, folder)
    return folder


def _train(model_dir: Path, *extra: str) -> list[str]:
    return ["transcoder", "train", "--model", str(model_dir), "--k", "4", "--n-tokens", "1024", "--batch-size", "512",
            "--rows", "8", "--no-progress", "--device", "cpu", *extra]


@pytest.mark.parametrize("extra, match", [
    (["--d-tc", "0"], "--d-tc"),
    (["--d-tc", "-8"], "--d-tc"),
    (["--expansion", "0"], "--expansion"),
    (["--d-tc", str(10 ** 12)], "memory"),
])
def test_an_impossible_width_is_refused_before_training(model_dir, tmp_path, capsys, extra, match):
    assert main(_train(model_dir, "--out", str(tmp_path / "tc"), *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
    assert not (tmp_path / "tc").exists()


def test_make_transcoders_refuses_a_width_that_cannot_fit_in_memory(model):
    with pytest.raises(InputError, match="memory"):
        make_transcoders(model, 10 ** 12)


def test_an_output_folder_that_is_a_file_is_refused(model_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        assert main(_train(model_dir, "--d-tc", "64", "--out", str(out))) == 2
        assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_model_whose_output_is_not_finite_is_refused(nan_model_dir, tmp_path, capsys):
    with pytest.raises(WorkbenchError, match="not finite"):
        describe(workbench.load(nan_model_dir, device="cpu"))
    assert main(_train(nan_model_dir, "--d-tc", "64", "--out", str(tmp_path / "tc"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not finite" in err


# -- graph files -----------------------------------------------------------------------------------
def _damage(graph, folder: Path, meta=None, tensors=None, raw_meta=None) -> Path:
    """Save `graph`, then change graph.json (`meta(dict) -> dict`, or `raw_meta` as the whole file) and
    graph.safetensors (`tensors(dict) -> dict`)."""
    save_graph(graph, folder)
    meta_path, tensor_path = folder / "graph.json", folder / "graph.safetensors"
    if raw_meta is not None:
        meta_path.write_text(raw_meta)
    if meta is not None:
        meta_path.write_text(json.dumps(meta(json.loads(meta_path.read_text()))))
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors(dict(load_file(str(tensor_path)))).items()}, str(tensor_path))
    return folder


def _adjacency_nan(t):
    if "adjacency" in t:
        t["adjacency"] = t["adjacency"].clone()
        t["adjacency"][-1, 0] = float("nan")
    else:
        t["adjacency_values"] = t["adjacency_values"].clone()
        t["adjacency_values"][0] = float("nan")
    return t


def _features(column: int, value: int):
    def change(t):
        f = t["features"].clone()
        f[0, column] = value
        return {**t, "features": f}
    return change


DAMAGE = {
    "a JSON list": dict(raw_meta="[1, 2, 3]"),
    "a string format_version": dict(meta=lambda m: {**m, "format_version": "2"}),
    "token_strs shorter than tokens": dict(meta=lambda m: {**m, "token_strs": m["token_strs"][:-1]}),
    "a string n_layers": dict(meta=lambda m: {**m, "n_layers": "2"}),
    "a negative n_layers": dict(meta=lambda m: {**m, "n_layers": -1}),
    "tokens that are not integers": dict(meta=lambda m: {**m, "tokens": [str(t) for t in m["tokens"]]}),
    "tokens that are floats": dict(meta=lambda m: {**m, "tokens": [t + 0.5 for t in m["tokens"]]}),
    "negative tokens": dict(meta=lambda m: {**m, "tokens": [-1] + m["tokens"][1:]}),
    "tokens not a list": dict(meta=lambda m: {**m, "tokens": 5}),
    "a model_name that is not text": dict(meta=lambda m: {**m, "model_name": 3}),
    "meta not an object": dict(meta=lambda m: {**m, "meta": [1]}),
    "logits_clean that are not numbers": dict(meta=lambda m: {**m, "meta": {**m["meta"], "logits_clean": ["a"]}}),
    "logit_strs of the wrong length": dict(meta=lambda m: {**m, "meta": {**m["meta"], "logit_strs": []}}),
    "float features": dict(tensors=lambda t: {**t, "features": t["features"].float()}),
    "features of the wrong shape": dict(tensors=lambda t: {**t, "features": t["features"][:, :2]}),
    "activations of the wrong length": dict(tensors=lambda t: {**t, "activations": t["activations"][:-1]}),
    "integer activations": dict(tensors=lambda t: {**t, "activations": t["activations"].long()}),
    "float logit_tokens": dict(tensors=lambda t: {**t, "logit_tokens": t["logit_tokens"].float()}),
    "logit_probs of the wrong length": dict(tensors=lambda t: {**t, "logit_probs": t["logit_probs"][:-1]}),
    "bias of the wrong length": dict(tensors=lambda t: {**t, "bias": t["bias"][:-1]}),
    "values of two dimensions": dict(tensors=lambda t: {**t, "values": t["values"][None]}),
    "a float edge index": dict(tensors=lambda t: {**t, "adjacency_index": t["adjacency_index"].float()}
                               if "adjacency_index" in t else {**t, "adjacency": t["adjacency"].long()}),
    "a NaN adjacency": dict(tensors=_adjacency_nan),
    "a NaN bias": dict(tensors=lambda t: {**t, "bias": torch.full_like(t["bias"], float("nan"))}),
    "a feature layer beyond n_layers": dict(tensors=_features(0, 2)),
    "a feature position beyond the prompt": dict(tensors=_features(1, 99)),
    "a negative feature id": dict(tensors=_features(2, -1)),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_graph_file_is_refused_at_load(graph, tmp_path, case):
    assert graph.n_features > 0
    folder = _damage(graph, tmp_path / "g", **DAMAGE[case])
    with pytest.raises(CheckpointError):
        load_graph(folder)


def test_an_intact_graph_still_loads(graph, tmp_path):
    back = load_graph(_damage(graph, tmp_path / "g"))
    assert torch.equal(back.adjacency, graph.adjacency) and back.token_strs == graph.token_strs


# -- a text prompt gets the model's BOS ------------------------------------------------------------
def test_a_text_prompt_gets_the_bos_and_the_same_graph_as_its_token_ids(model, tc):
    bos, _ = special_ids(model)
    assert bos is not None
    ids = model.tokenizer.encode(PROMPT)
    from_text = build_graph(model, tc, PROMPT, progress=False)
    from_ids = build_graph(model, tc, torch.tensor([[bos] + ids]), progress=False)
    assert from_text.tokens == [bos] + ids == from_ids.tokens
    assert torch.equal(from_text.adjacency, from_ids.adjacency)
    assert torch.equal(from_text.features, from_ids.features)
