"""Linear probes: a planted linear feature is recovered (cosine ≥ 0.95) with the control task and
shuffled labels at chance; the facts model's attribute becomes readable at the last token after the
first layer, and ablating the probe's directions there removes the answer while random directions
of the same norm do not; the modular-addition model carries cos/sin of its key frequencies of a + b
linearly, and not of another frequency."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import workbench
from workbench.cache.collect import layer_hooks
from workbench.cache.probing import ProbeActivations, probe_activations, split_prompts
from workbench.cache.tasks import fact_task, modular_task
from workbench.compute.causal_tracing import FactPrompt, encode_fact
from workbench.compute.fourier import find_key_frequencies, frequency_energy
from workbench.compute.probes import ProbeConfig, ablate_direction, control_labels, fit_probes
from workbench.data.facts import KnowledgeBase
from workbench.errors import ConfigError, InputError
from workbench.report.plotting import caption_of, probe_sweep_figure
from workbench.report.show import show_probes


def _planted(n=2000, d=32, margin=1.5, per_type=4, seed=0, type_norm=0.0):
    """Activations [2 sites, 1 position, N, D] of isotropic noise; site 'planted' adds ±margin·u by the
    label, site 'noise' nothing. Prompts come in types of `per_type` (a subject, say); with
    `type_norm`, every type also gets a random vector of that norm at both sites."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    y = torch.randint(0, 2, (n,), generator=gen)
    types = torch.arange(n) // per_type
    offset = torch.randn(int(types.max()) + 1, d, generator=gen)
    offset = type_norm * offset / offset.norm(dim=1, keepdim=True)
    planted = torch.randn(n, d, generator=gen) + margin * (2 * y - 1)[:, None].float() * u + offset[types]
    noise = torch.randn(n, d, generator=gen) + offset[types]
    acts = ProbeActivations(("planted", "noise"), ("p",), torch.stack([planted, noise])[:, None],
                            torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long), np.arange(n))
    return acts, y.numpy(), types.numpy(), u


def test_a_planted_direction_is_recovered_and_its_controls_stay_at_chance():
    acts, y, types, u = _planted()
    split = split_prompts(acts, 0.25, seed=0)  # by prompt: types are shared by train and test, as in Hewitt-Liang
    sweep = fit_probes(acts, y, split, types=types)
    (planted, noise), = sweep.score_SQ.T
    assert float(sweep.direction("planted", "p") @ u) >= 0.95
    assert planted >= 0.85 and sweep.low_SQ[0, 0] > 0.8 and sweep.low_SQ[0, 0] <= planted <= sweep.high_SQ[0, 0]
    assert abs(noise - 0.5) < 0.06  # nothing planted: chance
    assert np.all(np.abs(sweep.control_SQ - 0.5) < 0.06)  # the type carries nothing linear: control at chance
    assert np.all(np.abs(sweep.shuffled_SQ - 0.5) < 0.06)
    assert sweep.selectivity_SQ[0, 0] > 0.3 and abs(sweep.selectivity_SQ[1, 0]) < 0.1
    assert sweep.train_SQ[0, 0] >= planted - 0.05
    assert sweep.outputs == ("1 vs 0",) and sweep.classes == ("0", "1")
    # the raw weight and bias give the probe's logits on raw activations
    x = acts.at("planted", "p")[split.test]
    logits = x @ sweep.weight("planted", "p") + sweep.bias_SQC[0, 0, 0]
    assert np.isclose(float(((logits > 0).numpy() == y[split.test]).mean()), planted, atol=1e-6)


def test_the_control_task_rises_where_types_are_linearly_identifiable():
    """Where every type (subject) has its own vector, a probe can memorise types: the control task
    then scores far above chance on held-out prompts of seen types, and selectivity is what is left."""
    acts, y, types, _ = _planted(n=1200, d=64, per_type=40, type_norm=6.0)  # 30 types in 64 dimensions
    sweep = fit_probes(acts, y, split_prompts(acts, 0.25, seed=1), types=types)
    assert sweep.control_SQ.min() > 0.75
    assert sweep.score_SQ[0, 0] > 0.85 and sweep.selectivity_SQ[0, 0] < sweep.score_SQ[0, 0] - 0.5
    # held-out types (a split by group) leave nothing to memorise
    acts, y, types, _ = _planted(n=1200, d=64, per_type=4, type_norm=6.0)
    grouped = fit_probes(acts, y, split_prompts(acts, 0.25, groups=types, seed=1))
    assert np.all(np.abs(grouped.control_SQ - 0.5) < 0.12) and grouped.score_SQ[0, 0] > 0.75


def test_labels_unrelated_to_the_activations_score_at_chance():
    acts, _, _, _ = _planted(n=1600)
    y = np.random.default_rng(3).integers(0, 4, acts.n_prompts)  # four classes, independent of everything
    sweep = fit_probes(acts, [f"class {c}" for c in y], split_prompts(acts, 0.3))
    assert sweep.outputs == ("class 0", "class 1", "class 2", "class 3")
    assert np.all(np.abs(sweep.score_SQ - 0.25) < 0.07) and np.all(np.abs(sweep.shuffled_SQ - 0.25) < 0.07)
    assert np.all(sweep.chance_Q < 0.32)
    # a multi-class probe's weights sum to zero over the classes: differences lead from class to class
    assert torch.allclose(sweep.weight_SQCD.sum(2), torch.zeros(2, 1, acts.d), atol=1e-5)


def test_a_linear_probe_recovers_a_planted_target_and_its_r2_interval():
    acts, _, types, u = _planted()
    x = acts.at("planted", "p")
    target = np.stack([(x @ u).numpy() * 2.0, np.random.default_rng(0).normal(size=acts.n_prompts)], 1)
    sweep = fit_probes(acts, target, split_prompts(acts, 0.25), ProbeConfig(kind="linear"), types=types)
    assert sweep.metric == "r2" and sweep.outputs == ("target 0", "target 1")
    # target 0 is exactly linear, target 1 is noise: the mean R² is about one half
    assert 0.4 < sweep.score_SQ[0, 0] < 0.55 and sweep.low_SQ[0, 0] < sweep.score_SQ[0, 0] < sweep.high_SQ[0, 0]
    assert float(sweep.direction("planted", "p", "target 0") @ u) > 0.99
    assert sweep.control_SQ[0, 0] < 0.05 and sweep.shuffled_SQ[0, 0] < 0.05
    json.dumps(sweep.to_dict(), allow_nan=False)


def test_a_toy_model_with_a_direction_planted_in_its_embedding(attn_model):
    """Every odd token's embedding moves by +u, every even one's by −u: probing the last token's parity
    finds u in the residual stream, and the first token (unrelated to the label) gives chance."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(attn_model.cfg.d_model, generator=gen)
    u /= u.norm()
    with torch.no_grad():
        attn_model.W_E.add_(((torch.arange(attn_model.cfg.d_vocab) % 2) * 2 - 1)[:, None] * u)
    tokens = torch.randint(0, 256, (1200, 12), generator=gen)
    acts = probe_activations(attn_model, tokens, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"],
                             {"last": -1, "first": 0})
    sweep = fit_probes(acts, (tokens[:, -1] % 2).numpy(), split_prompts(acts, 0.25))
    assert float(sweep.direction("blocks.0.hook_resid_pre", "last") @ u) >= 0.95
    assert np.all(sweep.score_SQ[:, 0] >= 0.95) and np.all(np.abs(sweep.score_SQ[:, 1] - 0.5) < 0.08)
    # the types are the tokens read (shared by train and test): some memorisation, far below the probe
    assert np.all(sweep.selectivity_SQ[:, 0] > 0.3)
    fig = probe_sweep_figure(sweep)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"] and "control task" in caption_of(fig)
    assert np.allclose(np.asarray(fig.data[0].z, dtype=float), sweep.score_SQ)
    assert "control task" in show_probes(sweep).caption
    with pytest.raises(InputError, match="ProbeSweep"):
        show_probes(acts)


def test_control_labels_follow_the_label_distribution_and_depend_only_on_the_type():
    y = np.repeat(np.arange(4), 250)[None]  # [1, 1000], balanced
    types = (np.arange(1000) % 100)[None]
    control = control_labels(y, types, seed=0)
    for t in range(100):
        assert len(set(control[0, types[0] == t])) == 1
    assert np.bincount(control[0]).max() < 500  # drawn from the labels, not collapsed onto one


def test_bad_inputs_are_refused():
    acts, y, _, _ = _planted(n=200)
    split = split_prompts(acts, 0.25)
    with pytest.raises(InputError, match="at least two classes"):
        fit_probes(acts, np.zeros(200), split)
    with pytest.raises(InputError, match="one label per prompt"):
        fit_probes(acts, y[:10], split)
    with pytest.raises(InputError, match="NaN"):
        fit_probes(acts, np.full(200, np.nan), split, ProbeConfig(kind="linear"))
    with pytest.raises(ConfigError, match="kind"):
        ProbeConfig(kind="svm")
    with pytest.raises(InputError, match="outputs"):
        fit_probes(acts, y % 2 + (np.arange(200) % 3), split).direction("planted", "p")


# -- the shipped models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def facts():
    return workbench.load("facts", device="cpu")


@pytest.fixture(scope="module")
def city_sweep(facts):
    """Every subject's city prompt; each layer's residual stream at three positions; held-out subjects."""
    prompts = [f for f in KnowledgeBase().prompts("train") if f.relation == "city"]
    encs = [encode_fact(facts, FactPrompt(f.prompt, f.subject, f.target)) for f in prompts]
    sites = ["blocks.0.hook_resid_pre"] + layer_hooks(facts, "hook_resid_post")
    acts = probe_activations(facts, [e.tokens[0] for e in encs], sites,
                             {"first subject token": [e.subject[0] for e in encs],
                              "last subject token": [e.subject[1] - 1 for e in encs], "last token": -1})
    split = split_prompts(acts, 0.25, groups=[f.subject for f in prompts], seed=0)
    return fit_probes(acts, [f.target for f in prompts], split)


def test_the_facts_model_makes_the_city_readable_at_the_last_token_after_the_first_layer(city_sweep):
    sweep = city_sweep
    last = sweep.positions.index("last token")
    chance = sweep.chance_Q[last]
    assert len(sweep.classes) == 8 and chance < 0.2 and sweep.grouped
    embed, late = sweep.score_SQ[0, last], sweep.score_SQ[-2:, last]
    assert embed < chance + 0.1  # the last token's embedding is the template's word: no city
    assert np.all(late >= 0.85) and np.all(sweep.low_SQ[-2:, last] > chance + 0.6)
    assert np.all(late > sweep.control_SQ[-2:, last] + 0.6)  # held-out subjects: the control task at chance
    assert np.all(np.abs(sweep.shuffled_SQ - chance) < 0.15)
    assert sweep.best("last token")[0] in sweep.sites[-3:]
    # at the subject's own first token, before attention could bring anything, little is readable
    assert sweep.score_SQ[0, sweep.positions.index("first subject token")] < chance + 0.15
    out = sweep.to_dict()
    json.dumps(out, allow_nan=False)
    assert out["axes"] == ["site", "position"] and len(out["score"]) == len(sweep.sites)


def test_ablating_the_city_probe_removes_the_answer_and_random_directions_do_not(facts, city_sweep):
    site = "blocks.4.hook_resid_post"
    weights = city_sweep.weight_SQCD[city_sweep.sites.index(site), city_sweep.positions.index("last token")]
    task = fact_task(facts, n_prompts=16, relation="city")
    result = ablate_direction(facts, task, site, weights, metric="answer_prob", n_random=4)
    assert result.rank == 7  # eight classes' weights, centred: a 7-dimensional subspace
    assert result.clean > 0.8 and result.effect < -0.3
    assert abs(result.random_effect) < 0.1 and abs(result.effect) > 5 * abs(result.random_effect)
    json.dumps(result.to_dict(), allow_nan=False)
    with pytest.raises(InputError, match="entries"):
        ablate_direction(facts, task, site, torch.ones(7), n_random=1)


def test_modular_addition_carries_its_key_frequencies_of_a_plus_b_linearly():
    model = workbench.load("modular-addition", device="cpu")
    p = model.cfg.d_vocab - 1
    energy = frequency_energy(model.W_E[:p].detach(), p)
    keys = find_key_frequencies(energy / energy.sum(), 10)
    weakest = int(np.argmin(energy[1:])) + 1
    a, b = (g.flatten() for g in torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij"))
    tokens = torch.stack([a, b, torch.full_like(a, p)], 1)
    acts = probe_activations(model, tokens, ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid",
                                             "blocks.0.hook_resid_post"], batch_size=1024)
    split = split_prompts(acts, 0.25)
    total = ((a + b) % p).numpy()
    r2 = {}
    for k in keys + [weakest]:
        w = 2 * np.pi * k / p
        target = np.stack([np.cos(w * total), np.sin(w * total)], 1)
        r2[k] = fit_probes(acts, target, split, ProbeConfig(kind="linear"), types=total)
    for k in keys:  # after the MLP, at '=': cos and sin of w(a + b), from products the MLP made
        s = r2[k]
        assert s.score_SQ[2, 2] > 0.8 and s.low_SQ[2, 2] > 0.75, (k, s.score_SQ)
        assert s.score_SQ[0, 2] < 0.05  # '=' embedded alone knows nothing of a + b
        assert s.selectivity_SQ[2, 2] > 0.5  # a random value per sum is not what is read
    assert np.nanmax(r2[weakest].score_SQ) < 0.1, r2[weakest].score_SQ
    task = modular_task(model, n_prompts=64)
    key = keys[int(np.argmax([r2[k].score_SQ[2, 2] for k in keys]))]
    ablated = ablate_direction(model, task, "blocks.0.hook_resid_post", r2[key].weight_SQCD[2, 2], metric="logit_diff",
                               positions="read")
    assert ablated.effect < 0 and ablated.rank == 2
