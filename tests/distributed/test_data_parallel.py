"""Data-parallel dictionary training under torchrun (gloo, 2 processes on this CPU): 2 ranks with half
the batch each train what 1 process trains with the whole batch; a rank killed with SIGKILL is
restarted by torchrun and the run ends as if it had never died; a resumed run sees exactly the
activations an uninterrupted one would; the console script runs under torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("sae_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], tmp: Path, ranks: int, env: dict[str, str] | None = None, restarts: int = 0) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--max-restarts",
                 str(restarts), "--master-port", str(_free_port())] if ranks > 1 else [sys.executable])
    done = subprocess.run([*launcher, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _free_port() -> int:
    """A port for torchrun's static rendezvous (it restarts workers cleanly; c10d on port 0 did not)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _compare(tmp: Path) -> dict[str, float]:
    one, two = load_file(str(tmp / "result-1.safetensors")), load_file(str(tmp / "result-2.safetensors"))
    return {k: float((one[k] - two[k]).abs().max()) for k in one}


ARCHS = [pytest.param("topk", id="topk-auxk"), pytest.param("relu", marks=pytest.mark.slow),
         pytest.param("batchtopk", marks=pytest.mark.slow), pytest.param("jumprelu", marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_with_half_the_batch_train_what_one_process_trains(arch, tmp_path):
    _run([str(WORKER), arch, str(tmp_path)], tmp_path, 1)
    _run([str(WORKER), arch, str(tmp_path)], tmp_path, 2)
    diffs = _compare(tmp_path)
    assert max(diffs.values()) < 1e-5, diffs  # after 50 steps, within float rounding (sums taken in another order)
    log1, log2 = (json.loads((tmp_path / f"log-{n}.json").read_text()) for n in (1, 2))
    assert [r["dead_fraction"] for r in log1] == [r["dead_fraction"] for r in log2]  # dead latents: the same count
    assert [r["l0"] for r in log1] == pytest.approx([r["l0"] for r in log2], rel=1e-4)
    if arch == "topk":
        assert max(r["aux_loss"] for r in log1) > 0  # AuxK really ran (latents died), on global statistics
    assert int((tmp_path / "bytes-2.txt").read_text()) > 0


@pytest.mark.slow
def test_a_rank_killed_with_sigkill_is_restarted_and_the_run_ends_as_if_it_never_died(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    _run([str(WORKER), "topk", str(whole), "--ckpt"], whole, 2)
    _run([str(WORKER), "topk", str(killed), "--ckpt"], killed, 2, restarts=1,
         env={"WB_DIE_AT": "30", "WB_DIE_MARK": str(tmp_path / "died")})
    assert (tmp_path / "died").exists()  # rank 1 really was killed at step 30 ...
    a, b = load_file(str(whole / "result-2.safetensors")), load_file(str(killed / "result-2.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # ... and the restarted run resumed from step 18 exactly
    steps = [r["step"] for r in json.loads((killed / "log-2.json").read_text())]
    assert steps[0] > 18 and steps[-1] == 50  # the restarted workers trained from the checkpoint on


def test_a_resumed_run_sees_exactly_the_activations_an_uninterrupted_run_sees(tmp_path, monkeypatch):
    """The stream is a pure function of the seed and the step: after Ctrl-C and resume, the batches the
    trainer reads (hashed) are the ones the uninterrupted run read at the same steps."""
    import workbench
    from tests.conftest import signal_on_call, tiny_config
    from workbench.data.tokenizer import TextCodec, byte_tokenizer
    from workbench.sae import SAEConfig, SAETrainConfig, stream_activations, train_sae
    from workbench.sae import training as training_module
    from workbench.train.lifecycle import TrainingInterrupted

    model = workbench.Transformer(tiny_config(d_mlp=64), tokenizer=TextCodec(byte_tokenizer())).eval()
    rows = torch.randint(0, 257, (40, 24), generator=torch.Generator().manual_seed(0))
    hook = "blocks.0.hook_mlp_out"
    cfg = SAETrainConfig(sae=SAEConfig(d_in=32, d_sae=64, hook_name=hook, k=4), n_tokens=30 * 128, batch_size=128,
                         n_checkpoints=3)

    def hashed(seen: list[str]):
        for batch in stream_activations(model, rows, [hook], batch_size=128, buffer_batches=4, seed=5):
            seen.append(hashlib.sha256(batch[hook].numpy().tobytes()).hexdigest())
            yield batch

    whole: list[str] = []
    train_sae(cfg, hashed(whole), out=tmp_path / "whole", progress=False)
    first: list[str] = []
    signal_on_call(monkeypatch, training_module._Trainer, "train_step", 20)
    with pytest.raises(TrainingInterrupted):
        train_sae(cfg, hashed(first), out=tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed: list[str] = []
    train_sae(cfg, hashed(resumed), out=tmp_path / "cut", resume=True, progress=False)
    assert len(whole) == cfg.n_steps and 0 < len(first) < cfg.n_steps
    # the resumed run fast-forwards the stream to its checkpoint's step, then trains on what the
    # uninterrupted run trained on at every later step
    assert resumed == whole


@pytest.mark.slow
def test_the_console_script_trains_an_sae_on_a_hugging_face_model_under_torchrun(tiny_gpt2, tmp_path):
    out = tmp_path / "sae"
    _run(["-m", "workbench", "sae", "train", "--model", f"hf:{tiny_gpt2}", "--hook", "blocks.1.hook_resid_post",
          "--n-tokens", "8192", "--batch-size", "512", "--rows", "200", "--out", str(out), "--no-progress",
          "--device", "cpu"], tmp_path, 2)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert len((out / "log.jsonl").read_text().splitlines()) >= 1


@pytest.mark.slow
def test_saes_spread_over_ranks_train_what_each_trains_alone(tmp_path):
    """Hook points dealt over 2 ranks (rank 0: hook a, rank 1: hook b) give the dictionaries that
    training each alone gives, bit for bit, each written by the rank that owns it."""
    _run([str(WORKER), "spread", str(tmp_path)], tmp_path, 1)
    _run([str(WORKER), "spread", str(tmp_path)], tmp_path, 2)
    for hook in ("a", "b"):
        alone = load_file(str(tmp_path / "alone" / hook / "sae_weights.safetensors"))
        spread = load_file(str(tmp_path / "spread" / hook / "sae_weights.safetensors"))
        assert all(torch.equal(alone[k], spread[k]) for k in alone), hook


@pytest.mark.slow
def test_two_ranks_train_the_model_one_process_trains(tmp_path):
    """`workbench train` under torchrun: each rank takes its half of step t's batch (a pure function of the
    seed and t, whatever the world size) and the gradients are averaged, so the weights after 20 steps
    match one process's, and rank 0 alone wrote the run folder."""
    worker = Path(__file__).with_name("train_worker.py")
    _run([str(worker), str(tmp_path / "one")], tmp_path, 1)
    _run([str(worker), str(tmp_path / "two")], tmp_path, 2)
    one, two = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "two"))
    assert one.keys() == two.keys()
    # b_K is left out: softmax ignores a bias added to every key, so its true gradient is 0 and what it
    # gets is rounding noise, which Adam scales up to steps of size lr in either run
    diffs = {k: float((one[k] - two[k]).abs().max()) for k in one if not k.endswith("attn.b_K")}
    assert max(diffs.values()) < 1e-5, diffs
    logs = [(tmp_path / run / "log.jsonl").read_text().splitlines() for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1])
    for a, b in zip(*logs):
        a, b = json.loads(a), json.loads(b)
        if "loss" in a:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)  # the logged loss is the whole batch's


def test_each_rank_reads_its_own_share_of_rows_and_batches():
    """The sharding the CLI uses, as a library call: rank r of w reads every w-th row (or store batch) from
    r, a w-th of each batch and every hook; with spread hooks, whole batches of its own hooks."""
    import pytest

    from workbench.errors import InputError
    from workbench.sae.sharding import RankShare, rank_share, store_batches
    from workbench.train.distributed import Dist

    hooks = ["a", "b", "c"]
    assert rank_share(Dist(1, 2), hooks, 64) == RankShare(hooks, 32, 1, 2)
    assert rank_share(Dist(1, 2), hooks, 64, spread=True) == RankShare(["b"], 64)
    assert rank_share(Dist(0, 1), hooks, 64) == RankShare(hooks, 64)
    with pytest.raises(InputError, match="does not split"):
        rank_share(Dist(0, 3), hooks, 64)
    with pytest.raises(InputError, match="at least as many --hook"):
        rank_share(Dist(0, 4), hooks, 64, spread=True)

    class Store:  # batches numbered in order, as a store's shuffled stream would come
        def batches(self, batch_size, seed, hooks):
            return iter(range(10))

    assert list(store_batches(Store(), RankShare(hooks, 32, 1, 2), 0)) == [1, 3, 5, 7, 9]
