"""The circuit-tracing study against what goes wrong: a transcoder training into its cache that was
interrupted (Ctrl-C, a kill, a run it cannot continue), transcoders of another model of the same shape,
a model whose output is not finite; and one meaning for a text prompt, with the BOS the default
prompts have."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import workbench
from analyses.circuit_tracing import CircuitTracingConfig, default_prompts
from tests.conftest import signal_on_call, tiny_config
from workbench.artifacts import TRANSCODERS_MANIFEST
from workbench.cache.rows import special_ids
from workbench.cli import main
from workbench.compute.attribution_graph import build_graph
from workbench.config import field_docs
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.sae.transcoders import as_transcoders, make_transcoders

SETTINGS = dict(prompts=("abcdefgh abcdefg",), n_tokens=12 * 2048, compare_sae=False, eval_rows=8, d_tc=64, k=4,
                viewer_nodes=20, ablate=1, dashboard_features=4)


def _args(model_dir, out, seed: int, **changes) -> list[str]:
    """`workbench run circuit-tracing` with SETTINGS (and `changes`); each test its own seed, so its own cache."""
    args = ["run", "circuit-tracing", "--model", str(model_dir), "--device", "cpu", "--out", str(out),
            "--seed", str(seed)]
    for key, value in {**SETTINGS, **changes}.items():
        flag = "--" + key.replace("_", "-")
        args += [flag, *value] if isinstance(value, tuple) else [flag, str(value).lower() if isinstance(value, bool)
                                                                 else str(value)]
    return args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "tiny-mlp"
    workbench.save_model(workbench.Transformer(tiny_config(d_mlp=64, n_ctx=32), tokenizer=TextCodec(byte_tokenizer())),
                         folder)
    return folder


def _cache(model_dir, seed: int):
    from analyses.circuit_tracing import cache_folder

    return cache_folder(workbench.load(model_dir, device="cpu"), CircuitTracingConfig(**SETTINGS, seed=seed))


def test_ctrl_c_in_the_cached_training_exits_130_and_the_next_run_continues_it(model_dir, tmp_path, capsys):
    from workbench.sae.training import _Trainer

    with pytest.MonkeyPatch.context() as mp:
        signal_on_call(mp, _Trainer, "train_step", call=5)  # two layers: Ctrl-C during step 3 of 12
        assert main(_args(model_dir, tmp_path / "r1", seed=11)) == 130
    err = capsys.readouterr().err
    cached = _cache(model_dir, 11)
    assert str(cached) in err and not (cached / TRANSCODERS_MANIFEST).exists()
    assert main(_args(model_dir, tmp_path / "r2", seed=11)) == 0
    err = capsys.readouterr().err
    assert str(cached) in err and "ontinu" in err
    assert (cached / TRANSCODERS_MANIFEST).exists()
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert str(cached) in json.dumps(metrics)
    log = [json.loads(line) for line in (cached / "layer_0" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == sorted({r["step"] for r in log}) and log[-1]["step"] == 12  # resumed, not redone


@pytest.mark.slow  # kills and resumes cached training (about 8 s)
def test_a_killed_or_stale_run_in_the_cache_is_continued_or_restarted(model_dir, tmp_path, capsys):
    killed = _cache(model_dir, 12)  # a kill -9 before the first checkpoint: a log and nothing else
    (killed / "layer_0").mkdir(parents=True)
    (killed / "layer_0" / "log.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    assert main(_args(model_dir, tmp_path / "r1", seed=12)) == 0
    assert (killed / TRANSCODERS_MANIFEST).exists()
    stale = _cache(model_dir, 13)  # a checkpoint from other settings (an older workbench): cannot be continued
    for layer in (0, 1):
        step = stale / f"layer_{layer}" / "checkpoints" / "step_3"
        step.mkdir(parents=True)
        (step / "config.json").write_text(json.dumps({"step": 3, "train": {"n_tokens": 1}}))
    assert main(_args(model_dir, tmp_path / "r2", seed=13)) == 0
    assert (stale / TRANSCODERS_MANIFEST).exists() and "afresh" in capsys.readouterr().err


def test_transcoders_of_another_model_of_the_same_shape_are_refused(model_dir, tmp_path, capsys):
    model = workbench.load(model_dir, device="cpu")
    as_transcoders(make_transcoders(model, 64, "topk", k=4), 2, "gpt2").save(tmp_path / "tc")
    assert main(_args(model_dir, tmp_path / "r", seed=0, transcoders=str(tmp_path / "tc"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'gpt2'" in err and "'tiny-mlp'" in err
    as_transcoders(make_transcoders(model, 64, "topk", k=4), 2, "tiny-mlp").save(tmp_path / "own")
    from analyses.circuit_tracing import get_transcoders
    tc, _ = get_transcoders(model, CircuitTracingConfig(transcoders=str(tmp_path / "own")))
    assert tc.model_name == "tiny-mlp"


def test_a_model_whose_output_is_not_finite_is_refused(tmp_path, capsys):
    m = workbench.Transformer(tiny_config(d_mlp=64, n_ctx=32), tokenizer=TextCodec(byte_tokenizer()))
    with torch.no_grad():
        m.unembed.W_U.fill_(float("nan"))
    workbench.save_model(m, tmp_path / "nan")
    assert main(_args(tmp_path / "nan", tmp_path / "r", seed=0)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not finite" in err


def test_a_text_prompt_means_what_the_default_prompt_of_the_same_text_means(model_dir):
    model = workbench.load(model_dir, device="cpu")
    cfg = dataclasses.replace(CircuitTracingConfig(**SETTINGS), prompts=())
    kind, toks, _ = default_prompts(model, cfg)[0]
    assert kind == "induction" and int(toks[0]) == special_ids(model)[0]  # the default prompt starts with the BOS
    text = model.tokenizer.decode(toks[1:].tolist())  # what a user types with --prompts
    tc = as_transcoders(make_transcoders(model, 64, "topk", k=4), 2, "tiny-mlp")
    given, default = build_graph(model, tc, text, progress=False), build_graph(model, tc, toks, progress=False)
    assert given.tokens == toks.tolist() == default.tokens
    assert torch.equal(given.adjacency, default.adjacency) and torch.equal(given.features, default.features)
    assert "BOS" in field_docs(CircuitTracingConfig)["prompts"]
