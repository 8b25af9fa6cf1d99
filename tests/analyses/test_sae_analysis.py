"""The SAE study end to end on a tiny model, and the `workbench sae` commands."""

from __future__ import annotations

import json

import pytest

import workbench
from analyses.sae import SAEAnalysisConfig, compute
from tests.conftest import tiny_config
from workbench.cli import main
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.errors import ConfigError, InputError
from workbench.report.pipeline import run_analysis, write_report
from workbench.sae import ActivationStore, load_sae

QUICK = SAEAnalysisConfig(hook="blocks.1.hook_resid_post", saes=("topk:4", "relu:1", "jumprelu:1"), dashboard="topk:4",
                          dashboard_features=8, n_tokens=40 * 256, batch_size=256, train_rows=24, eval_rows=20,
                          seq_len=24, expansion=2, ground_truth_steps=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "tiny"
    model = workbench.Transformer(tiny_config(), tokenizer=TextCodec(byte_tokenizer()))
    workbench.save_model(model, folder)
    return folder


@pytest.mark.slow  # trains SAEs and dashboards (about 10 s)
def test_report_section_has_metrics_frontier_and_linked_dashboards(model_dir, tmp_path):
    section = run_analysis("sae", workbench.load(model_dir, device="cpu"), QUICK)
    assert set(section.metrics["saes"]) == {"topk:4", "relu:1", "jumprelu:1"}
    for m in section.metrics["saes"].values():
        assert 0 <= m["dead_fraction"] <= 1 and m["l0"] > 0 and "ce_loss_recovered_zero" in m and "kl_div" in m
    assert section.metrics["saes"]["topk:4"]["l0"] == pytest.approx(4, abs=0.01)
    assert {"metrics", "training FVU", "L0–FVU frontier", "latent density", "known features"} <= set(section.figures)
    truth = section.metrics["ground_truth"]
    assert truth["topk 0.5×"]["mmcs"] < truth["topk 1×"]["mmcs"]  # half a dictionary cannot hold 128 features
    out = write_report(tmp_path / "r", [section])
    assert (out / section.slug / "dashboards" / "index.html").exists()
    assert f"{section.slug}/dashboards/index.html" in (out / "sae.html").read_text()  # linked from its page


def test_bad_settings(model_dir):
    with pytest.raises(InputError, match="architecture:value"):
        SAEAnalysisConfig(saes=("topk",))
    with pytest.raises(ConfigError, match="dashboard"):
        SAEAnalysisConfig(saes=("topk:8",), dashboard="relu:1")
    from dataclasses import replace

    with pytest.raises(workbench.HookNameError, match="Did you mean"):
        compute(workbench.load(model_dir, device="cpu"), replace(QUICK, hook="blocks.1.hook_resid_pots"))


def test_sae_commands_train_cache_and_train_from_a_store(model_dir, tmp_path, capsys):
    common = ["--model", str(model_dir), "--hook", "blocks.0.hook_resid_post", "--rows", "30", "--seq-len", "24",
              "--no-progress"]
    assert main(["sae", "train", *common, "--arch", "topk", "--k", "4", "--d-sae", "64", "--n-tokens", "5120",
                 "--batch-size", "256", "--out", str(tmp_path / "sae")]) == 0
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.k == 4 and sae.d_in == 32 and sae.cfg.hook_name == "blocks.0.hook_resid_post"
    assert (tmp_path / "sae" / "log.jsonl").exists()
    assert main(["sae", "cache", *common, "--n-tokens", "3000", "--out", str(tmp_path / "store")]) == 0
    assert ActivationStore(tmp_path / "store").n_tokens == 3000
    config = {"sae": {"architecture": "relu", "l1_coefficient": 0.5}, "n_tokens": 2560, "batch_size": 256}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["sae", "train", "--store", str(tmp_path / "store"), "--hook", "blocks.0.hook_resid_post",
                 "--config", str(tmp_path / "c.json"), "--d-sae", "64", "--out", str(tmp_path / "sae2"),
                 "--no-progress"]) == 0
    assert load_sae(tmp_path / "sae2").cfg.arch == "relu"
    assert main(["sae", "train", *common, "--arch", "topk", "--k", "4", "--d-sae", "64", "--n-tokens", "5120",
                 "--batch-size", "256", "--out", str(tmp_path / "sae")]) == 2  # never overwrites a trained SAE
    assert "already holds" in capsys.readouterr().err


def test_on_a_cpu_a_wide_stream_gets_fewer_tokens_with_a_note_and_a_gpu_gets_them_all():
    import torch

    from analyses.sae import token_budget

    cfg = SAEAnalysisConfig()
    assert token_budget(cfg, 64, torch.device("cpu")) == (1_000_000, None)  # the shipped gelu-2l: no cap
    n, note = token_budget(cfg, 768, torch.device("cpu"))  # GPT-2 small's residual stream
    assert n % cfg.batch_size == 0 and 8 * cfg.batch_size <= n < 100_000
    assert "1,000,000" in note and "cpu_flop_budget" in note and "GPU" in note
    assert 12 * 768 * 8 * 768 * len(cfg.saes) * n <= cfg.cpu_flop_budget
    assert token_budget(cfg, 768, torch.device("cuda")) == (1_000_000, None)
    assert token_budget(SAEAnalysisConfig(cpu_flop_budget=0.0), 768, torch.device("cpu")) == (1_000_000, None)
    with pytest.raises(ConfigError, match="cpu_flop_budget"):
        SAEAnalysisConfig(cpu_flop_budget=-1.0)


def test_activations_stop_the_forward_pass_at_the_last_hook_they_need(model_dir, monkeypatch):
    """model_activations ends the forward pass once its hooks have fired: the same numbers, and the
    later blocks and the unembedding never run."""
    import torch

    from workbench.cache.activations import model_activations
    from workbench.cache.collect import run_collect

    model = workbench.load(str(model_dir), device="cpu")
    tokens = torch.randint(0, 256, (2, 12))
    _, full = run_collect(model, tokens, ["blocks.0.hook_resid_post"])
    calls = []
    monkeypatch.setattr(model.unembed, "forward", lambda *a, **k: calls.append(1))
    acts = model_activations(model, tokens, ["blocks.0.hook_resid_post"], skip_first=0)
    expected = full["blocks.0.hook_resid_post"].reshape(-1, model.cfg.d_model)
    assert torch.equal(acts["blocks.0.hook_resid_post"], expected)
    assert not calls
    assert not any(h._forward_hooks for h in model.hook_dict.values())  # the hooks were removed
    torch.testing.assert_close(model(tokens), model(tokens))
