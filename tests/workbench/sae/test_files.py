"""SAE files in SAELens's layout (`workbench.sae.files`): a bit-exact round trip for every architecture,
files as SAELens writes them, damaged files as clear errors; and the SAELens options the workbench's SAE
modules have no switch for: each is honoured (folded into the weights, so encode and decode give what
SAELens gives) or refused with an error that names it. The expected outputs come from a direct
implementation of SAELens's forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import CheckpointError, ConfigError, InputError
from workbench.sae.files import load_sae, save_sae
from workbench.sae.modules import SAEConfig, make_sae

D_IN, D_SAE, K = 16, 48, 5


def _weights(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.3, "b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
         "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * torch.rand(D_SAE, 1, generator=gen) * 3,  # not unit-norm
         "b_dec": torch.randn(D_IN, generator=gen) * 2}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(D_SAE, generator=gen) * 0.2
    return w


def _write(folder, arch: str, weights: dict[str, torch.Tensor], **options) -> None:
    """A folder in SAELens's layout: cfg.json (SAELens field names) and sae_weights.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"hook_name": "blocks.0.hook_resid_post", "model_name": "gpt2"}, **options}
    if arch == "topk":
        cfg["k"] = K
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))


def saelens_forward(arch: str, w: dict[str, torch.Tensor], x: torch.Tensor, **options) -> torch.Tensor:
    """SAELens's encode then decode, written out from its definition, for the options under test."""
    folded = options.get("normalize_activations") == "expected_average_only_in"
    scale = options.get("norm_scaling_factor", 1.0) if folded else 1.0
    sae_in = x * scale - w["b_dec"] * options.get("apply_b_dec_to_input", True)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    rescale = options.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        pre = pre * norms
    if arch == "topk":
        top = pre.topk(K, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    elif arch == "jumprelu":
        f = pre * (pre > w["threshold"])
    else:
        f = pre.relu()
    if rescale:
        f = f / norms
    return (f @ w["W_dec"] + w["b_dec"]) / scale


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 3


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_apply_b_dec_to_input_false_is_honoured(tmp_path, x, arch):
    w = _weights(arch)
    _write(tmp_path, arch, w, apply_b_dec_to_input=False)
    expected = saelens_forward(arch, w, x, apply_b_dec_to_input=False)
    assert torch.allclose(load_sae(tmp_path)(x), expected, atol=1e-4)
    ignored = saelens_forward(arch, w, x)  # what the loader gave before: b_dec subtracted anyway
    assert (ignored - expected).abs().max() > 0.1


def test_rescale_acts_by_decoder_norm_is_honoured_for_topk(tmp_path, x):
    w = _weights("topk")
    _write(tmp_path, "topk", w, rescale_acts_by_decoder_norm=True)
    sae = load_sae(tmp_path)
    expected = saelens_forward("topk", w, x, rescale_acts_by_decoder_norm=True)
    assert torch.allclose(sae(x), expected, atol=1e-4)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = (pre * w["W_dec"].norm(dim=-1)).topk(K, dim=-1)
    assert torch.equal(sae.encode(x).topk(K, dim=-1).indices.sort(-1).values, top.indices.sort(-1).values)
    assert (saelens_forward("topk", w, x) - expected).abs().max() > 0.1  # ignoring the option is far off


def test_rescale_acts_by_decoder_norm_on_another_architecture_is_refused(tmp_path):
    _write(tmp_path, "standard", _weights("standard"), rescale_acts_by_decoder_norm=True)
    with pytest.raises(CheckpointError, match="rescale_acts_by_decoder_norm"):
        load_sae(tmp_path)


def test_expected_average_only_in_is_folded_with_its_scaling_factor_and_refused_without(tmp_path, x):
    w = _weights("jumprelu")
    options = {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 0.25,
               "apply_b_dec_to_input": False}
    _write(tmp_path / "with", "jumprelu", w, **options)
    assert torch.allclose(load_sae(tmp_path / "with")(x), saelens_forward("jumprelu", w, x, **options), atol=1e-4)
    _write(tmp_path / "without", "jumprelu", w, normalize_activations="expected_average_only_in")
    with pytest.raises(CheckpointError, match="norm_scaling_factor"):
        load_sae(tmp_path / "without")


@pytest.mark.parametrize("mode", ["constant_norm_rescale", "layer_norm"])
def test_per_token_normalisation_is_refused_by_name(tmp_path, mode):
    _write(tmp_path, "topk", _weights("topk"), normalize_activations=mode)
    with pytest.raises(CheckpointError, match=mode):
        load_sae(tmp_path)


def test_a_plain_file_still_loads_bit_exactly(tmp_path, x):
    w = _weights("topk")
    _write(tmp_path, "topk", w)
    sae = load_sae(tmp_path)
    assert torch.equal(sae.W_enc, w["W_enc"]) and torch.equal(sae.b_enc, w["b_enc"])
    assert torch.allclose(sae(x), saelens_forward("topk", w, x), atol=1e-5)


# -- round trips, SAELens's own files, damaged files ---------------------------------------------------
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    sae = make_sae(SAEConfig(d_in=16, d_sae=48, architecture=arch, k=4, hook_name="blocks.0.hook_resid_post"))
    x = torch.randn(64, 16)
    if arch == "batchtopk":
        sae.train_forward(x)  # learns its inference threshold
    sae.eval()
    loaded = load_sae(save_sae(sae, tmp_path / arch))
    assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    weights = load_file(str(tmp_path / arch / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (16, 48) and weights["W_dec"].shape == (48, 16)
    if arch == "jumprelu":
        assert torch.equal(weights["threshold"], sae.threshold.detach())  # stored directly, not as a log


def _saelens_folder(folder: Path, architecture: str, extra: dict, weights: dict) -> Path:
    """Files as SAELens 6 writes them: its field names, its tensor keys."""
    folder.mkdir()
    cfg = {"architecture": architecture, "d_in": 8, "d_sae": 12, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "hook_head_index": None,
                        "prepend_bos": True, "dataset_path": "x", "context_size": 128}, **extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


@pytest.mark.parametrize("architecture,extra", [("standard", {}), ("topk", {"k": 3}), ("jumprelu", {})])
def test_loads_files_written_in_saelens_layout(tmp_path, architecture, extra):
    gen = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(8, 12, generator=gen), "b_enc": torch.randn(12, generator=gen),
         "W_dec": torch.randn(12, 8, generator=gen), "b_dec": torch.randn(8, generator=gen)}
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(12, generator=gen)
    sae = load_sae(_saelens_folder(tmp_path / architecture, architecture, extra, w))
    x = torch.randn(5, 8, generator=gen)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        f = torch.relu(pre)
    elif architecture == "topk":
        top = pre.topk(3, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        f = pre * (pre > w["threshold"])
    assert torch.allclose(sae.encode(x), f, atol=1e-6)
    assert torch.allclose(sae(x), f @ w["W_dec"] + w["b_dec"], atol=1e-5)
    assert sae.cfg.hook_name == "blocks.3.hook_resid_pre" and sae.cfg.model_name == "gpt2"


def test_bad_sae_files_are_clear_errors(tmp_path):
    w = {k: torch.zeros(*s) for k, s in {"W_enc": (8, 12), "b_enc": (12,), "W_dec": (12, 8), "b_dec": (8,)}.items()}
    with pytest.raises(CheckpointError, match="architecture"):
        load_sae(_saelens_folder(tmp_path / "gated", "gatedd", {}, w))
    with pytest.raises(CheckpointError, match="not an SAE folder"):
        load_sae(tmp_path / "nothing")
    bad = _saelens_folder(tmp_path / "short", "standard", {}, {**w, "W_dec": torch.zeros(12, 7)})
    with pytest.raises(CheckpointError, match="W_dec"):
        load_sae(bad)
    with pytest.raises(ConfigError, match="architecture"):
        SAEConfig(d_in=8, d_sae=12, architecture="gated")
    with pytest.raises(ConfigError, match="at most d_sae"):
        SAEConfig(d_in=8, d_sae=12, architecture="topk", k=32)
    sae = make_sae(SAEConfig(d_in=8, d_sae=12, architecture="relu"))
    with pytest.raises(InputError, match="d_in = 8"):
        sae.encode(torch.zeros(3, 9))
