"""The modular-addition trainer and its config: the paper's presets, a modulus too large for the task's
tables refused up front, checkpoints, the log, Ctrl-C and bit-identical resume, and a non-finite loss
stopping before the step."""

from __future__ import annotations

import json

import pytest
import torch

import workbench
from tests.conftest import signal_on_call
from tests.conftest import tiny_modular_config as tiny
from workbench.artifacts import has_state, list_checkpoints, read_config
from workbench.cli import main
from workbench.data.modular import MAX_P, modular_data
from workbench.errors import ConfigError, InputError, TrainingDiverged
from workbench.model.modular import evaluate
from workbench.train import modular as modular_module
from workbench.train.lifecycle import TrainingInterrupted
from workbench.train.modular import ModularConfig, load_modular_config, train_modular

SHIPPED = "modular-addition"


def test_a_modulus_too_large_for_the_tables_is_a_config_error():
    with pytest.raises(ConfigError, match=r"ModularConfig\.p must be .*at most 1024.*p² pairs"):
        ModularConfig(p=10_000_019)
    with pytest.raises(ConfigError, match="at most 1024"):
        modular_data(10_000_019, 0.5)
    assert ModularConfig(p=MAX_P - 3).p == 1021  # the largest prime allowed


def test_train_with_a_huge_p_is_an_error_line(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"task": "modular-addition", "p": 10_000_019, "n_steps": 20}))
    assert main(["train", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ModularConfig.p must be") and "10000019" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_a_training_fraction_outside_zero_one_is_a_clear_error(fraction):
    with pytest.raises(ConfigError, match=r"ModularConfig.train_fraction must be strictly between 0 and 1"):
        ModularConfig(train_fraction=fraction)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        modular_data(11, fraction)


def test_a_composite_p_warns_and_goes_on():
    with pytest.warns(UserWarning, match="p=12 is not prime.*Fourier analysis"):
        cfg = ModularConfig(p=12)
    assert cfg.model.d_vocab == 13


def test_the_presets_are_the_papers_model():
    name, cfg = load_modular_config(SHIPPED)
    m = cfg.model
    assert name == SHIPPED and cfg.p == 53 and cfg.train_fraction == 0.5
    assert (m.n_layers, m.d_model, m.n_heads, m.d_mlp, m.act_fn, m.normalization_type) == (1, 128, 4, 512, "relu", None)
    assert (cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2) == (1e-3, 1.0, 0.9, 0.98)
    assert load_modular_config("modular-addition-p113")[1].p == 113
    assert load_modular_config("attn-only-2l") is None  # a language-model preset is not ours


def test_training_writes_checkpoints_a_log_and_a_loadable_model(tmp_path):
    cfg = tiny()
    out = train_modular(cfg, tmp_path / "run", progress=False)
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == cfg.checkpoint_steps and steps[0] == 0 and steps[-1] == cfg.n_steps
    for _, folder in list_checkpoints(out):
        assert not has_state(folder) and read_config(folder)["weights_dtype"] == "float16"
    model = workbench.load(out, device="cpu")
    assert model.W_E.dtype == torch.float32 and model.meta["train"]["task"] == "modular-addition"
    assert model.to_tokens("3 5 =").tolist() == [[3, 5, 11]]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"train_loss", "test_loss", "train_acc", "test_acc", "weight_norm"} <= set(log[-1])
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    final = evaluate(model, modular_data(cfg.p, cfg.train_fraction, cfg.data_seed))
    assert final["train_loss"] == pytest.approx(model.meta["train_loss"])
    with pytest.raises(InputError, match="already holds a training run"):
        train_modular(cfg, out, progress=False)


def test_ctrl_c_saves_and_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg = tiny()
    straight = train_modular(cfg, tmp_path / "straight", progress=False)
    with monkeypatch.context() as m:
        signal_on_call(m, torch.optim.AdamW, "step", 13)
        with pytest.raises(TrainingInterrupted, match="Continue with") as stop:
            train_modular(cfg, tmp_path / "resumed", progress=False)
    assert 0 < stop.value.step < cfg.n_steps and has_state(stop.value.folder)
    resumed = train_modular(cfg, tmp_path / "resumed", resume=True, progress=False)
    a = workbench.load(straight, device="cpu").state_dict()
    b = workbench.load(resumed, device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_before_the_step_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = modular_module.answer_logits_fast, [0]

    def poisoned(model, tokens):
        calls[0] += 1
        out = real(model, tokens)
        return out * float("nan") if calls[0] > 12 else out

    monkeypatch.setattr(modular_module, "answer_logits_fast", poisoned)
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*step_0000"):
        train_modular(tiny(), tmp_path / "run", progress=False)
    for _, folder in list_checkpoints(tmp_path / "run"):
        weights = workbench.load(folder, device="cpu").state_dict()
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_cli_trains_a_modular_config(tmp_path):
    cfg = {**tiny(n_steps=6, n_checkpoints=2).to_dict(), "description": "tiny"}
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "m.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert workbench.load(tmp_path / "run", device="cpu").meta["step"] == 6
