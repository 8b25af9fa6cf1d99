"""Training SAEs: the normalisation folded into the saved weights, NaN and Ctrl-C at any phase of a
step (then a bit-identical resume), a changed config refused on resume, a crafted pickle never run, and
several SAEs in lockstep from one forward pass."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from dataclasses import replace

import pytest
import torch

from tests.conftest import signal_on_call
from workbench.artifacts import read_log
from workbench.errors import CheckpointError, ConfigError, HookNameError, InputError
from workbench.sae import (
    SAEConfig,
    SAETrainConfig,
    TensorSource,
    TrainingDiverged,
    load_sae,
    make_sae,
    stream_activations,
    train_sae,
    train_saes,
)
from workbench.sae import trainer as sae_trainer
from workbench.sae.modules import TopKSAE
from workbench.train.lifecycle import TrainingInterrupted


def test_folding_the_normalisation_changes_outputs_by_less_than_1e_5(tmp_path):
    x = torch.randn(4096, 16) * 40 + 5  # far from E‖x‖ = √d_in, so the scale is far from 1
    cfg = SAETrainConfig(sae=SAEConfig(d_in=16, d_sae=64, architecture="relu", l1_coefficient=1.0), n_tokens=20 * 512,
                         batch_size=512, n_checkpoints=0)
    sae, _ = train_sae(cfg, TensorSource(x, 512), out=tmp_path / "sae", progress=False)  # folds at the end
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["workbench"]
    scale = meta["activation_scale_folded"]
    assert scale < 0.5
    unfolded = make_sae(cfg.sae)
    unfolded.load_state_dict(sae.state_dict())
    unfolded.fold_scale(1 / scale)  # undo the fold: the SAE as trained, on scaled inputs
    with torch.no_grad():
        y_folded, y_trained = sae(x[:256]), unfolded(x[:256] * scale) / scale
    assert ((y_folded - y_trained).abs().max() / y_trained.abs().max()) < 1e-5


def test_nan_activations_stop_training_and_keep_the_last_checkpoint(tmp_path):
    x = torch.randn(4096, 8)
    source = iter(TensorSource(x, 256))

    def poisoned():
        for step, batch in enumerate(source):
            if step == 30:
                batch = {"x": batch["x"].clone().fill_(float("nan"))}
            yield batch

    cfg = SAETrainConfig(sae=SAEConfig(d_in=8, d_sae=32), n_tokens=50 * 256, batch_size=256, n_checkpoints=3)
    with pytest.raises(TrainingDiverged, match="NaN") as err:
        train_sae(cfg, poisoned(), out=tmp_path / "run", progress=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts and ckpts[-1].name in str(err.value)
    assert not (tmp_path / "run" / "cfg.json").exists()  # no half-trained SAE presented as finished


def _sae_cfg(**kw):
    base = dict(sae=SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4), n_tokens=60 * 256, batch_size=256,
                n_checkpoints=4, dead_window=1000)
    return SAETrainConfig(**{**base, **kw})


def _signal_at(source, step: int):
    """The batches of `source`, with a Ctrl-C sent while batch `step` is being produced."""
    for i, batch in enumerate(source):
        if i == step:
            os.kill(os.getpid(), signal.SIGINT)
        yield batch


SAE_X = torch.randn(8192, 8, generator=torch.Generator().manual_seed(3))
SAE_PHASES = {  # where in a step the Ctrl-C lands (see the LM trainer's test of the same)
    "data": None,
    "after optimizer.step": (torch.optim.Adam, "step", 21, True),
    "forward": (TopKSAE, "train_forward", 17, False),
    "checkpoint write": (sae_trainer, "write_state", 2, False),
}


@pytest.mark.parametrize("phase", list(SAE_PHASES))
def test_ctrl_c_in_any_phase_then_resume_is_bit_identical(tmp_path, monkeypatch, phase):
    cfg = _sae_cfg()
    straight, _ = train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "a", progress=False)
    source = TensorSource(SAE_X, 256)
    with monkeypatch.context() as m:
        if SAE_PHASES[phase] is None:
            source = _signal_at(source, 20)
        else:
            signal_on_call(m, *SAE_PHASES[phase])
        with pytest.raises(TrainingInterrupted) as stop:
            train_sae(cfg, source, out=tmp_path / "b", progress=False)
    assert stop.value.saved and stop.value.folder is not None
    with pytest.raises(InputError, match="unfinished SAE run"):  # a fresh start would lose the checkpoints
        train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", progress=False)
    resumed, _ = train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", resume=True, progress=False)
    assert torch.equal(straight.W_dec, resumed.W_dec) and torch.equal(straight.b_enc, resumed.b_enc)
    log_a = [{k: v for k, v in r.items() if k != "tok_per_s"} for r in read_log(tmp_path / "a" / "log.jsonl")]
    log_b = [{k: v for k, v in r.items() if k != "tok_per_s"} for r in read_log(tmp_path / "b" / "log.jsonl")]
    assert log_a == log_b  # no duplicated or missing records after the resume
    with pytest.raises(InputError, match="already holds"):
        train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "a", progress=False)


def test_resume_with_a_different_config_names_the_fields(tmp_path):
    cfg = _sae_cfg()
    with pytest.raises(TrainingInterrupted):
        train_sae(cfg, _signal_at(TensorSource(SAE_X, 256), 20), out=tmp_path / "b", progress=False)
    changed = replace(cfg, lr=3e-3, sae=replace(cfg.sae, k=8))
    with pytest.raises(ConfigError, match=r"lr \(0.001 → 0.003\).*sae.k \(4 → 8\)|sae.k \(4 → 8\).*lr"):
        train_sae(changed, TensorSource(SAE_X, 256), out=tmp_path / "b", resume=True, progress=False)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, capsys):
    cfg = _sae_cfg(log_every=5)
    with pytest.raises(TrainingInterrupted):  # the first checkpoint is at step 1: a kill before it leaves a log
        train_sae(cfg, _signal_at(TensorSource(SAE_X, 256), 0), out=tmp_path / "b", progress=False)
    for folder in (tmp_path / "b" / "checkpoints").iterdir():  # as if killed -9 before the checkpoint
        shutil.rmtree(folder)
    (tmp_path / "b" / "log.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    with pytest.raises(InputError, match="--resume|resume=True"):
        train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", progress=False)
    resumed, _ = train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", resume=True, progress=False)
    assert "starting from step 0" in capsys.readouterr().out
    straight, _ = train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "a", progress=False)
    assert torch.equal(straight.W_dec, resumed.W_dec)


def test_a_crafted_pickle_in_an_sae_checkpoint_is_never_run(tmp_path):
    cfg = _sae_cfg()
    with pytest.raises(TrainingInterrupted) as stop:
        train_sae(cfg, _signal_at(TensorSource(SAE_X, 256), 20), out=tmp_path / "b", progress=False)
    for name in ("training_state.safetensors", "training_state.json"):
        (stop.value.folder / name).unlink()
    marker = tmp_path / "pwned"
    (stop.value.folder / "training_state.pt").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError, match="not loaded"):
        train_sae(cfg, TensorSource(SAE_X, 256), out=tmp_path / "b", resume=True, progress=False)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):  # what an attacker's os.system would be
        return (open, (self.path, "w"))


def test_several_saes_resume_from_the_step_all_of_them_saved(tmp_path, monkeypatch):
    """A kill between two SAEs' checkpoints leaves them at different steps; resume must realign them."""
    cfgs = {"a": make_sae(SAEConfig(d_in=8, d_sae=32, k=4, hook_name="x"), seed=1),
            "b": make_sae(SAEConfig(d_in=8, d_sae=32, architecture="relu", hook_name="x"), seed=2)}
    cfg = _sae_cfg(sae=cfgs["a"].cfg)
    train_saes({k: make_sae(v.cfg, seed=i + 1) for i, (k, v) in enumerate(cfgs.items())},
               TensorSource(SAE_X, 256, name="x"), cfg, out=tmp_path / "s", progress=False)
    with pytest.raises(TrainingInterrupted):
        train_saes({k: make_sae(v.cfg, seed=i + 1) for i, (k, v) in enumerate(cfgs.items())},
                   _signal_at(TensorSource(SAE_X, 256, name="x"), 40), cfg, out=tmp_path / "r", progress=False)
    newest = sorted((tmp_path / "r" / "b" / "checkpoints").iterdir())[-1]
    shutil.rmtree(newest)  # b's newest checkpoint never made it to disk
    saes = {k: make_sae(v.cfg, seed=i + 1) for i, (k, v) in enumerate(cfgs.items())}
    train_saes(saes, TensorSource(SAE_X, 256, name="x"), cfg, out=tmp_path / "r", resume=True, progress=False)
    for name in ("a", "b"):
        ref = load_sae(tmp_path / "s" / name)
        assert torch.equal(ref.W_dec, load_sae(tmp_path / "r" / name).W_dec)


def test_several_saes_train_from_one_forward_pass(attn_model, monkeypatch):
    rows = torch.randint(0, 256, (40, 24), generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}
    real_forward = attn_model.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(attn_model, "forward", counting)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"]
    saes = {h: make_sae(SAEConfig(d_in=32, d_sae=64, k=4, hook_name=h)) for h in hooks}
    saes["second on the same hook"] = make_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=hooks[0]))
    cfg = SAETrainConfig(sae=saes[hooks[0]].cfg, n_tokens=10 * 128, batch_size=128, n_checkpoints=0, log_every=5)
    logs = train_saes(saes, stream_activations(attn_model, rows, hooks, batch_size=128, rows_per_forward=8,
                                               buffer_batches=2), cfg, progress=False)
    assert all(len(log) == 2 for log in logs.values())
    assert calls["n"] <= 10  # one forward per 8 rows, shared by all three SAEs (not three times as many)
    with pytest.raises(HookNameError, match="Did you mean"):
        next(stream_activations(attn_model, rows, ["blocks.0.hook_resid_pots"]))
