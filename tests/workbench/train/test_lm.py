"""Training: learning, logs, log-spaced atomic checkpoints, Ctrl-C and bit-identical resume."""

from __future__ import annotations

import errno
import json
import pickle
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import workbench
import workbench.train.lifecycle as lifecycle
import workbench.train.lm as train_module
from tests.conftest import signal_on_call, tiny_config, tiny_train_config
from workbench.artifacts import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    STATE_META_FILE,
    has_state,
    list_checkpoints,
    read_config,
    remove_state,
)
from workbench.cli import main as cli_main
from workbench.data.text import Batches, DataConfig
from workbench.errors import ConfigError, InputError, OutOfSpaceError, RunLockedError, TrainingDiverged
from workbench.model.transformer import Transformer
from workbench.train.lifecycle import TrainingInterrupted
from workbench.train.lm import TrainConfig, load_train_config, train


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
    assert not any(has_state(p) for _, p in ckpts)  # complete: nothing left to resume
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


# A Ctrl-C (SIGINT) sent in every phase of a step: while the batch is built, during the forward pass,
# right after optimizer.step() (before the step counter moves: the window that used to save new weights
# under the old step number), during an evaluation, and while a checkpoint is being written.
PHASES = {
    "data": (Batches, "train", 14, False),
    "forward": (Transformer, "forward", 10, False),
    "after optimizer.step": (torch.optim.AdamW, "step", 8, True),  # 8 is a checkpoint step: it must not be
    "after optimizer.step, off-schedule": (torch.optim.AdamW, "step", 13, True),  # replaced by later weights
    "evaluation": (train_module, "evaluate", 3, False),
    "checkpoint write": (lifecycle, "save_model", 3, False),
}


def _strip(log):
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in log]


@pytest.mark.parametrize("phase", list(PHASES))
def test_ctrl_c_in_any_phase_of_a_step_resumes_bit_identical(tmp_path, monkeypatch, phase):
    cfg = tiny_train_config(n_steps=24, eval_every=4)
    assert 8 in cfg.checkpoint_steps and 13 not in cfg.checkpoint_steps
    straight = train(cfg, tmp_path / "straight", progress=False)

    owner, attr, call, after = PHASES[phase]
    with monkeypatch.context() as m:
        signal_on_call(m, owner, attr, call, after)
        with pytest.raises(TrainingInterrupted) as stop:
            train(cfg, tmp_path / "resumed", progress=False)
    step = stop.value.step
    assert 0 < step < cfg.n_steps and stop.value.saved and has_state(stop.value.folder)
    assert read_config(stop.value.folder)["step"] == step  # the weights saved are those of that step
    states = [has_state(p) for _, p in list_checkpoints(tmp_path / "resumed")]
    assert states == [False] * (len(states) - 1) + [True]  # only the newest keeps optimizer state

    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    a = workbench.load(straight, device="cpu").state_dict()
    b = workbench.load(resumed, device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(_log(straight)) == _strip(_log(resumed))
    for s, folder in list_checkpoints(straight):  # every scheduled checkpoint holds the same weights
        other = tmp_path / "resumed" / "checkpoints" / folder.name
        assert read_config(other)["weights_sha256"] == read_config(folder)["weights_sha256"], s


def test_a_second_ctrl_c_quits_without_saving_and_names_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_train_config(n_steps=24)
    with monkeypatch.context() as m:
        signal_on_call(m, Batches, "train", 14)
        signal_on_call(m, lifecycle, "save_model", 5)  # the second lands while the interrupt checkpoint is written
        with pytest.raises(TrainingInterrupted) as stop:
            train(cfg, tmp_path / "run", progress=False)
    assert not stop.value.saved and "quit without saving" in str(stop.value)
    newest = list_checkpoints(tmp_path / "run")[-1]
    assert stop.value.folder == newest[1] and has_state(newest[1])
    train(cfg, tmp_path / "run", resume=True, progress=False)  # and the run still resumes


def test_an_existing_run_is_never_overwritten(tmp_path):
    cfg = tiny_train_config(n_steps=4, n_checkpoints=2)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="already holds a training run"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"differs.*lr \(0.001 → 0.5\)"):  # names the field (defect 7's twin)
        train(replace(cfg, lr=0.5), tmp_path / "run", resume=True, progress=False)


def test_resume_of_a_run_with_no_checkpoint_yet_starts_it(tmp_path, capsys):
    out = train(tiny_train_config(n_steps=4, n_checkpoints=2), tmp_path / "new", resume=True, progress=False)
    assert "Nothing to resume" in capsys.readouterr().out
    assert workbench.load(out, device="cpu").meta["step"] == 4


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


# -- trust: defects found by attacking the trainer (issue "Trust") ------------------------------------
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_train_config(n_steps=30, lr=1e30, warmup_steps=1, grad_clip=1e30)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "last good checkpoint is" in msg and "Lower TrainConfig.lr" in msg
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no NaN final model
    found = list_checkpoints(tmp_path / "run")
    assert found and str(found[-1][1]) in msg
    for _, folder in found:  # every checkpoint on disk is finite
        assert all(torch.isfinite(t).all() for t in workbench.load(folder, device="cpu").state_dict().values())


def test_the_cli_exits_non_zero_on_divergence(tmp_path, capsys):
    cfg = tiny_train_config(n_steps=30, lr=1e30, warmup_steps=1, grad_clip=1e30).to_dict()
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert cli_main(["train", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "last good checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
def test_lr_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match="TrainConfig.lr"):
        tiny_train_config(lr=value)


LOCK_HOLDER = """
import sys, time
from workbench.artifacts import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_training_into_a_locked_folder_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"process {holder.pid}"):
            train(tiny_train_config(n_steps=4, n_checkpoints=2), run_dir, progress=False)
        assert not list_checkpoints(run_dir)  # nothing was written by the refused run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    out = train(tiny_train_config(n_steps=4, n_checkpoints=2), run_dir, progress=False)  # the lock died with it
    assert workbench.load(out, device="cpu").meta["step"] == 4


@pytest.mark.parametrize("contents", [
    {"config.json": '{"my": "own settings"}'},  # a user's own config.json
    {"notes.txt": "my notes"},
    "model folder",  # like models/facts: a shipped model with no checkpoints/
])
def test_training_refuses_a_folder_that_is_not_a_workbench_run(tmp_path, contents):
    folder = tmp_path / "target"
    if contents == "model folder":
        workbench.save_model(workbench.Transformer(tiny_config(n_ctx=32)), folder)
        contents = {p.name: p.read_bytes() for p in folder.iterdir()}
    else:
        folder.mkdir()
        for name, text in contents.items():
            (folder / name).write_text(text)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(InputError, match="Nothing was overwritten|Nothing was changed"):
        train(tiny_train_config(n_steps=4, n_checkpoints=2), folder, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_kill_between_the_last_checkpoint_and_the_final_save_is_finished_by_resume(tmp_path, monkeypatch):
    cfg = tiny_train_config(n_steps=12, n_checkpoints=3)
    straight = train(cfg, tmp_path / "straight", progress=False)

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(train_module, "_finish", killed)
        with pytest.raises(Killed):
            train(cfg, tmp_path / "run", progress=False)
    assert list_checkpoints(tmp_path / "run")[-1][0] == 12 and not (tmp_path / "run" / "model.safetensors").exists()
    with pytest.raises(InputError, match="already holds a training run"):  # a fresh run is refused ...
        train(cfg, tmp_path / "run", progress=False)
    out = train(cfg, tmp_path / "run", resume=True, progress=False)  # ... and resume finishes the final save
    a, b = workbench.load(straight, device="cpu"), workbench.load(out, device="cpu")
    assert b.meta["step"] == 12 and all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    with pytest.raises(InputError, match="already complete"):
        train(cfg, tmp_path / "run", resume=True, progress=False)


def _interrupted_run(tmp_path, monkeypatch, cfg, call=10):
    with monkeypatch.context() as m:
        signal_on_call(m, Batches, "train", call)
        with pytest.raises(TrainingInterrupted) as stop:
            train(cfg, tmp_path / "run", progress=False)
    return stop.value


def test_a_checkpoint_without_optimizer_state_gives_one_way_out(tmp_path, monkeypatch):
    cfg = tiny_train_config(n_steps=24)
    stop = _interrupted_run(tmp_path, monkeypatch, cfg)
    remove_state(stop.folder)
    with pytest.raises(workbench.CheckpointError) as err:
        train(cfg, tmp_path / "run", resume=True, progress=False)
    assert "another --out" in str(err.value) and "--resume" not in str(err.value).replace("--resume:", "")


def test_a_half_written_last_log_line_is_dropped_on_resume(tmp_path, monkeypatch, capsys):
    cfg = tiny_train_config(n_steps=24, eval_every=4)
    straight = train(cfg, tmp_path / "straight", progress=False)
    _interrupted_run(tmp_path, monkeypatch, cfg)
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write('{"step": 99, "lo')  # a kill in the middle of a write
    train(cfg, tmp_path / "run", resume=True, progress=False)
    assert "dropped the half-written last line" in capsys.readouterr().err
    assert _strip(_log(straight)) == _strip(_log(tmp_path / "run"))


def test_a_garbage_tokenizer_is_an_error_naming_the_file(tmp_path):
    folder = tmp_path / "m"
    workbench.save_model(workbench.Transformer(tiny_config()), folder)
    (folder / "tokenizer.json").write_text("this is not a tokenizer")
    with pytest.raises(workbench.CheckpointError, match=r"tokenizer.json is not a valid tokenizer file"):
        workbench.load(folder, device="cpu")


@pytest.mark.parametrize("corrupt", ["tensors", "json"])
def test_a_corrupt_training_state_is_an_error_naming_the_file(tmp_path, monkeypatch, corrupt):
    cfg = tiny_train_config(n_steps=24)
    stop = _interrupted_run(tmp_path, monkeypatch, cfg)
    name = STATE_FILE if corrupt == "tensors" else STATE_META_FILE
    data = bytearray((stop.folder / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (stop.folder / name).write_bytes(bytes(data[: len(data) - 7]))
    with pytest.raises(workbench.CheckpointError, match=name.replace(".", r"\.")):
        train(cfg, tmp_path / "run", resume=True, progress=False)


def test_a_pickle_in_a_checkpoint_is_never_unpickled(tmp_path, monkeypatch):
    cfg = tiny_train_config(n_steps=24)
    stop = _interrupted_run(tmp_path, monkeypatch, cfg)
    remove_state(stop.folder)
    marker = tmp_path / "pwned"
    (stop.folder / LEGACY_STATE_FILE).write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(workbench.CheckpointError, match="not loaded"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    assert not marker.exists()


class _Exploit:
    """A pickle that creates a file when loaded (a stand-in for os.system)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_full_disk_during_a_checkpoint_says_how_much_space_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lifecycle, "write_state", full_disk)
    with pytest.raises(OutOfSpaceError, match=r"needs about [\d.,]+ MB and [\d.,]+ MB are free"):
        train(tiny_train_config(n_steps=4, n_checkpoints=2), tmp_path / "run", progress=False)
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()]  # no partial checkpoint, no temp folder


BAD_CONFIGS = [
    ({"data": {"synthetic_fraction": 1.0, "txet": "stdlib"}}, r"Unknown DataConfig field\(s\) \['txet'\]"),
    ({"lr": "1e-3"}, "TrainConfig.lr must be a finite number"),
    ({"weight_decay": "0.1"}, "TrainConfig.weight_decay must be a finite number"),
    ({"model": {"seed": "0"}}, "ModelConfig.seed must be an integer"),
    ({"data": {"seed": -1}}, "DataConfig.seed must be an integer ≥ 0"),
    ({"model": None}, "ModelConfig .*must be a JSON object"),
    ({"model": {"n_layers": 2.5}}, "ModelConfig.n_layers must be an integer"),
    ({"lr": 1e400}, "TrainConfig.lr must be a finite number"),
]


@pytest.mark.parametrize("patch,message", BAD_CONFIGS)
def test_config_type_holes_are_errors_naming_the_field(tmp_path, patch, message):
    cfg = tiny_train_config().to_dict()
    for key, value in patch.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        load_train_config(path)


def test_a_config_file_that_is_not_an_object_is_an_error(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_train_config(tmp_path / "list.json")


@pytest.mark.slow
def test_compiled_training_matches_eager_and_writes_the_same_files(tmp_path):
    """TrainConfig.compile (`workbench train --compile`): the same weights to float tolerance, the same
    parameter names in the checkpoints."""
    cfg = tiny_train_config(n_steps=4, n_checkpoints=2)
    eager = workbench.load(train(cfg, tmp_path / "eager", progress=False), device="cpu")
    compiled = workbench.load(train(replace(cfg, compile=True), tmp_path / "compiled", progress=False), device="cpu")
    assert eager.state_dict().keys() == compiled.state_dict().keys()
    for name, value in eager.state_dict().items():
        if name.endswith("attn.b_K"):  # its true gradient is 0 (softmax); Adam scales rounding noise to lr-sized steps
            continue
        torch.testing.assert_close(compiled.state_dict()[name], value, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_compile_without_a_cpp_compiler_is_an_error_line(tmp_path):
    """`workbench train --compile` on a machine with no working C++ compiler: one error line naming the
    fix, exit code 2, no traceback. A fresh inductor cache, so that no kernel built earlier is reused."""
    import os

    cfg = {"model": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "n_ctx": 16},
           "data": {"synthetic_fraction": 1.0}, "batch_size": 4, "n_steps": 4, "warmup_steps": 1, "n_checkpoints": 2}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    env = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "CC": str(tmp_path / "no-such-gcc"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache"), "OMP_NUM_THREADS": "1"}
    argv = ["train", str(tmp_path / "c.json"), "--compile", "--out", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "workbench", *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --compile") and "C++ compiler" in last and "without --compile" in last, last
    assert not list_checkpoints(tmp_path / "run")  # nothing half-written: the same --out works without --compile
