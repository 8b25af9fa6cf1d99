"""circuit-tracer's transcoder files: the layout that benchmarks/circuit_tracer_check.py verified against
circuit-tracer 0.5's own loader and attribution, pinned here without its venv.

What the check found circuit-tracer to read (its `load_relu_transcoder` and `SingleLayerTranscoder`):
`config.yaml` with `model_kind: transcoder_set` and `transcoders` a list of path strings in layer
order; per layer W_enc [d_tc, d_model] used as F.linear(x, W_enc, b_enc), W_dec [d_tc, d_model],
b_enc, b_dec, W_skip used as x @ W_skip.T, and `activation_function.threshold` making a JumpReLU
(anything else is a ReLU). The formulas below are those, written out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import tiny_config
from workbench.artifacts import CIRCUIT_TRACER_CONFIG_FILE
from workbench.cli import main
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.errors import CheckpointError, InputError
from workbench.model.transformer import Transformer
from workbench.sae.circuit_tracer_format import (
    FORMAT_VERSION,
    THRESHOLD,
    export_circuit_tracer,
    load_circuit_tracer,
)
from workbench.sae.transcoders import Transcoders, as_transcoders, make_transcoders


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(tiny_config(d_mlp=64, n_ctx=32), tokenizer=TextCodec(byte_tokenizer())).eval()


def _set(model, arch: str, skip: bool) -> Transcoders:
    """Per-layer transcoders with every weight moved off its init (biases, skip, thresholds)."""
    d = make_transcoders(model, 48, arch, k=6, skip=skip, model_name="tiny")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in d.values():
            t.b_enc.copy_(torch.randn(t.b_enc.shape, generator=gen) * 0.1)
            t.b_dec.copy_(torch.randn(t.b_dec.shape, generator=gen))
            if skip:
                t.W_skip.copy_(torch.randn(t.W_skip.shape, generator=gen) * 0.2)
            if arch == "jumprelu":
                t.threshold.copy_(torch.rand(t.threshold.shape, generator=gen) * 0.3)
            if arch == "batchtopk":
                t.threshold.fill_(0.15)
    return as_transcoders(d, 2, "tiny")


def circuit_tracer_forward(w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations, output) as circuit-tracer's SingleLayerTranscoder computes them from the file."""
    pre = F.linear(x, w["W_enc"], w["b_enc"])
    f = pre * (pre > w[THRESHOLD]) if THRESHOLD in w else F.relu(pre)
    out = f @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return f, out


@pytest.mark.parametrize("arch,skip", [("batchtopk", True), ("jumprelu", True), ("relu", False)])
def test_the_files_compute_what_the_transcoders_compute(model, tmp_path, arch, skip):
    tc = _set(model, arch, skip)
    folder = export_circuit_tracer(tc, tmp_path / "ct")
    config = yaml.safe_load((folder / CIRCUIT_TRACER_CONFIG_FILE).read_text())
    assert config["model_kind"] == "transcoder_set" and config["workbench_format"] == FORMAT_VERSION
    assert config["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors"]  # strings, in layer order
    assert config["feature_input_hook"] == "mlp.hook_in" and config["feature_output_hook"] == "hook_mlp_out"
    assert isinstance(config["scan"], str) and config["skip_connection"] is skip
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(0))
    for l in range(2):
        w = load_file(str(folder / config["transcoders"][l]))
        expected = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"W_skip"} if skip else set()) | (
            {THRESHOLD} if arch != "relu" else set())
        assert set(w) == expected
        assert w["W_enc"].shape == (48, 32) and w["W_dec"].shape == (48, 32)
        f, out = circuit_tracer_forward(w, x)
        t = tc.per_layer[l]
        assert torch.allclose(f, t.encode(x), atol=1e-6)
        assert (f > 0).sum() == (t.encode(x) > 0).sum()
        assert torch.allclose(out, t(x), atol=1e-5)


def test_what_circuit_tracer_cannot_represent_is_refused(model, tmp_path):
    with pytest.raises(InputError, match="TopK.*--arch batchtopk"):
        export_circuit_tracer(_set(model, "topk", True), tmp_path / "ct")
    clt = make_transcoders(model, 32, "topk", k=4, cross_layer=True)
    with pytest.raises(InputError, match="cross-layer"):
        export_circuit_tracer(as_transcoders(clt, 2), tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_export_never_overwrites_a_folder_it_did_not_write(model, tmp_path, capsys, monkeypatch):
    tc = _set(model, "relu", False)
    tc.save(tmp_path / "tc")
    mine = tmp_path / "ct"
    mine.mkdir()
    (mine / "config.yaml").write_text("mine\n")
    assert main(["transcoder", "export", "--transcoders", str(tmp_path / "tc"), "--out", str(mine)]) == 2
    assert "error:" in capsys.readouterr().err
    assert (mine / "config.yaml").read_text() == "mine\n" and [p.name for p in mine.iterdir()] == ["config.yaml"]
    monkeypatch.chdir(mine)  # `--out .` in a folder holding the user's files
    assert main(["transcoder", "export", "--transcoders", str(tmp_path / "tc"), "--out", "."]) == 2
    assert (mine / "config.yaml").read_text() == "mine\n"
    (tmp_path / "a-file").write_text("x")
    assert main(["transcoder", "export", "--transcoders", str(tmp_path / "tc"), "--out",
                 str(tmp_path / "a-file")]) == 2
    assert (tmp_path / "a-file").read_text() == "x"
    assert main(["transcoder", "export", "--transcoders", str(tmp_path / "tc"), "--out", str(tmp_path / "new")]) == 0
    assert main(["transcoder", "export", "--transcoders", str(tmp_path / "tc"), "--out", str(tmp_path / "new")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "ct", "new", "tc"]  # no temporary left


def _circuit_tracer_folder(folder, tc: Transcoders, config: dict) -> None:
    """Files as circuit-tracer's own `to_safetensors` writes them, and a YAML config."""
    folder.mkdir()
    for l in range(tc.n_layers):
        t = tc.per_layer[l]
        w = {"W_enc": t.W_enc.T, "W_dec": t.W_dec, "b_enc": t.b_enc, "b_dec": t.b_dec}
        if t.cfg.skip:
            w["W_skip"] = t.W_skip.T
        if t.cfg.arch == "jumprelu":
            w[THRESHOLD] = t.threshold
        save_file({k: v.detach().contiguous() for k, v in w.items()}, str(folder / f"tc{l}.safetensors"))
    base = {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
            "scan": "mine", "transcoders": ["tc0.safetensors", "tc1.safetensors"]}
    (folder / CIRCUIT_TRACER_CONFIG_FILE).write_text(yaml.safe_dump({**base, **config}))


def test_circuit_tracers_own_files_are_read(model, tmp_path):
    tc = _set(model, "jumprelu", True)
    _circuit_tracer_folder(tmp_path / "ct", tc, {})
    back = load_circuit_tracer(tmp_path / "ct", model=model)
    x = torch.randn(6, 32)
    for l in range(2):
        assert back.per_layer[l].cfg.arch == "jumprelu" and back.per_layer[l].cfg.skip
        assert torch.allclose(back.per_layer[l](x), tc.per_layer[l](x), atol=1e-6)


@pytest.mark.parametrize("config,match", [
    ({"feature_input_hook": "ln2.hook_normalized"}, "before ln2's weight and bias"),
    ({"feature_input_hook": "hook_resid_mid"}, "feature_input_hook"),
    ({"feature_output_hook": "hook_resid_post"}, "feature_output_hook"),
    ({"model_kind": "cross_layer_transcoder"}, "per-layer transcoder sets only"),
    ({"transcoders": [{"layer": 0, "path": "tc0.safetensors"}]}, "first workbench export"),
    ({"transcoders": ["../outside.safetensors", "tc1.safetensors"]}, "leads outside"),
    ({"transcoders": ["/etc/passwd", "tc1.safetensors"]}, "leads outside"),
    ({"transcoders": ["hf://mwhanna/x/layer_0.safetensors", "tc1.safetensors"]}, "hub"),
    ({"transcoders": ["tc0.safetensors", "missing.safetensors"]}, "missing"),
    ({"workbench_format": 1}, "older workbench export"),
    ({"activation_function": "topk"}, "refuses rather than guess"),
])
def test_files_it_cannot_read_are_refused(model, tmp_path, config, match):
    (tmp_path / "outside.safetensors").write_bytes(b"")
    _circuit_tracer_folder(tmp_path / "ct", _set(model, "relu", False), config)
    with pytest.raises(CheckpointError, match=match):
        load_circuit_tracer(tmp_path / "ct")


def test_damaged_layer_files_are_refused(model, tmp_path):
    _circuit_tracer_folder(tmp_path / "ct", _set(model, "jumprelu", True), {})
    path = tmp_path / "ct" / "tc1.safetensors"
    w = load_file(str(path))
    cases = [
        ({k: v for k, v in w.items() if k != "b_dec"}, "b_enc and b_dec"),
        ({**w, "W_enc": w["W_enc"].T.contiguous()}, "W_enc should have shape"),
        ({**w, "W_skip": torch.zeros(3, 3)}, "W_skip should have shape"),
        ({**w, "threshold": w[THRESHOLD].clone()}, "does not read"),
        ({**w, "W_dec": torch.full_like(w["W_dec"], float("nan"))}, "NaN"),
    ]
    for tensors, match in cases:
        save_file(tensors, str(path))
        with pytest.raises(CheckpointError, match=match):
            load_circuit_tracer(tmp_path / "ct")
    path.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_circuit_tracer(tmp_path / "ct")
    (tmp_path / "ct" / CIRCUIT_TRACER_CONFIG_FILE).write_text("transcoders: [unclosed")
    with pytest.raises(CheckpointError, match="YAML"):
        load_circuit_tracer(tmp_path / "ct")
