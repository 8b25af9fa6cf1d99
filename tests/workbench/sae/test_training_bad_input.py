"""Bad input to the activation pipeline and the SAE trainer (issue 23): every case ends in one
`error: ...` line, never a traceback and never a loop that waits forever for data that cannot come.

Each case that used to hang runs under `within`, an alarm that ends the test instead of the test run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import signal_on_call, tiny_train_config
from workbench.artifacts import SAE_TRAINING_WEIGHTS_FILE, list_checkpoints
from workbench.cli import main
from workbench.errors import CheckpointError, TrainingDiverged
from workbench.sae import ActivationStore, SAEConfig, SAETrainConfig, TensorSource, train_sae
from workbench.sae import training as sae_training
from workbench.train.lifecycle import TrainingInterrupted

HOOK = "blocks.0.hook_resid_post"


class Hung(BaseException):
    """Raised by the alarm of `within`: the code under test was still running (a BaseException, so no
    `except Exception` on the way turns it into something else)."""


@contextlib.contextmanager
def within(seconds: float):
    """Fail, rather than wait forever, when the block runs longer than `seconds`."""
    def alarm(signum, frame):
        raise Hung(f"still running after {seconds} s: the pipeline waits for data that never comes")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(capsys, *argv: str, seconds: float = 60) -> tuple[int, str]:
    """(exit status, stderr) of `workbench <argv>` run in this process, bounded in time."""
    capsys.readouterr()
    with within(seconds):
        code = main([*argv])
    return code, capsys.readouterr().err


def sae_train(model: Path, *extra: str) -> list[str]:
    """`S` of the issue: a small TopK SAE on the tiny GPT-2's first residual stream."""
    return ["sae", "train", "--model", f"hf:{model}", "--hook", HOOK, "--n-tokens", "4096", "--batch-size", "256",
            "--d-sae", "128", "--k", "8", "--no-progress", "--device", "cpu", *extra]


def assert_error_line(code: int, err: str, pattern: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines and re.search(pattern, lines[-1]), err


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    (folder / "a.txt").write_text("def main(): return the value of x\n" * 400)
    return folder


@pytest.fixture
def store(tmp_path) -> Path:
    """A small activation store of the hook `HOOK`, width 32 (the tiny GPT-2's d_model)."""
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(0))
    ActivationStore.write(tmp_path / "store", iter(TensorSource({HOOK: x}, 256)), n_tokens=2048, shard_tokens=1024)
    return tmp_path / "store"


def edit_manifest(store: Path, change) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    change(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


def store_train(store: Path, tmp_path: Path) -> list[str]:
    return ["sae", "train", "--store", str(store), "--hook", HOOK, "--n-tokens", "1024", "--batch-size", "256",
            "--d-sae", "64", "--k", "4", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "sae")]


# -- 1. no usable row or position ever arrives: an error up front, not an endless loop ------------------
def test_rows_of_only_a_bos_are_an_error(tiny_gpt2, docs, tmp_path, capsys):
    code, err = cli(capsys, *sae_train(tiny_gpt2, "--text", str(docs), "--seq-len", "1", "--out", str(tmp_path / "o")))
    assert_error_line(code, err, r"--seq-len 1 .*BOS")


def test_text_of_only_end_of_text_tokens_is_an_error(tiny_gpt2, tmp_path, capsys):
    (tmp_path / "eot.txt").write_text("<|endoftext|>" * 200)
    code, err = cli(capsys, *sae_train(tiny_gpt2, "--text", str(tmp_path / "eot.txt"), "--seq-len", "16",
                                       "--out", str(tmp_path / "o")))
    assert_error_line(code, err, r"special token.*--keep-special")


def test_a_buffer_the_rows_cannot_fill_is_an_error(tiny_gpt2, docs, tmp_path, capsys):
    code, err = cli(capsys, *sae_train(tiny_gpt2, "--text", str(docs), "--rows", "64", "--buffer-batches", "100000",
                                       "--out", str(tmp_path / "o")), seconds=30)
    assert_error_line(code, err, r"--buffer-batches 100000.* \d+ rows.*usable positions per pass.*--rows")


def test_a_store_without_shards_is_an_error(store, tmp_path, capsys):
    edit_manifest(store, lambda m: m.update(shards=[]))
    code, err = cli(capsys, *store_train(store, tmp_path))
    assert_error_line(code, err, r"no activations")


def test_transcoders_from_zero_rows_are_an_error(tiny_gpt2, tmp_path, capsys):
    code, err = cli(capsys, "transcoder", "train", "--model", f"hf:{tiny_gpt2}", "--rows", "0", "--n-tokens", "4096",
                    "--batch-size", "256", "--d-tc", "64", "--k", "8", "--no-progress", "--device", "cpu",
                    "--out", str(tmp_path / "tc"))
    assert_error_line(code, err, r"rows must be positive")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_one_signal_ends_a_wait_for_data_that_never_comes(tmp_path, sig):
    """The first Ctrl-C or SIGTERM only asks for a stop between steps; a source that never yields never
    reached that check, so it was ignored. Now it ends the wait, and no step is lost."""
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))

    def stalls_after_two():
        source = iter(TensorSource(x, 256))
        yield next(source)
        yield next(source)
        os.kill(os.getpid(), sig)
        while True:  # a source that has nothing more to give, and never says so
            pass

    cfg = SAETrainConfig(sae=SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2), n_tokens=10 * 256,
                         batch_size=256, n_checkpoints=0)
    with within(30), pytest.raises(TrainingInterrupted) as stop:
        train_sae(cfg, stalls_after_two(), out=tmp_path / "run", progress=False)
    assert stop.value.step == 2 and stop.value.saved


# -- 2. --resume refuses changed data settings ---------------------------------------------------------
def test_resume_refuses_changed_data_settings(tiny_gpt2, docs, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text("return the value of main x\n" * 400)
    out = tmp_path / "sae"
    data = ["--text", str(docs), "--rows", "200", "--seq-len", "64", "--buffer-batches", "4"]
    with monkeypatch.context() as m:  # a Ctrl-C during step 3: a checkpoint at step 3 to resume from
        signal_on_call(m, sae_training._Trainer, "train_step", 3)
        code, err = cli(capsys, *sae_train(tiny_gpt2, *data, "--out", str(out)))
    assert code == 130 and list_checkpoints(out), err
    changes = {"text": (["--text", str(other)], f"text ('{docs}' → '{other}')"),
               "rows": (["--rows", "100"], "rows (200 → 100)"),
               "seq_len": (["--seq-len", "32"], "seq_len (64 → 32)"),
               "keep_special": (["--keep-special"], "keep_special (False → True)"),
               "keep_first": (["--keep-first"], "keep_first (False → True)"),
               "buffer_batches": (["--buffer-batches", "8"], "buffer_batches (4 → 8)")}
    for flag, (new, named) in changes.items():
        argv = list(data)
        if flag in ("text", "rows", "seq_len", "buffer_batches"):
            i = argv.index(new[0])
            argv[i + 1] = new[1]
        else:
            argv += new
        code, err = cli(capsys, *sae_train(tiny_gpt2, *argv, "--out", str(out), "--resume"))
        assert code == 2 and "Traceback" not in err, err
        assert named in err, err
    argv = [*data, "--keep-first"]
    argv[argv.index("--seq-len") + 1] = "32"
    code, err = cli(capsys, *sae_train(tiny_gpt2, *argv, "--out", str(out), "--resume"))
    assert code == 2 and "seq_len (64 → 32)" in err and "keep_first (False → True)" in err, err
    code, err = cli(capsys, *sae_train(tiny_gpt2, *data, "--out", str(out), "--resume"))
    assert code == 0 and (out / "cfg.json").exists(), err


def test_transcoder_resume_refuses_changed_data_settings(tiny_gpt2, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tc"
    args = ["transcoder", "train", "--model", f"hf:{tiny_gpt2}", "--n-tokens", "4096", "--batch-size", "256",
            "--d-tc", "64", "--k", "8", "--no-progress", "--device", "cpu", "--out", str(out)]
    with monkeypatch.context() as m:  # a Ctrl-C during step 3: a checkpoint to resume from
        signal_on_call(m, sae_training._Trainer, "train_step", 3)
        code, err = cli(capsys, *args, "--rows", "60")
    assert code == 130, err
    code, err = cli(capsys, *args, "--rows", "50", "--resume")
    assert code == 2 and "rows (60 → 50)" in err and "Traceback" not in err, err
    code, err = cli(capsys, *args, "--rows", "60", "--resume")
    assert code == 0 and (out / "transcoders.json").exists(), err


# -- 3. shard paths stay inside the store --------------------------------------------------------------
@pytest.mark.parametrize("where", ["../outside.safetensors", "absolute"])
def test_shard_paths_outside_the_store_are_refused(store, tmp_path, capsys, where):
    outside = tmp_path / "outside.safetensors"
    first = json.loads((store / "manifest.json").read_text())["shards"][0]["file"]
    outside.write_bytes((store / first).read_bytes())
    path = str(outside) if where == "absolute" else where
    edit_manifest(store, lambda m: m["shards"][0].update(file=path))
    with pytest.raises(CheckpointError, match="inside"):
        ActivationStore(store)
    code, err = cli(capsys, *store_train(store, tmp_path))
    assert_error_line(code, err, r"outside.safetensors.*inside")


# -- 4. tracebacks that are now error lines ------------------------------------------------------------
@pytest.mark.parametrize("column", [["return the value of x " * 4, None] * 50, list(range(100))],
                         ids=["None", "ints"])
def test_a_dataset_whose_text_column_is_not_text_is_an_error(tiny_gpt2, tmp_path, capsys, column):
    import datasets

    datasets.Dataset.from_dict({"text": column}).save_to_disk(str(tmp_path / "ds"))
    code, err = cli(capsys, *sae_train(tiny_gpt2, "--text", str(tmp_path / "ds"), "--out", str(tmp_path / "o")))
    assert_error_line(code, err, r"'text' column.*(None|int)")


def test_an_unreadable_file_in_a_text_folder_is_an_error(tiny_gpt2, docs, tmp_path, capsys):
    """chmod 000 does not stop root (the tests' user), so the unreadable file is a link to /proc/self/mem,
    whose first page is never mapped: reading it fails with EIO for every user."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text((docs / "a.txt").read_text())
    os.symlink("/proc/self/mem", folder / "b.txt")
    code, err = cli(capsys, *sae_train(tiny_gpt2, "--text", str(folder), "--out", str(tmp_path / "o")))
    assert_error_line(code, err, r"b\.txt")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_seq_len_below_one_is_an_error(tiny_gpt2, docs, tmp_path, capsys, value):
    code, err = cli(capsys, *sae_train(tiny_gpt2, "--text", str(docs), "--seq-len", value,
                                       "--out", str(tmp_path / "o")))
    assert_error_line(code, err, rf"--seq-len .*{value}")


def test_a_manifest_without_hooks_is_an_error(store, tmp_path, capsys):
    edit_manifest(store, lambda m: m.pop("hooks"))
    code, err = cli(capsys, *store_train(store, tmp_path))
    assert_error_line(code, err, r"manifest.json.*hooks")


def test_a_manifest_whose_width_is_not_its_shards_is_an_error(store, tmp_path, capsys):
    edit_manifest(store, lambda m: m["d"].update({HOOK: 48}))
    code, err = cli(capsys, *store_train(store, tmp_path))
    assert_error_line(code, err, r"48.*32|32.*48")


# -- 5. --rows 0 ----------------------------------------------------------------------------------------
def test_zero_rows_says_rows_must_be_positive(tiny_gpt2, docs, tmp_path, capsys):
    code, err = cli(capsys, *sae_train(tiny_gpt2, "--text", str(docs), "--rows", "0", "--out", str(tmp_path / "o")))
    assert_error_line(code, err, r"--rows must be positive.*0")
    assert "fewer than" not in err


# -- 6. a huge learning rate never leaves huge weights as the last good checkpoint -----------------------
def _largest(tensors) -> float:
    return max(float(t.float().abs().max()) for t in tensors)


def test_an_sae_whose_weights_blow_up_keeps_the_previous_good_checkpoint(tiny_gpt2, docs, tmp_path, capsys):
    out = tmp_path / "sae"
    code, err = cli(capsys, *sae_train(tiny_gpt2, "--text", str(docs), "--lr", "1e30", "--out", str(out)))
    assert_error_line(code, err, r"last good checkpoint")
    for _, folder in list_checkpoints(out):
        assert _largest(load_file(str(folder / SAE_TRAINING_WEIGHTS_FILE)).values()) < 1e6, folder
    assert not (out / "cfg.json").exists()


def test_a_language_model_whose_weights_blow_up_keeps_the_previous_good_checkpoint(tmp_path):
    import workbench
    from workbench.train.lm import train

    cfg = tiny_train_config(n_steps=30, lr=1e30, warmup_steps=1)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tmp_path / "run", progress=False)
    found = list_checkpoints(tmp_path / "run")
    assert found and str(found[-1][1]) in str(err.value)
    for _, folder in found:
        assert _largest(workbench.load(folder, device="cpu").state_dict().values()) < 1e6, folder
