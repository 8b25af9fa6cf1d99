"""Training: learning, logs, log-spaced atomic checkpoints, Ctrl-C and bit-identical resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import workbench
from tests.conftest import tiny_config, tiny_train_config
from workbench.artifacts import STATE_FILE, list_checkpoints
from workbench.data import Batches, DataConfig
from workbench.errors import ConfigError, InputError
from workbench.train import TrainConfig, TrainingInterrupted, load_train_config, train


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_a_run_folder(tmp_path):
    cfg = tiny_train_config(n_steps=60, lr=3e-3)
    out = train(cfg, tmp_path / "run", progress=False)
    log = _log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] - 0.1
    assert all("tok_per_s" in r for r in log if "loss" in r)
    assert any("val_loss_synthetic" in r for r in log)
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == cfg.checkpoint_steps and steps[0] == 0 and steps[-1] == 60
    model = workbench.load(out, device="cpu")
    assert model.meta["step"] == 60 and model.cfg == cfg.model


def test_checkpoints_are_log_spaced_and_a_finished_run_keeps_no_optimizer_state(tmp_path):
    cfg = tiny_train_config(n_steps=40, n_checkpoints=6)
    out = train(cfg, tmp_path / "run", progress=False)
    gaps = [b - a for a, b in zip(cfg.checkpoint_steps[1:], cfg.checkpoint_steps[2:])]
    assert gaps == sorted(gaps)  # spacing grows: log-spaced
    ckpts = list_checkpoints(out)
    assert not any((p / STATE_FILE).exists() for _, p in ckpts)  # complete: nothing left to resume
    with pytest.raises(InputError, match="already complete"):
        train(cfg, out, resume=True, progress=False)
    assert not list((out / "checkpoints").glob(".*"))  # no temporary folders left behind
    early = workbench.load(out, checkpoint=ckpts[1][0], device="cpu")
    assert early.meta["step"] == ckpts[1][0]


def test_checkpoint_every_adds_regular_steps_to_the_log_spaced_ones():
    log_only = tiny_train_config(n_steps=40, n_checkpoints=4)
    both = tiny_train_config(n_steps=40, n_checkpoints=4, checkpoint_every=10)
    assert set(log_only.checkpoint_steps) < set(both.checkpoint_steps)
    assert {10, 20, 30, 40} <= set(both.checkpoint_steps)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        tiny_train_config(checkpoint_every=-5)


@pytest.mark.parametrize("stop_at", [13, 8])  # 8 is also a log-spaced checkpoint step
def test_ctrl_c_saves_a_checkpoint_and_resume_is_bit_identical(tmp_path, monkeypatch, stop_at):
    cfg = tiny_train_config(n_steps=24, eval_every=4)
    assert 8 in cfg.checkpoint_steps and 13 not in cfg.checkpoint_steps
    straight = train(cfg, tmp_path / "straight", progress=False)

    real_train = Batches.train

    def interrupt(self, step):
        if step == stop_at:
            raise KeyboardInterrupt
        return real_train(self, step)

    monkeypatch.setattr(Batches, "train", interrupt)
    with pytest.raises(TrainingInterrupted) as stop:
        train(cfg, tmp_path / "resumed", progress=False)
    assert stop.value.step == stop_at and (stop.value.folder / STATE_FILE).exists()
    states = [(p / STATE_FILE).exists() for _, p in list_checkpoints(tmp_path / "resumed")]
    assert states == [False] * (len(states) - 1) + [True]  # only the newest keeps optimizer state
    monkeypatch.setattr(Batches, "train", real_train)

    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    a = workbench.load(straight, device="cpu").state_dict()
    b = workbench.load(resumed, device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def strip(log):
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in log]

    assert strip(_log(straight)) == strip(_log(resumed))


def test_an_existing_run_is_never_overwritten(tmp_path):
    cfg = tiny_train_config(n_steps=4, n_checkpoints=2)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="differs"):
        train(replace(cfg, lr=0.5), tmp_path / "run", resume=True, progress=False)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(workbench.CheckpointError, match="no checkpoint"):
        train(tiny_train_config(), tmp_path / "empty", resume=True, progress=False)


def test_training_is_deterministic_for_a_seed(tmp_path):
    cfg = tiny_train_config(n_steps=6, n_checkpoints=2)
    a = workbench.load(train(cfg, tmp_path / "a", progress=False), device="cpu")
    b = workbench.load(train(cfg, tmp_path / "b", progress=False), device="cpu")
    assert torch.equal(a.W_Q, b.W_Q)


def test_lr_schedule_warms_up_then_decays():
    cfg = tiny_train_config(n_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("overrides,field", [
    (dict(batch_size=0), "batch_size"), (dict(warmup_steps=50, n_steps=20), "warmup_steps"),
    (dict(lr=-1.0), "lr"), (dict(precision="fp8"), "precision"), (dict(n_checkpoints=1), "n_checkpoints"),
    (dict(model=tiny_config(d_vocab=300)), "model.d_vocab"),
])
def test_impossible_training_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        tiny_train_config(**overrides)


def test_presets_load_and_round_trip():
    for name in ("attn-only-1l", "attn-only-2l", "gelu-2l"):
        preset_name, cfg = load_train_config(name)
        assert preset_name == name and TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="n_step"):
        TrainConfig.from_dict({"n_step": 3})


def test_bf16_training_runs(tmp_path):
    out = train(tiny_train_config(n_steps=6, n_checkpoints=2, precision="bf16"), tmp_path / "bf", progress=False)
    assert all(torch.isfinite(t).all() for t in workbench.load(out, device="cpu").state_dict().values())


def test_text_and_synthetic_mixture_trains(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world, this is a small corpus. " * 200)
    cfg = tiny_train_config(data=DataConfig(text=str(corpus), synthetic_fraction=0.5, val_fraction=0.1), n_steps=6,
                            n_checkpoints=2)
    out = train(cfg, tmp_path / "mix", progress=False)
    assert {"val_loss_text", "val_loss_synthetic"} <= set(_log(out)[-1])
