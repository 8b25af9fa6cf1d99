"""The circuit-tracing study end to end: on a tiny model (transcoders trained and cached), on the shipped
models (slow), and the `workbench transcoder` commands."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import workbench
from analyses.circuit_tracing import CircuitTracingConfig
from tests.conftest import tiny_config
from workbench.cli import main
from workbench.compute.attribution_graph import load_graph
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.errors import ConfigError, InputError
from workbench.report.pipeline import run_analysis, write_report
from workbench.sae.transcoders import load_transcoders

QUICK = CircuitTracingConfig(prompts=("abcdefgh abcdefg",), n_tokens=40 * 2048, sae_tokens=10 * 2048, eval_rows=8,
                             d_tc=64, k=4, viewer_nodes=30, ablate=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "tiny-mlp"
    model = workbench.Transformer(tiny_config(d_mlp=64, n_ctx=32), tokenizer=TextCodec(byte_tokenizer()))
    workbench.save_model(model, folder)
    return folder


def test_the_study_trains_caches_traces_and_writes_reloadable_graphs(model_dir, tmp_path):
    section = run_analysis("circuit-tracing", workbench.load(model_dir, device="cpu"), QUICK)
    m = section.metrics
    assert m["transcoders"]["source"].startswith("trained now") and m["transcoders"]["width"] == 64
    assert len(m["transcoders"]["layers"]) == 2 and m["transcoders"]["with_errors_max_loss_change"] < 1e-5
    assert set(m["sae_comparison"]) >= {"layer", "transcoder", "sae"}
    (g,) = m["graphs"]
    assert g["identity_max_relative_error"] < 1e-3 and g["logit_max_error"] < 1e-4
    assert 0 <= g["replacement_score"] <= 1 and 0 <= g["completeness_score"] <= 1
    assert g["kept_nodes"] <= g["nodes"] and len(g["interventions"]) == 2
    assert {"transcoders", "transcoder vs SAE", "graph 1", "graph 1: interventions"} <= set(section.figures)
    out = write_report(tmp_path / "r", [section])
    json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    page = (out / "circuit-tracing.html").read_text()
    assert "wb-graph" in page and "@section-files@" not in page
    import re
    links = set(re.findall(r'"href": ?"([^"]+)"', page))
    assert links and all((out / link).exists() for link in links), links  # the viewer links the dashboards
    graph_dir = next((out / section.slug / "graphs").rglob("graph.json")).parent
    graph = load_graph(graph_dir, workbench.load(model_dir, device="cpu"))
    assert graph.n_features == g["features"]
    # the second run finds the transcoders in the cache instead of training again
    again = run_analysis("circuit-tracing", workbench.load(model_dir, device="cpu"), QUICK)
    assert again.metrics["transcoders"]["source"].startswith("trained earlier")
    assert again.metrics["graphs"][0]["kept_edges"] == g["kept_edges"]  # deterministic
    # circuit-tracer's node definitions: the same features, the logits demeaned, sources counted
    ct = run_analysis("circuit-tracing", workbench.load(model_dir, device="cpu"),
                      replace(QUICK, node_definitions="circuit-tracer", compare_sae=False)).metrics
    assert ct["node_definitions"] == "circuit-tracer" and ct["graphs"][0]["features"] == g["features"]
    assert ct["graphs"][0]["completeness_score"] != g["completeness_score"]
    with pytest.raises(ConfigError, match="node_definitions"):
        CircuitTracingConfig(node_definitions="neuronpedia")


def test_bad_settings_and_models_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="node_threshold"):
        CircuitTracingConfig(node_threshold=1.2)
    with pytest.raises(ConfigError, match="edge_threshold"):
        CircuitTracingConfig(edge_threshold=-0.1)
    attn = tmp_path / "attn"
    workbench.save_model(workbench.Transformer(tiny_config(), tokenizer=TextCodec(byte_tokenizer())), attn)
    with pytest.raises(InputError, match="attention-only.*SAE|sae"):
        run_analysis("circuit-tracing", workbench.load(attn, device="cpu"), QUICK)


def test_transcoder_train_and_export_commands(model_dir, tmp_path, capsys):
    out = tmp_path / "tc"
    args = ["transcoder", "train", "--model", str(model_dir), "--d-tc", "64", "--arch", "batchtopk", "--k", "4",
            "--skip", "--n-tokens", str(8 * 512), "--batch-size", "512", "--rows", "40", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    assert "transcoders.json" in capsys.readouterr().out
    tc = load_transcoders(out)
    assert tc.kind == "per-layer" and tc.width(0) == 64 and tc.per_layer[0].cfg.skip
    assert (out / "layer_0" / "log.jsonl").exists()
    assert main(args) == 2  # never overwrites a finished set
    assert "already holds" in capsys.readouterr().err
    assert main(["transcoder", "export", "--transcoders", str(out), "--out", str(tmp_path / "ct")]) == 0
    assert (tmp_path / "ct" / "layer_1.safetensors").exists() and (tmp_path / "ct" / "config.yaml").exists()
    clt = tmp_path / "clt"
    assert main(["transcoder", "train", "--model", str(model_dir), "--d-tc", "32", "--k", "4", "--cross-layer",
                 "--n-tokens", str(4 * 512), "--batch-size", "512", "--rows", "40", "--out", str(clt),
                 "--no-progress"]) == 0
    assert load_transcoders(clt).kind == "cross-layer"


@pytest.mark.slow
def test_the_shipped_models_graphs_show_induction_and_agree_with_causal_tracing():
    """The findings the report states, on the shipped models and transcoders (about 1 minute)."""
    gelu = run_analysis("circuit-tracing", workbench.load("gelu-2l", device="cpu"), CircuitTracingConfig()).metrics
    assert gelu["transcoders"]["source"].startswith("shipped")
    for g in gelu["graphs"]:
        assert g["finding"]["earlier_rank"] <= 2, g["finding"]  # the earlier occurrence's next token leads
        assert g["replacement_score"] > 0.5
    facts = run_analysis("circuit-tracing", workbench.load("facts", device="cpu"),
                         CircuitTracingConfig(compare_sae=False)).metrics
    for g in facts["graphs"]:
        assert g["finding"]["agree"], g["finding"]  # both put the answer at the last token, in the same early layers
        assert g["finding"]["correlation"] > 0.5, g["finding"]


@pytest.mark.slow
def test_auxk_keeps_dead_transcoder_features_under_five_percent_on_gelu_2l():
    """With AuxK (the default), fewer than 5% of a TopK transcoder's features are dead after training on
    gelu-2l; without it (aux_coefficient 0), more die."""
    from workbench.sae.training import SAETrainConfig, train_saes
    from workbench.sae.transcoders.training import _stream, make_transcoders

    model = workbench.load("gelu-2l", device="cpu")
    from workbench.cache.rows import training_text
    rows, _ = training_text(model, 600, 128)
    dead = {}
    for aux in (1 / 32, 0.0):
        d = make_transcoders(model, 512, "topk", k=16)
        d = {"layer_0": d["layer_0"]}
        import dataclasses
        d["layer_0"].cfg = dataclasses.replace(d["layer_0"].cfg, aux_coefficient=aux)
        cfg = SAETrainConfig(sae=d["layer_0"].cfg, n_tokens=300 * 1024, batch_size=1024, n_checkpoints=0,
                             dead_window=50_000)
        logs = train_saes(d, _stream(model, rows, 1024, 0), cfg, progress=False)
        dead[aux] = logs["layer_0"][-1]["dead_fraction"]
    assert dead[1 / 32] < 0.05, dead
    assert dead[0.0] > dead[1 / 32], dead
