"""The Fourier analysis of modular addition (workbench.compute.fourier), on functions and models whose
decomposition is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import workbench
from workbench.compute import fourier
from workbench.compute.fourier import (
    TERMS,
    dominant_frequency,
    find_key_frequencies,
    fourier_basis,
    frequency_energy,
    gini,
    key_projection,
    logit_decomposition,
    modular_activations,
    progress_measures,
    strongest_per_frequency,
    term_shares,
)
from workbench.data.modular import modular_data
from workbench.model.modular import answer_logits
from workbench.train.modular import ModularConfig

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


def test_each_neuron_gets_its_frequency_and_the_strongest_of_each_key_frequency_is_shown():
    # three "neurons" over (a, b): a wave of frequency 3 (strong), of frequency 5, and a weak one of frequency 3
    values = torch.stack([2 * torch.cos(W * (A + B)), torch.cos(5 * W / 3 * A) * torch.cos(5 * W / 3 * B),
                          0.5 * torch.sin(W * A) + 0 * B], dim=-1)
    freq, share = dominant_frequency(values, P)
    assert freq.tolist() == [3, 5, 3] and np.allclose(share, 1.0)
    _, variance = term_shares(values, P, [3, 5])
    assert strongest_per_frequency(freq, variance, [3, 5], 3) == [0, 1, 2]
    assert strongest_per_frequency(freq, variance, [5], 3) == [1]  # only one neuron has frequency 5


def _modular_model(p: int = P) -> workbench.Transformer:
    torch.manual_seed(0)
    return workbench.Transformer(ModularConfig(p=p, d_model=32, n_heads=4, d_mlp=64).model).eval()


def test_activations_over_every_pair_are_the_answer_logits_neurons_and_attention_to_a():
    model, data = _modular_model(), modular_data(P, 0.5)
    logits, neurons, heads = modular_activations(model, data)
    assert logits.shape == (P * P, P) and neurons.shape == (P * P, 64) and heads.shape == (P * P, 4)
    assert logits.dtype == torch.float64
    assert torch.allclose(logits, answer_logits(model, data.tokens_N3).double(), atol=1e-5)
    assert (heads >= 0).all() and (heads <= 1).all() and (neurons >= 0).all()  # a pattern; a ReLU's output


def test_progress_measures_of_a_model_whose_logits_are_a_key_wave(monkeypatch):
    model, data = _modular_model(), modular_data(P, 0.5)
    with torch.no_grad():
        model.W_E[:P] = torch.cos(W * X).float()[:, None]  # every embedding column: one wave of frequency 3
    s = A[..., None] + B[..., None] - X[None, None, :]
    logits = (4 * torch.cos(W * s)).reshape(P * P, P)  # in the span of cos/sin(w(a + b)) for each answer c
    monkeypatch.setattr(fourier, "answer_logits", lambda m, tokens: logits)
    m = progress_measures(model, data, [3])
    tr, te = data.train_idx, data.test_idx
    assert m["train_loss"] == pytest.approx(float(F.cross_entropy(logits[tr], data.labels_N[tr])))
    assert m["test_loss"] == pytest.approx(float(F.cross_entropy(logits[te], data.labels_N[te])))
    # the projection keeps all of it, so removing it leaves zero logits: a uniform guess over p answers
    assert m["restricted_loss"] == pytest.approx(float(F.cross_entropy(logits, data.labels_N)), abs=1e-9)
    assert m["excluded_loss"] == pytest.approx(math.log(P), abs=1e-9)
    assert m["gini_embed"] == pytest.approx(5 / 6)  # one of p // 2 = 6 frequencies holds everything
    assert m["weights_sq"] == pytest.approx(sum(float((q.detach().double() ** 2).sum()) for q in model.parameters()))
    assert 0 <= m["gini_neuron_logit"] <= 1
