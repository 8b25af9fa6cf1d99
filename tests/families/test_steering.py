"""Steering on every family's bridge: α·v at a residual site changes the logits from the steered position
on and nowhere before it, a mean-difference vector is the difference of the cached activations, and
steered generation runs beside the unsteered text (or each refuses with DoesNotApplyError)."""

from __future__ import annotations

import torch

from workbench.adapter import DoesNotApplyError
from workbench.compute.steering import generate_steered, mean_difference, random_like, steer


def _tokens(model) -> torch.Tensor:
    return torch.randint(5, int(model.cfg.d_vocab), (2, 10), generator=torch.Generator().manual_seed(0))


def test_steering_changes_logits_from_the_steered_position_on(family):
    name, model = family
    hook = "blocks.0.hook_resid_post"
    tokens = _tokens(model)
    v = random_like(torch.ones(int(model.cfg.d_model)), 0)
    try:
        with torch.no_grad():
            clean = model(tokens)
            with steer(model, hook, v, 4.0, [6]):
                steered = model(tokens)
    except DoesNotApplyError as err:  # a refusal names the architecture and the site
        assert hook in str(err) and "does not apply" in str(err)
        return
    assert torch.allclose(steered[:, :6], clean[:, :6], atol=1e-5), name
    assert (steered[:, 6:] - clean[:, 6:]).abs().amax() > 1e-3, name
    assert not [h for p in model.hook_dict.values() for h in p.fwd_hooks if not h.is_permanent]  # none left behind


def test_mean_difference_and_steered_generation_run(family):
    name, model = family
    hook = "blocks.1.hook_resid_pre"
    pos, neg = ["hello world how", "a"], ["the end", "xyz abc def ghi"]  # unequal lengths: padded on the right
    v = mean_difference(model, hook, pos, neg, position=-1)

    def mean_last(texts):
        with torch.no_grad():
            acts = [model.run_with_cache(model.to_tokens(t))[1][hook][0, -1].float() for t in texts]
        return torch.stack(acts).mean(0)

    assert torch.allclose(v, mean_last(pos) - mean_last(neg), atol=1e-4), name
    try:
        text = generate_steered(model, "hello", hook, v, 8.0, max_new_tokens=6, do_sample=False, seed=0)
    except DoesNotApplyError as err:
        assert hook in str(err)
        return
    assert text.plain[0].startswith("hello") and text.steered[0].startswith("hello")
    assert len(text.plain) == len(text.steered) == 1
