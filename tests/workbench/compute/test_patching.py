"""Activation and attribution patching on the shipped models: the ground truth the workbench's
studies already know, agreement with a one-forward-per-patch reference, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from workbench.adapter import DoesNotApplyError
from workbench.cache.tasks import PatchingTask, fact_task, induction_task, modular_task, task_from_strings
from workbench.compute.attention_scores import induction_score, previous_token_score
from workbench.compute.patching import activation_patch, attribution_patch
from workbench.compute.patching.metrics import answer_logprob
from workbench.errors import InputError


@pytest.fixture(scope="module")
def attn2():
    return workbench.load("attn-only-2l", device="cpu")


@pytest.fixture(scope="module")
def facts():
    return workbench.load("facts", device="cpu")


def _one_at_a_time(model, task, hook, index, metric):
    """The reference: TransformerLens's patching loop, one forward per patch."""
    _, cache = model.run_with_cache(task.clean)

    def write(act, hook):
        act = act.clone()
        act[(slice(None), *index)] = cache[hook.name][(slice(None), *index)]
        return act

    logits = model.run_with_hooks(task.corrupt, fwd_hooks=[(hook, write)])
    return float(metric(logits, task).mean().detach())


def _induction_heads(model):
    """(previous-token head, induction heads) from the attention scores of the induction study."""
    task = induction_task(model, n_prompts=8, half=10)
    _, cache = model.run_with_cache(task.clean)
    prev = previous_token_score(cache["blocks.0.attn.hook_pattern"])
    ind = induction_score(cache["blocks.1.attn.hook_pattern"], seq_len=10, prefix=1)
    return int(prev.argmax()), [int(h) for h in torch.argsort(ind, descending=True)[:2]]


def test_batched_patching_equals_one_forward_per_patch(attn2):
    task = induction_task(attn2, n_prompts=3, half=6)
    r = activation_patch(attn2, task, "z", by="head_position", metric=answer_logprob, normalized=False,
                         batch_rows=7, progress=False)
    assert r.axes == ("layer", "position", "head") and r.values.shape == (2, 13, 4)
    for l, p, h in [(0, 3, 1), (1, 9, 2), (1, 12, 0)]:
        ref = _one_at_a_time(attn2, task, f"blocks.{l}.attn.hook_z", (p, h), answer_logprob)
        assert r.values[l, p, h] == pytest.approx(ref, abs=1e-5)
    one = activation_patch(attn2, task, "z", by="head_position", metric=answer_logprob, normalized=False,
                           batch_rows=1, progress=False)
    np.testing.assert_allclose(one.values, r.values, atol=1e-5)


def test_normalised_values_are_one_for_the_whole_clean_stream_and_zero_for_none(attn2):
    task = induction_task(attn2)
    r = activation_patch(attn2, task, "resid_post", by="layer", progress=False)
    assert r.values[-1] == pytest.approx(1.0, abs=1e-5)  # the last residual stream carries everything
    noised = activation_patch(attn2, task, "resid_post", by="layer", direction="noise", progress=False)
    assert noised.values[-1] == pytest.approx(0.0, abs=1e-5)
    assert r.clean > r.corrupt and noised.clean == pytest.approx(r.clean)


def test_noising_ranks_the_induction_circuit_first(attn2):
    prev, induction = _induction_heads(attn2)
    task = induction_task(attn2)
    r = activation_patch(attn2, task, "z", by="head", direction="noise", progress=False)
    top = {lab for lab, _ in r.top(3)}
    assert ("L0", f"H{prev}") in top, (prev, r.top(4))
    assert ("L1", f"H{induction[0]}") in top, (induction, r.top(4))
    # each of the two alone removes more than half of the behaviour
    assert r.effects[0, prev] < -0.5 and r.effects[1, induction[0]] < -0.5


def test_attribution_estimate_tracks_exact_patching_and_says_how_well(attn2):
    task = induction_task(attn2)
    est = attribution_patch(attn2, task, "z", by="head", check=8, progress=False)
    exact = activation_patch(attn2, task, "z", by="head", progress=False)
    assert est.method == "attribution patching" and est.check is not None
    np.testing.assert_allclose(est.check.exact, exact.values.reshape(-1)[[0, 1, 2, 3, 4, 5, 6, 7]], atol=1e-6)
    assert est.check.correlation > 0.8
    assert est.check.max_abs_error == pytest.approx(np.abs(est.values - exact.values).max(), abs=1e-6)
    print("attribution patching vs exact on attn-only-2l induction, heads:", est.check.summary())


def test_attribution_is_exact_where_the_metric_is_linear():
    """In the one-layer modular-addition model (no LayerNorm) the logits are linear in the MLP's
    neurons, so logit_diff's linear estimate of patching one neuron is exact."""
    model = workbench.load("modular-addition", device="cpu")
    task = modular_task(model, n_prompts=16)
    est = attribution_patch(model, task, "blocks.0.mlp.hook_post", by="feature", features=range(64), check=32,
                            progress=False)
    assert est.check.max_abs_error < 1e-5 and est.check.correlation > 0.9999
    # and where it is not linear (the attention softmax), the check says so
    heads = attribution_patch(model, task, "pattern", by="head", check=4, progress=False)
    assert heads.check.max_abs_error > 1e-3


def test_facts_patching_finds_the_sites_causal_tracing_finds(facts):
    """Swapping the subject (patching) and noising it (causal tracing, Meng et al. 2022) locate the
    fact at the same sites of the residual stream: the final position carries it at every layer,
    and the subject's tokens carry a share that fades to nothing by the last layer."""
    from workbench.compute.causal_tracing import FactPrompt, causal_trace, encode_fact
    from workbench.data.facts import KnowledgeBase

    task = fact_task(facts, n_prompts=4)
    by_prompt = {f.prompt: f for f in KnowledgeBase().prompts("train")}
    patch, trace = [], []
    for i in range(task.n_prompts):
        one = PatchingTask("one", *(t[i:i + 1] for t in (task.clean, task.corrupt, task.position, task.answer,
                                                        task.wrong)))
        values = activation_patch(facts, one, "resid_post", by="position", progress=False).values  # [L, S]
        fact = by_prompt[facts.to_string(task.clean[i])]
        enc = encode_fact(facts, FactPrompt(fact.prompt, fact.subject, fact.target))
        traced = np.asarray(causal_trace(facts, enc, 3.0, components=("resid",), n_samples=4)["resid"])  # [L, 1 + S]
        shift = traced.shape[1] - values.shape[1]  # causal tracing puts the model's BOS first
        a, b, end = *enc.subject, int(task.position[i, 0])
        patch.append((values[:, a - shift:b - shift].max(1), values[:, end], values.argmax(1) == end))
        trace.append((traced[:, a:b].max(1), traced[:, end + shift], traced.argmax(1) == end + shift))
    for method in (patch, trace):
        subject = np.mean([m[0] for m in method], 0)
        last = np.mean([m[1] for m in method], 0)
        assert (last > subject).all() and subject[0] > subject[-1] + 0.02 and abs(subject[-1]) < 0.01
        assert all(m[2].all() for m in method)  # the final position is each prompt's top site at every layer
    print("subject share by layer, patching:", np.mean([m[0] for m in patch], 0).round(2),
          "causal tracing:", np.mean([m[0] for m in trace], 0).round(2))


def test_modular_task_patches_the_changed_operand():
    model = workbench.load("modular-addition", device="cpu")
    task = modular_task(model, n_prompts=32, operand=1)
    r = activation_patch(model, task, "resid_pre", by="position", progress=False)
    assert r.labels[1][1].startswith("1 ") and "→" in r.labels[1][1]
    assert r.values[0, 1] == pytest.approx(1.0, abs=1e-4)  # the changed operand's embedding is everything
    assert r.values[0, 0] == pytest.approx(0.0, abs=1e-4)


def test_own_pairs_from_strings(facts):
    fact = fact_task(facts, n_prompts=2)
    strings = [facts.to_string(row) for row in fact.clean], [facts.to_string(row) for row in fact.corrupt]
    answers = [facts.to_string(a) for a in fact.answer[:, 0]], [facts.to_string(w) for w in fact.wrong[:, 0]]
    task = task_from_strings(facts, strings[0], strings[1], answers[0], answers[1])
    assert torch.equal(task.clean, fact.clean) and torch.equal(task.answer, fact.answer)
    with pytest.raises(InputError, match="aligned, token for token"):
        task_from_strings(facts, ["Bane Mozelo likes"], ["Bo likes"], [" red"])
    with pytest.raises(InputError, match="exactly one"):
        task_from_strings(facts, ["a b"], ["a c"], [" red blue green"])


def test_sae_latent_site_and_features(attn2):
    task = induction_task(attn2, n_prompts=2, half=5)
    r = activation_patch(attn2, task, "blocks.0.hook_resid_post", by="feature", features=[0, 5, 7], progress=False)
    assert r.axes == ("feature",) and r.labels == (("0", "5", "7"),) and np.isfinite(r.values).all()


def test_bad_input_is_refused(attn2):
    task = induction_task(attn2, n_prompts=2, half=5)
    with pytest.raises(InputError, match="no hook 'blocks.0.hook_resid_prex'"):
        activation_patch(attn2, task, "blocks.0.hook_resid_prex", progress=False)
    with pytest.raises(InputError, match="Unknown site"):
        activation_patch(attn2, task, "resid", progress=False)
    with pytest.raises(InputError, match="needs a site with heads"):
        activation_patch(attn2, task, "resid_pre", by="head", progress=False)
    with pytest.raises(InputError, match="no wrong answer"):
        activation_patch(attn2, task, "resid_pre", metric="logit_diff", progress=False)
    with pytest.raises(InputError, match="direction"):
        activation_patch(attn2, task, "resid_pre", direction="restore", progress=False)
    same = PatchingTask("same", task.clean, task.clean, task.position, task.answer)
    with pytest.raises(InputError, match="does not change the behaviour"):
        activation_patch(attn2, same, "resid_pre", progress=False)
    with pytest.raises(InputError, match="layers"):
        activation_patch(attn2, task, "resid_pre", layers=[5], progress=False)


def test_a_site_whose_edit_does_not_take_effect_is_refused(attn2):
    """A hook whose value the model does not use (here: one added to the model and never read)
    gets the adapter's "does not apply"."""
    from transformer_lens.hook_points import HookPoint

    class Unused(HookPoint):
        pass

    attn2.blocks[0].unused = Unused()
    attn2.setup()
    try:
        original = attn2.blocks[0].forward

        def forward(resid, kv=None):
            attn2.blocks[0].unused(resid)  # fired, but its output is thrown away
            return original(resid, kv)

        attn2.blocks[0].forward = forward
        task = induction_task(attn2, n_prompts=2, half=5)
        with pytest.raises(DoesNotApplyError, match="does not change the model's output"):
            activation_patch(attn2, task, "blocks.0.unused", progress=False)
    finally:
        del attn2.blocks[0].forward
        del attn2.blocks[0].unused
        attn2.setup()


def test_results_are_strict_json(attn2):
    import json

    task = induction_task(attn2, n_prompts=2, half=5)
    r = attribution_patch(attn2, task, "resid_pre", by="position", check=4, progress=False)
    text = json.dumps(r.to_dict(), allow_nan=False)
    assert json.loads(text)["check"]["n"] == 4


def test_figures_show_every_axis_and_the_check(attn2):
    from workbench.report import show_patching
    from workbench.report.plotting import caption_of, patching_figure

    task = induction_task(attn2, n_prompts=2, half=5)
    two = activation_patch(attn2, task, "z", by="head", progress=False)
    fig = patching_figure(two)
    assert fig.data[0].type == "heatmap" and list(fig.data[0].y) == ["L0", "L1"] and "clean" in caption_of(fig)
    three = attribution_patch(attn2, task, "z", by="head_position", check=6, progress=False)
    fig = patching_figure(three)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap", "scatter", "scatter"]  # one heatmap per layer
    assert "correlation" in caption_of(fig) and len(fig.data[2].x) == 6
    assert "wb-plotly" in show_patching(three)._repr_html_()
    with pytest.raises(InputError, match="PatchingResult"):
        show_patching({"values": []})


def test_spliced_transcoder_latents_are_patched_like_heads():
    """The shipped gelu-2l transcoders spliced in: their latents are a site like any other, for
    exact and attribution patching, and the error term keeps the unpatched run the model's own."""
    from workbench.sae import splice
    from workbench.sae.transcoders import load_transcoders

    model = workbench.load("gelu-2l", device="cpu")
    task = induction_task(model, n_prompts=4, half=8)
    plain = activation_patch(model, task, "mlp_out", by="layer", progress=False)
    with splice(model, load_transcoders(workbench.model.loading.models_dir() / "gelu-2l" / "transcoders")):
        site = "blocks.1.hook_mlp_out.hook_sae_acts_post"
        exact = activation_patch(model, task, site, by="feature", features=range(24), progress=False)
        est = attribution_patch(model, task, site, by="feature", features=range(24), check=12, progress=False)
        spliced = activation_patch(model, task, "mlp_out", by="layer", progress=False)
    assert spliced.clean == pytest.approx(plain.clean, abs=1e-4) and spliced.corrupt == pytest.approx(plain.corrupt,
                                                                                                      abs=1e-4)
    assert np.isfinite(exact.values).all() and np.abs(exact.effects).max() > 0
    by_label = dict(zip(exact.labels[0], exact.values))
    np.testing.assert_allclose(est.check.exact, [by_label[lab[0]] for lab in est.check.labels], atol=1e-6)
    assert site not in model.hook_dict  # splice left the model as it was


def test_circuit_and_faithfulness_figures(attn2):
    from workbench.compute.patching import discover_circuit, edge_attribution, faithfulness
    from workbench.report import show_circuit, show_faithfulness
    from workbench.report.plotting import circuit_figure, faithfulness_figure

    task = induction_task(attn2, n_prompts=4, half=8)
    circuit = discover_circuit(attn2, task, n_edges=6)
    fig = circuit_figure(circuit)
    lines = [t for t in fig.data if t.mode == "lines" and t.x[0] is not None]
    assert len(lines) == 6 and {e.split("->")[0] for e in circuit.edges} <= set(fig.data[6].text)
    scores = edge_attribution(attn2, task, "eap", check=8)
    assert scores.check is not None and len(scores.check.labels) == 8 and np.isfinite(scores.check.max_abs_error)
    curve = faithfulness(attn2, task, scores, n_edges=[0, 4, 16, circuit.graph.n_edges])
    fig = faithfulness_figure({"eap": curve})
    assert list(fig.data[0].x) == [0, 4, 16, circuit.graph.n_edges]
    assert fig.data[0].y[0] == pytest.approx(0, abs=1e-4) and fig.data[0].y[-1] == pytest.approx(1, abs=1e-4)
    assert "wb-plotly" in show_circuit(circuit)._repr_html_() and "wb-plotly" in show_faithfulness(curve)._repr_html_()
