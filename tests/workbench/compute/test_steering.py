"""Steering (workbench.compute.steering): a planted direction is recovered by the planted amount and a
random one is not; the shipped models steer (facts: one city to another by a mean difference and by a
transcoder feature; attn-only-2l: quote style in generated code) beside their random controls; the
positions and generation modes; and the refusals."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

import workbench
from tests.conftest import tiny_config
from workbench.adapter import DoesNotApplyError
from workbench.cache.rows import held_out_text
from workbench.cache.tasks import PatchingTask, task_from_strings
from workbench.compute.steering import (
    SteeringHook,
    direction,
    feature_direction,
    generate_steered,
    mean_difference,
    random_like,
    steer,
    steering_hook,
    steering_sweep,
)
from workbench.data.facts import KnowledgeBase
from workbench.data.text import stdlib_files
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.errors import InputError
from workbench.model.loading import models_dir
from workbench.model.transformer import Transformer
from workbench.report.plotting import caption_of, steering_figure
from workbench.report.show import show_steering
from workbench.report.widgets import Widget


def _no_hooks_left(model) -> bool:
    return all(not p.fwd_hooks and not p._forward_hooks for p in model.hook_dict.values())


# -- a planted direction --------------------------------------------------------------------------
A, B, X = 65, 66, 120  # the metric reads logit(A) - logit(B) after token X, planted by editing a weight


@pytest.fixture(scope="module")
def wide():
    """A random tiny model wide enough (d_model 1024) that a random direction is nearly orthogonal to a
    chosen one (|cos| ~ 0.03)."""
    return Transformer(tiny_config(d_model=1024, d_head=256, d_mlp=256), tokenizer=TextCodec(byte_tokenizer())).eval()


def _planted_task(model) -> PatchingTask:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(97, 115, (8, 12), generator=gen)  # never X: X is the last token only
    tokens[:, -1] = X
    position = torch.full((8, 1), 11)
    return PatchingTask("planted", tokens, tokens, position, torch.full((8, 1), A), torch.full((8, 1), B))


def _readout_direction(model, task: PatchingTask, hook: str, last_only: bool) -> torch.Tensor:
    """The unit vector at `hook` (summed over prompts, and over positions unless `last_only`) along which
    logit(A) - logit(B) rises fastest: the direction the metric reads there."""
    from workbench.compute.patching.metrics import logit_diff

    kept = {}

    def keep(act, hook):
        act.retain_grad()
        kept["act"] = act
        return act

    logit_diff(model.run_with_hooks(task.clean, fwd_hooks=[(hook, keep)]), task).mean().backward()
    model.zero_grad(set_to_none=True)
    grad_BSD = kept["act"].grad
    return direction(grad_BSD[:, -1].sum(0) if last_only else grad_BSD.sum((0, 1)), 1.0)


@pytest.mark.parametrize("plant", ["embedding of token X", "MLP output bias"])
def test_steering_along_a_planted_direction_moves_the_metric_by_the_planted_amount(wide, plant):
    """Plant c·u in a weight (the embedding of the prompts' last token, or the last MLP's output bias), with
    u the direction the metric reads; steering the unplanted model by α = c along u at the matching site
    and positions moves the metric by exactly the plant's amount, and random unit vectors by < 1/10 of it."""
    from workbench.compute.patching.metrics import logit_diff

    task = _planted_task(wide)
    planted = copy.deepcopy(wide)
    if plant == "embedding of token X":  # X now reads as X + c·u: resid_pre at X's positions (the last)
        hook, positions, c = "blocks.0.hook_resid_pre", task.position, 1.0
        u = _readout_direction(wide, task, hook, last_only=True)
        with torch.no_grad():
            planted.W_E[X] += c * u
    else:  # layer 1's MLP now writes c·u at every position
        hook, positions, c = "blocks.1.hook_mlp_out", None, 4.0
        u = _readout_direction(wide, task, hook, last_only=False)
        with torch.no_grad():
            planted.blocks[1].mlp.b_out += c * u
    with torch.no_grad():
        planted_amount = float(logit_diff(planted(task.clean), task).mean() - logit_diff(wide(task.clean), task).mean())
    text = torch.randint(0, 257, (8, 16), generator=torch.Generator().manual_seed(1))
    r = steering_sweep(wide, hook, u, [c], task, text, control_seeds=range(5), positions=positions)
    assert planted_amount > 5.0  # the plant is a real effect on the metric
    assert r.effect[0] == pytest.approx(planted_amount, rel=1e-4, abs=1e-4)
    assert np.abs(r.random_effect[:, 0]).max() < 0.1 * planted_amount
    assert _no_hooks_left(wide)


# -- the facts model: one city to another ---------------------------------------------------------
@pytest.fixture(scope="module")
def facts():
    return workbench.load("facts", device="cpu")


@pytest.fixture(scope="module")
def cities(facts):
    """(prompts answered ' Paris' to fit on, ' Tokyo' to fit on, the task on held-out ' Paris' prompts:
    logit(' Tokyo') - logit(' Paris'))."""
    city = [f for f in KnowledgeBase().prompts("train") if f.relation == "city"]
    paris = [f.prompt for f in city if f.target == " Paris"]
    tokyo = [f.prompt for f in city if f.target == " Tokyo"]
    held = paris[20:36]
    task = task_from_strings(facts, held, held, [" Tokyo"] * len(held), [" Paris"] * len(held), name="Paris→Tokyo")
    return paris[:20], tokyo[:20], task


def test_facts_mean_difference_steers_one_city_to_another_and_random_does_not(facts, cities):
    paris, tokyo, task = cities
    hook = "blocks.3.hook_resid_post"
    v = mean_difference(facts, hook, tokyo, paris)
    text, _ = held_out_text(facts, 16, 64)
    r = steering_sweep(facts, hook, v, [0.25, 0.5, 1.0], task, text, control_seeds=range(5), positions=task.position)
    assert r.baseline < -5  # the model answers Paris
    assert np.all(np.diff(r.effect) > 0) and r.effect[-1] > 15 and r.target[-1] > 0  # Tokyo now wins
    assert np.abs(r.random_effect).max(0)[-1] < 0.3 * r.effect[-1]
    assert abs(r.random_effect_mean[-1]) < 0.15 * r.effect[-1]
    assert 0 < r.ce_cost[-1] < 1.0  # a real but bounded cost on the facts' own held-out text
    json.dumps(r.to_dict(), allow_nan=False)


def test_facts_transcoder_feature_steers_towards_its_city(facts, cities):
    from workbench.cache.collect import run_collect
    from workbench.sae.transcoders.replacement import load_transcoders

    paris, tokyo, task = cities
    L = 4
    tc = load_transcoders(models_dir() / "facts" / "transcoders")
    with torch.no_grad():
        def acts(prompts):
            out = []
            for p in prompts:
                _, a = run_collect(facts, facts.to_tokens(p), keep=[tc.in_hook(L)], stop_early=True)
                out.append(tc.encode(L, a[tc.in_hook(L)][0, -1].float()))
            return torch.stack(out)

        feature = int((acts(tokyo).mean(0) - acts(paris).mean(0)).argmax())
    v = feature_direction(tc.per_layer[L], feature, normalize=True)
    assert torch.allclose(v * tc.per_layer[L].W_dec[feature].norm(), tc.per_layer[L].W_dec[feature].float(), atol=1e-5)
    text, _ = held_out_text(facts, 16, 64)
    r = steering_sweep(facts, f"blocks.{L}.hook_mlp_out", v, [10.0, 20.0, 40.0], task, text, control_seeds=range(5),
                       positions=task.position)
    assert np.all(np.diff(r.effect) > 0) and r.effect[-1] > 5
    assert r.effect[-1] > 2 * np.abs(r.random_effect[:, -1]).max()


# -- a code model: quote style in generated text --------------------------------------------------
@pytest.fixture(scope="module")
def attn2():
    return workbench.load("attn-only-2l", device="cpu")


def _quoted_lines() -> list[str]:
    """Lines of the standard library holding one single-quoted string and no double quote."""
    lines = []
    for path in stdlib_files()[:200]:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            s = line.strip()
            if 12 <= len(s) <= 60 and s.count("'") == 2 and '"' not in s and s.isascii():
                lines.append(s)
    random.Random(0).shuffle(lines)
    return lines


@pytest.mark.slow
def test_code_model_quote_style_moves_with_alpha_beyond_the_random_control(attn2):
    lines = _quoted_lines()
    single = lines[:64]
    double = [s.replace("'", '"') for s in single]
    prompts = [p for p in (s.split("'")[0] for s in lines[100:228]) if p]  # code up to where a quote opens

    def double_quote_fraction(model) -> float:
        """Of the quote characters the model generates after the prompts, the fraction that are double."""
        texts = model.generate(prompts, max_new_tokens=48, seed=0, verbose=False)
        n_double = sum(t[len(p):].count('"') for t, p in zip(texts, prompts))
        n_single = sum(t[len(p):].count("'") for t, p in zip(texts, prompts))
        return n_double / (n_double + n_single) if n_double + n_single else 0.5

    hook = "blocks.0.hook_resid_pre"
    v = mean_difference(attn2, hook, double, single)
    text, _ = held_out_text(attn2, 32, 128)
    r = steering_sweep(attn2, hook, v, [-2.0, -1.0, 1.0, 2.0], double_quote_fraction, text, control_seeds=range(5),
                       generation="prompt_and_new")
    assert np.all(np.diff(r.target) > 0)  # more double quotes as α rises
    assert r.target[0] < 0.2 and r.target[-1] > 0.95
    # at |α| = 2 the steered change is larger than any random vector's, in its own direction
    assert r.effect[0] < r.random_effect[:, 0].min() and r.effect[-1] > r.random_effect[:, -1].max()
    assert abs(r.effect[0]) > 1.5 * np.abs(r.random_effect[:, 0]).max()
    assert r.ce_cost[-1] < 0.2


# -- positions, generation modes and the hook's life ----------------------------------------------
def test_steering_at_the_last_position_leaves_earlier_positions_alone(mlp_model, tokens):
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = mlp_model(tokens)
        with steer(mlp_model, "blocks.0.hook_resid_post", v, 3.0, "last"):
            last = mlp_model(tokens)
        with steer(mlp_model, "blocks.0.hook_resid_post", v, 0.0):
            zero = mlp_model(tokens)
        with steer(mlp_model, "blocks.0.hook_resid_post", v, 3.0, [2, -3]):
            listed = mlp_model(tokens)
    assert torch.equal(zero, clean)
    assert torch.allclose(last[:, :-1], clean[:, :-1], atol=1e-6) and not torch.allclose(last[:, -1], clean[:, -1])
    assert torch.allclose(listed[:, :2], clean[:, :2], atol=1e-6) and not torch.allclose(listed[:, 2], clean[:, 2])
    assert _no_hooks_left(mlp_model)


def test_per_row_positions_and_per_head_sites(mlp_model, tokens):
    per_row = torch.tensor([3, 7, 19])
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    seen = {}

    def record(act, hook):
        seen["resid"] = act.detach().clone()

    with torch.no_grad():
        _, cache = mlp_model.run_with_cache(tokens)
        with steer(mlp_model, "blocks.0.hook_resid_post", v, 2.0, per_row):
            mlp_model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", record)])
    diff = seen["resid"] - cache["blocks.0.hook_resid_post"]
    changed = diff.abs().amax(-1) > 1e-6
    assert changed.tolist() == [[p == r for p in range(20)] for r in per_row.tolist()]
    assert torch.allclose(diff[torch.arange(3), per_row], 2.0 * v.expand(3, -1), atol=1e-5)
    with torch.no_grad():
        with steer(mlp_model, "blocks.1.attn.hook_z", torch.ones(8), 1.0, head=2):
            z = mlp_model.run_with_cache(tokens)[1]["blocks.1.attn.hook_z"]
    z0 = mlp_model.run_with_cache(tokens)[1]["blocks.1.attn.hook_z"]
    assert torch.allclose(z[:, :, 2] - z0[:, :, 2], torch.ones(8), atol=1e-5)
    assert torch.equal(z[:, :, [0, 1, 3]], z0[:, :, [0, 1, 3]])


def test_generation_modes_mark_prompt_and_new_tokens(mlp_model):
    """The hook's own bookkeeping: the first pass is the prompt; a one-position pass is a new token (a
    KV cache), a longer one the whole sequence again (no cache)."""
    for mode, new in (("prompt_only", False), ("prompt_and_new", True)):
        h = steering_hook(torch.ones(4), 1.0, [1, -1], generation=mode)
        assert h.mask(1, 5, torch.device("cpu")).tolist() == [[False, True, False, False, True]]
        assert h.mask(1, 1, torch.device("cpu")).tolist() == [[new]]
        h.reset()
        h.mask(1, 5, torch.device("cpu"))
        assert h.mask(1, 7, torch.device("cpu")).tolist() == [[False, True, False, False, True, new, new]]
    caa_after_prompt = steering_hook(torch.ones(4), 1.0, [], generation="prompt_and_new")
    assert not caa_after_prompt.mask(1, 4, torch.device("cpu")).any()
    assert caa_after_prompt.mask(1, 1, torch.device("cpu")).all()


@pytest.mark.parametrize("mode", ["prompt_only", "prompt_and_new"])
def test_steered_generation_is_the_same_with_and_without_the_kv_cache(mlp_model, mode):
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    out = []
    for cache in (True, False):
        with steer(mlp_model, "blocks.0.hook_resid_post", v, 4.0, [0, -1], generation=mode):
            out.append(mlp_model.generate("def f(x):", max_new_tokens=8, do_sample=False, use_past_kv_cache=cache,
                                          return_type="tokens", verbose=False))
    with torch.no_grad():
        plain = mlp_model.generate("def f(x):", max_new_tokens=8, do_sample=False, return_type="tokens", verbose=False)
    assert torch.equal(out[0], out[1])
    assert not torch.equal(out[0], plain)  # the steering is seen in the text


def test_generate_steered_sets_plain_beside_steered_with_one_seed(mlp_model):
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    r = generate_steered(mlp_model, ["def f(x):", "import os"], "blocks.1.hook_resid_post", v, 8.0, seed=5,
                         max_new_tokens=10)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    torch.manual_seed(5)
    assert r.plain[0] == mlp_model.generate("def f(x):", max_new_tokens=10, verbose=False)
    assert r.steered != r.plain and all(s.startswith(p) for s, p in zip(r.steered, r.prompts))
    assert "steered (α = 8" in r.side_by_side()
    json.dumps(r.to_dict(), allow_nan=False)
    assert _no_hooks_left(mlp_model)


# -- vectors --------------------------------------------------------------------------------------
def test_vectors_mean_difference_random_like_and_direction(mlp_model):
    pos, neg = ["abc", "abcdef"], ["xyz!", "x"]
    v = mean_difference(mlp_model, "blocks.0.hook_resid_post", pos, neg)

    def last(texts):
        return torch.stack([mlp_model.run_with_cache(mlp_model.to_tokens(t))[1]["blocks.0.hook_resid_post"][0, -1]
                            for t in texts]).mean(0)

    with torch.no_grad():
        assert torch.allclose(v, last(pos) - last(neg), atol=1e-5)
    r0, r0b, r1 = random_like(v, 0), random_like(v, 0), random_like(v, 1)
    assert torch.equal(r0, r0b) and not torch.equal(r0, r1)
    assert float(r0.norm()) == pytest.approx(float(v.norm()), rel=1e-5)
    assert abs(float(torch.nn.functional.cosine_similarity(r0, v, dim=0))) < 0.6
    assert float(direction(np.array([3.0, 4.0]), 1.0).norm()) == pytest.approx(1.0)
    assert direction(torch.tensor([3.0, 4.0])).tolist() == [3.0, 4.0]
    with pytest.raises(InputError, match="zero"):
        direction(torch.zeros(3), 1.0)


def test_sweep_result_is_strict_json_and_draws_as_a_figure(mlp_model):
    task = _planted_task(mlp_model)
    text = torch.randint(0, 257, (4, 12), generator=torch.Generator().manual_seed(0))
    v = torch.randn(32, generator=torch.Generator().manual_seed(4))
    r = steering_sweep(mlp_model, "blocks.0.hook_resid_post", v, [0.0, 1.0, 2.0], task, text, control_seeds=(0, 1),
                       cost_positions="last")
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["effect"][0] == 0.0 and d["ce_cost"][0] == 0.0 and len(d["random_target"]) == 2
    assert r.target[0] == r.baseline and np.isfinite(r.ce_cost).all()
    fig = steering_figure(r)
    assert len(fig.data) == 2 * (1 + 2 + 1 + 1) and "random directions" in caption_of(fig)
    assert isinstance(show_steering(r), Widget)
    with pytest.raises(InputError, match="SteeringResult"):
        show_steering({"not": "a result"})


# -- refusals -------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_clear_error(mlp_model, tokens):
    good = torch.randn(32)
    with pytest.raises(InputError, match=r"shape \(31,\).*32 wide|d_model = 32"):
        with steer(mlp_model, "blocks.0.hook_resid_post", torch.randn(31), 1.0):
            pass
    with pytest.raises(InputError, match="no hook 'blocks.0.hook_resid_pots'; did you mean"):
        with steer(mlp_model, "blocks.0.hook_resid_pots", good, 1.0):
            pass
    with pytest.raises(InputError, match="non-finite"):
        with steer(mlp_model, "blocks.0.hook_resid_post", torch.tensor([float("nan")] + [0.0] * 31), 1.0):
            pass
    with pytest.raises(InputError, match="alpha must be a finite number"):
        steering_hook(good, float("inf"))
    with pytest.raises(InputError, match="attention pattern"):
        with steer(mlp_model, "blocks.0.attn.hook_pattern", good, 1.0):
            pass
    with pytest.raises(InputError, match="outside a sequence of 20"):
        with steer(mlp_model, "blocks.0.hook_resid_post", good, 1.0, [25]):
            mlp_model(tokens)
    with pytest.raises(InputError, match="positions must be"):
        steering_hook(good, 1.0, "first")
    with pytest.raises(InputError, match="generation must be one of"):
        SteeringHook(good, 1.0, generation="always")
    with pytest.raises(InputError, match="at least one seed"):
        steering_sweep(mlp_model, "blocks.0.hook_resid_post", good, [1.0], lambda m: 0.0, tokens, control_seeds=())
    with pytest.raises(InputError, match="W_dec"):
        feature_direction(torch.nn.Linear(2, 2), 0)
    assert _no_hooks_left(mlp_model)


def test_a_site_whose_edit_does_not_take_effect_is_refused():
    """A hook that fires but whose output the model throws away (as some bridges report an activation after
    using it): steering there would report an unsteered model, so it is refused."""
    from transformer_lens.hook_points import HookPoint

    model = Transformer(tiny_config(d_mlp=64), tokenizer=TextCodec(byte_tokenizer())).eval()
    model.blocks[0].unused = HookPoint()
    model.setup()
    original = model.blocks[0].forward

    def forward(resid, kv=None):
        model.blocks[0].unused(resid)  # fired, but its output is thrown away
        return original(resid, kv)

    model.blocks[0].forward = forward
    with pytest.raises(DoesNotApplyError, match="steering at blocks.0.unused does not apply"):
        with steer(model, "blocks.0.unused", torch.randn(32), 1.0):
            pass
    assert _no_hooks_left(model)
