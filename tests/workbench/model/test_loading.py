"""Model folders: bit-exact round trips, corrupt files, presets from anywhere, and the HF path."""

from __future__ import annotations

import json

import pytest
import torch

import workbench
from tests.conftest import tiny_config
from workbench import CheckpointError, OfflineError, Transformer
from workbench.artifacts import CONFIG_FILE, WEIGHTS_FILE
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.model.loading import preset_names, resolve_device


@pytest.fixture
def saved(tmp_path, mlp_model):
    folder = tmp_path / "model"
    workbench.save_model(mlp_model, folder, {"note": "test"})
    return folder


def test_save_load_round_trip_is_bit_exact(saved, mlp_model, tokens):
    loaded = workbench.load(saved, device="cpu")
    assert loaded.cfg == mlp_model.cfg and loaded.meta["note"] == "test"
    for name, tensor in mlp_model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert torch.equal(loaded(tokens), mlp_model(tokens))
    assert loaded.to_string(loaded.to_tokens("abc")) == ["abc"]


def test_truncated_weights_are_caught(saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        workbench.load(saved)


def test_flipped_byte_is_caught(saved):
    data = bytearray((saved / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (saved / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        workbench.load(saved)


def test_missing_and_corrupt_files_are_clear_errors(saved, tmp_path):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        workbench.load(saved)
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        workbench.load(saved)
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        workbench.load(saved)
    with pytest.raises(CheckpointError, match="Valid names: .*attn-only-2l"):
        workbench.load("no-such-model")


def test_unknown_kind_and_future_format_are_refused(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, "kind": "workbench.Mystery"}))
    with pytest.raises(CheckpointError, match="known kinds"):
        workbench.load(saved)
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        workbench.load(saved)


def test_weights_that_do_not_fit_the_config_are_refused(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    meta["model"]["d_model"] = 48
    (saved / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the config"):
        workbench.load(saved)


def test_preset_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"attn-only-1l", "attn-only-2l", "gelu-2l"} <= set(preset_names())
    model = workbench.load("attn-only-2l", device="cpu")
    assert isinstance(model, Transformer) and model.cfg.n_layers == 2


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(workbench.InputError, match="Unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(workbench.InputError, match="no CUDA"):
            resolve_device("cuda")


def test_hf_path_gives_a_transformer_bridge(tiny_gpt2):
    from transformer_lens import TransformerBridge

    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    assert isinstance(bridge, TransformerBridge)
    tokens = torch.randint(0, 300, (2, 10))
    logits, cache = bridge.run_with_cache(tokens)
    assert logits.shape == (2, 10, 300)
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 2, 10, 10)
    assert bridge.W_Q.shape == (2, 2, 32, 16)


def test_hf_name_offline_is_a_clear_error():
    with pytest.raises(OfflineError, match="offline"):
        workbench.load("hf:gpt2")


def test_model_without_tokenizer_round_trips(tmp_path):
    model = Transformer(tiny_config())
    workbench.save_model(model, tmp_path / "m")
    loaded = workbench.load(tmp_path / "m", device="cpu")
    assert loaded.tokenizer is None
    with pytest.raises(workbench.InputError, match="no tokenizer"):
        loaded.to_tokens("x")
    assert Transformer(tiny_config(), tokenizer=TextCodec(byte_tokenizer())).tokenizer is not None


def _edited_copy(tiny_gpt2, tmp_path, name):
    import shutil

    folder = tmp_path / name
    shutil.copytree(tiny_gpt2, folder)
    return folder


def test_hf_folder_that_needs_remote_code_is_an_error_line(tiny_gpt2, tmp_path, capsys):
    from workbench.cli import main

    folder = _edited_copy(tiny_gpt2, tmp_path, "remote-code")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_gpt", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                 "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["run", "model-card", "--model", f"hf:{folder}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "auto_map" in err and "modeling_my.MyForCausalLM" in err, err
    assert "never runs code" in err and not (tmp_path / "r").exists()


def test_hf_folder_whose_remote_code_transformers_does_not_need_loads(tiny_gpt2, tmp_path):
    """An auto_map beside a model_type that transformers implements itself is never executed: it loads."""
    folder = _edited_copy(tiny_gpt2, tmp_path, "native")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_my.MyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    assert workbench.load(f"hf:{folder}", device="cpu").cfg.n_layers == 2


def test_hf_folder_with_only_pickled_weights_is_an_error_line(tiny_gpt2, tmp_path, capsys):
    from safetensors.torch import load_file

    from workbench.cli import main

    folder = _edited_copy(tiny_gpt2, tmp_path, "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert main(["run", "model-card", "--model", f"hf:{folder}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "pytorch_model.bin" in err and "safetensors" in err, err
    assert "pickle" in err and not (tmp_path / "r").exists()
    with pytest.raises(CheckpointError, match="pickle"):
        workbench.load(f"hf:{folder}")
