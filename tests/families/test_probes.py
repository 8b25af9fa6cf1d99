"""Linear probes on every family's bridge: one padded, batched pass reads what a pass per prompt
reads; a small sweep (residual stream, MLP output and per-head z of each layer, two positions) gives
finite scores and unit directions; ablating a probe direction gives finite numbers against its
random control. Where a piece does not apply the bridge refuses with DoesNotApplyError."""

from __future__ import annotations

import numpy as np
import torch

from workbench.adapter import DoesNotApplyError
from workbench.cache.collect import run_collect
from workbench.cache.probing import probe_activations, split_prompts
from workbench.cache.tasks import induction_task
from workbench.compute.probes import ProbeConfig, ablate_direction, fit_probes


def _prompts(n: int = 48) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 12, (n,), generator=gen)
    return [torch.randint(1, 290, (int(length),), generator=gen) for length in lengths]


@torch.no_grad()
def test_a_probe_sweep_runs_on_every_family(family):
    name, model = family
    prompts = _prompts()
    sites = [f"blocks.{l}.{s}" for l in range(model.cfg.n_layers) for s in ("hook_resid_post", "hook_mlp_out")]
    try:
        acts = probe_activations(model, prompts, sites, {"last": -1, "second": 1}, batch_size=16)
    except DoesNotApplyError as err:  # a hook the bridge registers but never fires
        assert "never fires" in str(err), (name, err)
        return
    for i in (0, 5):  # the padded, batched pass reads what a pass over the prompt alone reads
        _, alone = run_collect(model, prompts[i][None], sites)
        for s, site in enumerate(sites):
            act = alone[site].reshape(len(prompts[i]), -1)
            torch.testing.assert_close(acts.acts_SQND[s, 0, i], act[-1], atol=1e-4, rtol=1e-4)
    y = np.array([int(p[-1]) % 2 for p in prompts])
    sweep = fit_probes(acts, y, split_prompts(acts, 0.25), ProbeConfig(n_bootstrap=50))
    assert np.isfinite(sweep.score_SQ).all() and ((sweep.score_SQ >= 0) & (sweep.score_SQ <= 1)).all()
    assert np.isfinite(sweep.control_SQ).all() and np.isfinite(sweep.low_SQ).all()
    norms = sweep.directions_SQCD.norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), name
    site = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    u = sweep.direction(site, "last")
    task = induction_task(model, n_prompts=2, half=4, seed=0)
    try:
        result = ablate_direction(model, task, site, u, metric="answer_logprob", n_random=2)
    except DoesNotApplyError as err:
        assert "does not apply" in str(err), (name, err)
        return
    assert all(np.isfinite([result.clean, result.ablated, result.random, result.removed])), (name, result)
    assert result.rank == 1 and result.removed > 0


@torch.no_grad()
def test_per_head_activations_are_probed_per_token(family):
    name, model = family
    site = "blocks.0.attn.hook_z"
    try:
        acts = probe_activations(model, _prompts(8), [site], -1)
    except DoesNotApplyError as err:
        assert "never fires" in str(err), (name, err)
        return
    assert acts.d == model.cfg.n_heads * model.cfg.d_head and torch.isfinite(acts.acts_SQND).all(), name
