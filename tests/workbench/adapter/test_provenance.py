"""The one reader of what a model's folder records: its name, training log, checkpoints and validation
rows, read from a real training run; nothing (and why) for a model without a folder, a bridge, or a
folder that records no training."""

from __future__ import annotations

import json

import pytest
import torch

import workbench
from tests.conftest import tiny_config, tiny_train_config
from workbench.adapter.provenance import (
    checkpoints,
    comparable_name,
    model_label,
    model_name_of,
    run_folder,
    tokens_seen,
    training_data,
    training_log,
    validation_rows,
)
from workbench.data.text import DataConfig
from workbench.errors import ConfigError
from workbench.train.lm import evaluate, train

CFG = tiny_train_config()  # 20 steps on synthetic rows only, evaluated and checkpointed at 5 log-spaced steps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train(CFG, tmp_path_factory.mktemp("runs") / "tiny-run", progress=False)


def test_a_trained_run_gives_its_name_and_the_log_its_trainer_wrote(run):
    model = workbench.load(run, device="cpu")
    assert model_name_of(model) == "tiny-run" and model_label(model) == "tiny-run"
    assert run_folder(model) == (run, "")
    rows, why = training_log(model)
    assert why == "" and rows == [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss_synthetic" in r]
    assert set(CFG.checkpoint_steps) <= {r["step"] for r in evals}  # evaluated at every checkpoint (and more)
    assert rows[0]["step"] == 0 and evals[-1]["step"] == CFG.n_steps == 20
    assert evals[-1]["tokens"] == 20 * CFG.tokens_per_step


def test_a_trained_run_gives_its_checkpoints_each_loading_the_weights_of_its_step(run):
    model = workbench.load(run, device="cpu")
    found, why = checkpoints(model)
    assert why == "" and [c.step for c in found] == CFG.checkpoint_steps
    assert [c.folder.name for c in found][:2] == ["step_000000", f"step_{CFG.checkpoint_steps[1]:06d}"]
    first, last = found[0].load(torch.device("cpu")), found[-1].load(torch.device("cpu"))
    assert first.meta["step"] == 0 and last.meta["step"] == 20
    assert tokens_seen(first) == 0 and tokens_seen(last) == tokens_seen(model) == 20 * CFG.tokens_per_step
    assert not torch.equal(first.W_E, last.W_E)  # training moved the weights
    assert torch.allclose(last.W_E, model.W_E, atol=1e-2)  # the last checkpoint is the final model (fp16 or fp32)


def test_validation_rows_are_those_the_trainer_evaluated_on(run):
    model = workbench.load(run, device="cpu")
    assert training_data(model) == (CFG.data, "")
    rows, what = validation_rows(model, 64)  # the trainer's validation set: 64 rows
    assert what == "synthetic validation rows" and rows.shape == (64, CFG.model.n_ctx)
    assert rows.dtype == torch.int64 and int(rows.max()) < 256
    logged = next(r for r in training_log(model)[0] if r["step"] == 20 and "val_loss_synthetic" in r)
    again = evaluate(model, {"synthetic": rows})["val_loss_synthetic"]
    assert again == pytest.approx(logged["val_loss_synthetic"], abs=1e-5)  # the very rows, not look-alikes
    assert torch.equal(validation_rows(model, 64)[0], rows)  # rebuilt the same every time


def test_text_rows_need_a_tokenizer_and_a_bad_record_is_refused(run):
    model = workbench.load(run, device="cpu")
    model.meta = {**model.meta, "train": {**model.meta["train"], "data": {"synthetic_fraction": 0.5}}}
    model.tokenizer = None
    assert training_data(model) == (DataConfig(synthetic_fraction=0.5), "")
    assert validation_rows(model, 4) == (None, "the model has no tokenizer to rebuild the text it was trained on")
    model.meta = {**model.meta, "train": {"data": {"synthetic_fractoin": 0.5}}}
    with pytest.raises(ConfigError, match=r"Unknown DataConfig field.*synthetic_fractoin.*config.json"):
        validation_rows(model, 4)


def test_a_folder_without_a_log_or_checkpoints_says_so(attn_model, tmp_path):
    workbench.save_model(attn_model, tmp_path / "saved")
    model = workbench.load(tmp_path / "saved", device="cpu")
    assert model_name_of(model) == "saved"
    assert training_log(model) == ([], f"{tmp_path / 'saved'} has no training log (log.jsonl)")
    assert checkpoints(model) == ([], f"{tmp_path / 'saved'} has no training checkpoints under checkpoints/")
    assert validation_rows(model, 4) == (None, "no training data recorded in the model folder")
    assert tokens_seen(model) is None


def test_a_model_built_in_memory_has_no_folder_and_says_why():
    model = workbench.Transformer(tiny_config())
    assert model_name_of(model) == "" and model_label(model) == "Transformer"
    folder, why = run_folder(model)
    assert folder is None and "this Transformer was not loaded from a workbench model folder" in why
    assert training_log(model) == ([], why) and checkpoints(model) == ([], why)
    assert validation_rows(model, 4) == (None, why) and training_data(model) == (None, why)
    assert tokens_seen(model) is None


def test_a_bridge_has_a_hub_name_and_no_training_record(tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    assert model_name_of(bridge) == tiny_gpt2.name and model_label(bridge) == tiny_gpt2.name
    folder, why = run_folder(bridge)
    assert folder is None and why.startswith("this TransformerBridge was not loaded from a workbench model folder")
    assert training_log(bridge) == ([], why) and checkpoints(bridge) == ([], why)
    assert validation_rows(bridge, 4) == (None, why) and tokens_seen(bridge) is None


@pytest.mark.parametrize("recorded, name", [("gpt2", "gpt2"), ("hf:openai-community/gpt2", "gpt2"),
                                            ("hf_gpt2", "gpt2"), ("hf:/data/models/gpt2/", "gpt2"),
                                            ("C:\\models\\pythia-70m", "pythia-70m"), ("", "")])
def test_recorded_names_compare_as_model_name_of_spells_them(recorded, name):
    assert comparable_name(recorded) == name
