"""Grokking: the modular-addition task and trainer, the Fourier machinery on functions whose answer is
known, bad input, and the paper's findings measured on the shipped p = 53 model (loaded, not trained)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import lru_cache

import numpy as np
import pytest
import torch

import workbench
from analyses.grokking import (
    TERMS,
    GrokkingConfig,
    compute,
    figures,
    find_key_frequencies,
    fourier_basis,
    frequency_energy,
    gini,
    key_projection,
    logit_decomposition,
    term_shares,
)
from tests.conftest import assert_colorbars_titled, signal_on_call
from workbench.artifacts import has_state, list_checkpoints, read_config, strict_json
from workbench.cli import main as cli_main
from workbench.errors import ConfigError, InputError, TrainingDiverged
from workbench.model.loading import models_dir
from workbench.report.pipeline import run_analysis, write_report
from workbench.report.plotting import caption_of
from workbench.train import modular as modular_module
from workbench.train.modular import (
    ModularConfig,
    answer_logits,
    answer_logits_fast,
    evaluate,
    is_prime,
    load_modular_config,
    modular_data,
    train_modular,
)
from workbench.train.runs import TrainingInterrupted

SHIPPED = "modular-addition"


def tiny(**overrides) -> ModularConfig:
    """A modular-addition run of about a second."""
    base = dict(p=11, d_model=32, n_heads=4, d_mlp=64, n_steps=30, warmup_steps=2, eval_every=5, n_checkpoints=5,
                first_checkpoint=2)
    return ModularConfig(**{**base, **overrides})


# -- the task ------------------------------------------------------------------------------------------
def test_the_data_are_every_pair_with_its_sum_and_a_seeded_split():
    data = modular_data(13, 0.5, seed=3)
    a, b, eq = data.tokens_N3.T
    assert len(data.labels_N) == 169 and torch.equal(data.labels_N, (a + b) % 13) and (eq == 13).all()
    assert len(data.train_idx) == round(0.5 * 169) and len(data.train_idx) + len(data.test_idx) == 169
    assert not set(data.train_idx.tolist()) & set(data.test_idx.tolist())
    assert torch.equal(modular_data(13, 0.5, seed=3).train_idx, data.train_idx)
    assert not torch.equal(modular_data(13, 0.5, seed=4).train_idx, data.train_idx)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_a_training_fraction_outside_zero_one_is_a_clear_error(fraction):
    with pytest.raises(ConfigError, match=r"ModularConfig.train_fraction must be strictly between 0 and 1"):
        ModularConfig(train_fraction=fraction)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        modular_data(11, fraction)


def test_a_composite_p_warns_and_goes_on():
    assert is_prime(53) and is_prime(113) and not is_prime(51)
    with pytest.warns(UserWarning, match="p=12 is not prime.*Fourier analysis"):
        cfg = ModularConfig(p=12)
    assert cfg.model.d_vocab == 13


def test_the_presets_are_the_papers_model():
    name, cfg = load_modular_config(SHIPPED)
    m = cfg.model
    assert name == SHIPPED and cfg.p == 53 and cfg.train_fraction == 0.5
    assert (m.n_layers, m.d_model, m.n_heads, m.d_mlp, m.act_fn, m.normalization_type) == (1, 128, 4, 512, "relu", None)
    assert (cfg.lr, cfg.weight_decay, cfg.beta1, cfg.beta2) == (1e-3, 1.0, 0.9, 0.98)
    assert load_modular_config("modular-addition-p113")[1].p == 113
    assert load_modular_config("attn-only-2l") is None  # a language-model preset is not ours


# -- the trainer ---------------------------------------------------------------------------------------
def test_training_writes_checkpoints_a_log_and_a_loadable_model(tmp_path):
    cfg = tiny()
    out = train_modular(cfg, tmp_path / "run", progress=False)
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == cfg.checkpoint_steps and steps[0] == 0 and steps[-1] == cfg.n_steps
    for _, folder in list_checkpoints(out):
        assert not has_state(folder) and read_config(folder)["weights_dtype"] == "float16"
    model = workbench.load(out, device="cpu")
    assert model.W_E.dtype == torch.float32 and model.meta["train"]["task"] == "modular-addition"
    assert model.to_tokens("3 5 =").tolist() == [[3, 5, 11]]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"train_loss", "test_loss", "train_acc", "test_acc", "weight_norm"} <= set(log[-1])
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    final = evaluate(model, modular_data(cfg.p, cfg.train_fraction, cfg.data_seed))
    assert final["train_loss"] == pytest.approx(model.meta["train_loss"])
    with pytest.raises(InputError, match="already holds a training run"):
        train_modular(cfg, out, progress=False)


def test_ctrl_c_saves_and_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg = tiny()
    straight = train_modular(cfg, tmp_path / "straight", progress=False)
    with monkeypatch.context() as m:
        signal_on_call(m, torch.optim.AdamW, "step", 13)
        with pytest.raises(TrainingInterrupted, match="Continue with") as stop:
            train_modular(cfg, tmp_path / "resumed", progress=False)
    assert 0 < stop.value.step < cfg.n_steps and has_state(stop.value.folder)
    resumed = train_modular(cfg, tmp_path / "resumed", resume=True, progress=False)
    a = workbench.load(straight, device="cpu").state_dict()
    b = workbench.load(resumed, device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_before_the_step_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = modular_module.answer_logits_fast, [0]

    def poisoned(model, tokens):
        calls[0] += 1
        out = real(model, tokens)
        return out * float("nan") if calls[0] > 12 else out

    monkeypatch.setattr(modular_module, "answer_logits_fast", poisoned)
    with pytest.raises(TrainingDiverged, match="last good checkpoint is .*step_0000"):
        train_modular(tiny(), tmp_path / "run", progress=False)
    for _, folder in list_checkpoints(tmp_path / "run"):
        weights = workbench.load(folder, device="cpu").state_dict()
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_cli_trains_a_modular_config(tmp_path):
    cfg = {**tiny(n_steps=6, n_checkpoints=2).to_dict(), "description": "tiny"}
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    assert cli_main(["train", str(tmp_path / "m.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert workbench.load(tmp_path / "run", device="cpu").meta["step"] == 6


def test_the_fast_training_forward_equals_the_hooked_model_and_its_gradients():
    cfg = tiny(p=13)
    model = workbench.Transformer(cfg.model)
    data = modular_data(13, 0.5)
    fast = answer_logits_fast(model, data.tokens_N3)
    assert torch.allclose(fast, answer_logits(model, data.tokens_N3), atol=1e-5)
    grads = []
    for fn in (answer_logits, answer_logits_fast):
        model.zero_grad()
        torch.nn.functional.cross_entropy(fn(model, data.tokens_N3), data.labels_N).backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    for name, g in grads[0].items():  # W_pos[0..1]'s row of '=' and the like get zero, not None, from the hooked path
        assert torch.allclose(g, grads[1].get(name, torch.zeros_like(g)), atol=1e-6), name
    with pytest.raises(InputError, match="for the modular-addition model"):
        answer_logits_fast(workbench.Transformer(replace(cfg.model, normalization_type="LN")), data.tokens_N3)


# -- the Fourier machinery, on functions whose decomposition is known -----------------------------------
P = 13
X = torch.arange(P, dtype=torch.float64)
A, B = X[:, None], X[None, :]
W = 2 * math.pi * 3 / P


def test_the_fourier_basis_is_orthonormal_and_named():
    for p in (13, 12):
        basis, names, freq = fourier_basis(p)
        assert torch.allclose(basis @ basis.T, torch.eye(p, dtype=torch.float64), atol=1e-10)
        assert names[0] == "const" and freq.max() == p // 2 and len(names) == p


@pytest.mark.parametrize("fn, term", [
    (lambda: torch.cos(W * (A + B)), "a + b"), (lambda: torch.sin(W * (A + B)), "a + b"),
    (lambda: torch.cos(W * (A - B)), "a − b"), (lambda: torch.cos(W * A) + 0 * B, "a alone"),
    (lambda: torch.sin(W * B) + 0 * A, "b alone"), (lambda: torch.cos(2 * W * (A + B)), "other frequencies"),
])
def test_term_shares_find_the_term_a_function_is_made_of(fn, term):
    shares, variance = term_shares(fn()[:, :, None], P, [3])
    assert shares[0, TERMS.index(term)] == pytest.approx(1.0, abs=1e-9) and variance[0] > 0


def test_logits_made_of_key_waves_are_explained_by_them_and_kept_by_the_projection():
    c = X[None, None, :]
    s = A[..., None] + B[..., None] - c
    logits = 2 * torch.cos(W * s) + torch.cos(5 * W / 3 * s)
    share = logit_decomposition(logits, P)
    assert share[3] == pytest.approx(0.8, abs=1e-9) and share[5] == pytest.approx(0.2, abs=1e-9)
    flat = logits.reshape(P * P, P)
    assert torch.allclose(key_projection(flat, P, [3, 5]), flat, atol=1e-9)
    assert torch.allclose(key_projection(flat, P, [3]), (2 * torch.cos(W * s)).reshape(P * P, P), atol=1e-9)


def test_gini_and_key_frequencies():
    assert gini(np.ones(10)) == pytest.approx(0) and gini(np.eye(10)[0]) == pytest.approx(0.9)
    share = np.full(7, 0.01)
    share[[2, 5]] = 0.4
    assert find_key_frequencies(share / share.sum(), 5) == [2, 5]
    energy = frequency_energy(torch.cos(W * X)[:, None], P)
    assert energy.argmax() == 3 and energy[3] == pytest.approx(energy.sum())


# -- bad input to the analysis ---------------------------------------------------------------------------
def test_a_model_that_is_not_modular_addition_is_a_clear_error(attn_model):
    with pytest.raises(InputError, match="needs a model trained on modular addition.*workbench run grokking"):
        compute(attn_model, GrokkingConfig())
    with pytest.raises(InputError, match="trained on modular addition"):
        run_analysis("grokking", "attn-only-1l", device="cpu")


def test_a_composite_p_model_is_analysed_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="not prime"):
        cfg = tiny(p=9, n_steps=4, n_checkpoints=2)
        out = train_modular(cfg, tmp_path / "run", progress=False)
    with pytest.warns(UserWarning, match="p=9 is not prime"):
        result = compute(workbench.load(out, device="cpu"), GrokkingConfig())
    assert any("not prime" in h for h in result.headlines())


def test_key_frequencies_beyond_p_half_are_an_error(tmp_path):
    out = train_modular(tiny(n_steps=4, n_checkpoints=2), tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="exceed p // 2 = 5"):
        compute(workbench.load(out, device="cpu"), GrokkingConfig(key_frequencies=(7,)))
    with pytest.raises(ConfigError, match="GrokkingConfig.key_frequencies"):
        GrokkingConfig(key_frequencies=(0,))


# -- the shipped p = 53 model: what the paper found, measured ----------------------------------------------
@lru_cache(maxsize=None)
def _shipped():
    return compute(workbench.load(SHIPPED, device="cpu"), GrokkingConfig())


def test_the_shipped_model_is_small_and_trained_within_minutes():
    folder = models_dir() / SHIPPED
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10e6
    meta = read_config(folder)
    assert meta["train_seconds"] <= 600 and len(list_checkpoints(folder)) >= 12


def test_test_accuracy_is_at_most_half_early_and_reaches_one_later_and_the_report_marks_when():
    r = _shipped()
    c = r.curves
    marks = r.test_acc_marks()
    half, one = marks["test_acc_above_half_step"], marks["test_acc_one_step"]
    assert half is not None and one is not None and half < one
    assert (c.test_acc[c.steps < half] <= 0.5).all()
    memorised = r.phases["memorisation_end"]
    assert c.train_acc[c.steps == memorised][0] == 1.0 and memorised < half
    assert c.test_acc[c.steps == memorised][0] <= 0.5  # every training pair right, the test set mostly wrong
    assert r.final["test_acc"] == 1.0
    assert r.metrics()["test_acc_one_step"] == one and f"reaches 100% at step {one}" in r.headlines()[0]


def test_a_handful_of_key_frequencies_hold_most_of_the_embeddings_energy():
    r = _shipped()
    assert 3 <= len(r.key_frequencies) <= 7 and r.keys_found
    assert r.key_embed_share >= 0.7
    uniform = len(r.key_frequencies) / (len(r.embed_share) - 1)
    assert r.key_embed_share > 3 * uniform


def test_neurons_and_logits_are_functions_of_the_key_frequencies():
    r = _shipped()
    assert r.neuron_fve >= 0.8
    live = r.neuron_variance > 0.01 * r.neuron_variance.max()
    assert np.isin(r.neuron_frequency[live], r.key_frequencies).mean() >= 0.9
    assert r.key_logit_share >= 0.7
    per_term = r.metrics()["neuron_variance_by_term"]
    assert per_term["a + b"] > per_term["a − b"]  # the MLP computes cos/sin(w(a+b))


def test_restricted_loss_falls_before_test_loss_and_excluded_loss_rises_in_circuit_formation():
    r = _shipped()
    checks = r.progress_checks()
    assert checks["restricted_falls_before_test"] is True
    assert checks["excluded_rises_in_circuit_formation"] is True
    ph = r.phases
    assert ph["memorisation_end"] < ph["circuit_formation_end"] < ph["cleanup_end"]
    g = r.progress
    assert g.gini_embed[-1] > g.gini_embed[0] + 0.2  # the spectrum gets sparse
    assert r.curves.weights_sq[-1] < r.curves.weights_sq.max()  # weight decay cleans up


def test_the_report_has_captioned_titled_figures_and_strict_metrics(tmp_path):
    r = _shipped()
    figs = figures(r)
    assert {"loss and accuracy over training", "progress measures: restricted and excluded loss",
            "embedding spectrum", "logits in cos(w(a+b−c))"} <= set(figs)
    for name, fig in figs.items():
        assert caption_of(fig) and fig.layout.title.text, name
    assert_colorbars_titled(figs)
    assert figs["loss and accuracy over training"].layout.xaxis.type == "log"
    json.dumps(strict_json(r.metrics()), allow_nan=False)
    section = run_analysis("grokking", SHIPPED, replace(GrokkingConfig(), progress_measures=False), device="cpu")
    path = write_report(tmp_path / "report", [section])
    assert "Grokking" in (path / "grokking.html").read_text()
