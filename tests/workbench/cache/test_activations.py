"""The real-model activation pipeline: text from a folder or a saved dataset, tokenized until enough rows
exist, every row starting with the BOS; special tokens left out of training; the shuffle buffer's size."""

from __future__ import annotations

import pytest
import torch

import workbench
from workbench.cache.activations import model_activations, stream_activations
from workbench.cache.rows import special_ids, text_rows
from workbench.errors import InputError


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2):
    return workbench.load(f"hf:{tiny_gpt2}", device="cpu")


def test_text_rows_read_a_folder_or_a_saved_dataset_and_start_with_the_bos(gpt2, tmp_path):
    import datasets
    bos, _ = special_ids(gpt2)
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text("def main(): return the value of x\\n" * 20)
    rows = text_rows(gpt2, str(tmp_path / "docs"), n_rows=5, seq_len=16)
    assert rows.shape == (5, 16) and bool((rows[:, 0] == bos).all())
    datasets.Dataset.from_dict({"text": ["return the value of x " * 30] * 4}).save_to_disk(str(tmp_path / "ds"))
    rows = text_rows(gpt2, str(tmp_path / "ds"), n_rows=3, seq_len=8)
    assert rows.shape == (3, 8) and bool((rows[:, 0] == bos).all())
    with pytest.raises(InputError, match="fewer than"):
        text_rows(gpt2, str(tmp_path / "docs" / "0.txt"), n_rows=1, seq_len=10_000)


def test_special_tokens_are_left_out_of_training(gpt2):
    bos, special = special_ids(gpt2)
    tokens = torch.tensor([[bos, 5, 6, bos, 7, 8], [bos, 9, bos, bos, 10, 11]])
    hook = "blocks.0.hook_resid_post"
    kept = model_activations(gpt2, tokens, [hook], skip_first=1, exclude=sorted(special))[hook]
    everything = model_activations(gpt2, tokens, [hook], skip_first=1)[hook]
    assert len(everything) == 10 and len(kept) == 10 - 3  # the three BOS after position 0 are gone
    rows = tokens.repeat(8, 1)
    n = sum(len(b[hook]) for b in stream_activations(gpt2, rows, [hook], batch_size=7, buffer_batches=2, loop=False))
    assert n == 8 * 7  # 16 rows hold 56 ordinary tokens after position 0 (80 with the BOS): exactly those
    with pytest.raises(InputError, match="buffer_batches"):
        next(stream_activations(gpt2, rows, [hook], batch_size=7, buffer_batches=1))


def test_metrics_go_to_weights_and_biases_when_asked(monkeypatch):
    """wandb is optional: without it, --wandb is a clear error; with it, every log record is sent."""
    import sys
    import types

    from workbench.sae import SAEConfig, SAETrainConfig, TensorSource
    from workbench.sae.training import wandb_logger

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(InputError, match="pip install wandb"):
        wandb_logger("p", {})
    sent = []
    fake = types.SimpleNamespace(init=lambda project, config: types.SimpleNamespace(
        log=lambda data, step: sent.append((step, data))))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = SAETrainConfig(sae=SAEConfig(d_in=8, d_sae=16, k=2), n_tokens=20 * 64, batch_size=64, log_every=5,
                         n_checkpoints=0)
    from workbench.sae.modules import make_sae
    from workbench.sae.training import train_saes
    train_saes({"x": make_sae(cfg.sae)}, TensorSource(torch.randn(512, 8), 64), cfg, progress=False,
               on_log=wandb_logger("p", cfg.to_dict()))
    assert [s for s, _ in sent] == [5, 10, 15, 20] and "x/fvu" in sent[0][1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_bf16_autocast_trains_every_architecture_as_well_as_fp32(device):
    """precision='bf16': forward pass and losses in bfloat16, weights and optimizer in fp32; on data with
    known features the reconstruction ends as good as in fp32 (within 2% of the variance)."""
    from workbench.sae import SAEConfig, SAETrainConfig, TensorSource
    from workbench.sae.modules import make_sae
    from workbench.sae.synthetic import SyntheticFeatures
    from workbench.sae.training import train_saes

    x, _ = SyntheticFeatures(n_features=64, d=32, mean_active=4, seed=0).sample(8192)
    for arch in ("topk", "relu", "batchtopk", "jumprelu"):
        fvu = {}
        for precision in ("fp32", "bf16"):
            cfg = SAETrainConfig(sae=SAEConfig(d_in=32, d_sae=64, architecture=arch, k=4, l1_coefficient=1.0),
                                 n_tokens=60 * 512, batch_size=512, n_checkpoints=0, precision=precision,
                                 dead_window=2048)
            sae = make_sae(cfg.sae).to(device)
            logs = train_saes({"x": sae}, TensorSource(x.to(device), 512), cfg, progress=False)
            assert sae.W_enc.dtype == torch.float32  # master weights stay fp32
            fvu[precision] = logs["x"][-1]["fvu"]
        assert abs(fvu["bf16"] - fvu["fp32"]) < 0.02, (arch, fvu)
    with pytest.raises(Exception, match="precision"):
        SAETrainConfig(precision="fp16")


def test_sae_train_reads_a_text_folder_and_logs_tokens_per_second(tiny_gpt2, tmp_path):
    import json

    from workbench.cli import main

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("def main(): return the value of x\n" * 400)
    out = tmp_path / "sae"
    assert main(["sae", "train", "--model", f"hf:{tiny_gpt2}", "--hook", "blocks.0.hook_resid_post", "--text",
                 str(tmp_path / "docs"), "--rows", "64", "--seq-len", "32", "--buffer-batches", "2", "--keep-first",
                 "--n-tokens", "2048", "--batch-size", "256", "--out", str(out), "--no-progress", "--device",
                 "cpu"]) == 0
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert record["tokens"] == 2048 and record["tok_per_s"] > 0
