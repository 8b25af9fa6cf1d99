"""Activation patching on every family's bridge agrees with TransformerLens's own `patching`
module (its code, run on the same bridge) to 1e-5, and refuses where an edit does not take effect;
attribution patching reports its error against exact patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching

from workbench.adapter import DoesNotApplyError
from workbench.cache.tasks import PatchingTask, induction_task
from workbench.compute.patching import activation_patch, attribution_patch
from workbench.compute.patching.metrics import logit_diff

# the bridges that report their attention pattern after using it (workbench.adapter.knockout)
PATTERN_AFTER_USE = {"opt", "gptj"}

CASES = [("resid_pre", "position", patching.get_act_patch_resid_pre),
         ("attn_out", "position", patching.get_act_patch_attn_out),
         ("z", "head", patching.get_act_patch_attn_head_out_all_pos),
         ("v", "head_position", None),
         ("pattern", "head", patching.get_act_patch_attn_head_pattern_all_pos)]


def _task(model) -> PatchingTask:
    t = induction_task(model, n_prompts=3, half=5, seed=1)
    return PatchingTask("pairs", t.clean, t.corrupt, t.position, t.answer, t.answer.roll(1, 0))


@pytest.mark.parametrize("site, by, reference", CASES, ids=[c[0] for c in CASES])
def test_patching_agrees_with_transformer_lens(family, site, by, reference):
    name, model = family
    task = _task(model)
    if site == "pattern" and name in PATTERN_AFTER_USE:
        with pytest.raises(DoesNotApplyError, match="does not change the model's output"):
            activation_patch(model, task, site, by=by, metric=logit_diff, progress=False)
        return
    ours = activation_patch(model, task, site, by=by, metric=logit_diff, normalized=False, progress=False)
    assert np.isfinite(ours.values).all() and np.abs(ours.values - ours.corrupt).max() > 1e-7
    if reference is None:  # v by (position, head): TransformerLens has it by position and head too
        reference = patching.get_act_patch_attn_head_v_by_pos
        with torch.no_grad():
            _, cache = model.run_with_cache(task.clean)
            ref = reference(model, task.corrupt, cache, lambda logits: logit_diff(logits, task).mean())
        assert ref.shape == (ours.values.shape[0], ours.values.shape[1], ours.values.shape[2])
    else:
        with torch.no_grad():
            _, cache = model.run_with_cache(task.clean)
            ref = reference(model, task.corrupt, cache, lambda logits: logit_diff(logits, task).mean())
    np.testing.assert_allclose(ours.values, ref.numpy(), atol=1e-5, rtol=0)


def test_attribution_patching_reports_its_error(family):
    name, model = family
    task = _task(model)
    est = attribution_patch(model, task, "z", by="head", metric=logit_diff, check=6, progress=False)
    exact = activation_patch(model, task, "z", by="head", metric=logit_diff, progress=False)
    assert np.isfinite(est.values).all() and est.check is not None and len(est.check.labels) == 6
    flat = {lab: v for lab, v in zip([(a, b) for a in exact.labels[0] for b in exact.labels[1]],
                                     exact.values.reshape(-1))}
    np.testing.assert_allclose(est.check.exact, [flat[lab] for lab in est.check.labels], atol=1e-5)
    print(f"{name}: attribution patching of heads {est.check.summary()}")
