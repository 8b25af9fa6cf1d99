"""Activations for probes: one pass gives what a pass per prompt gives, however the prompts are
padded and batched; splits never put a prompt, a repeat of it, or its group on both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.cache.collect import run_collect
from workbench.cache.probing import PromptSplit, probe_activations, split_prompts
from workbench.errors import HookNameError, InputError


def _ragged(n=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 257, (int(length),), generator=gen)
            for length in torch.randint(3, 20, (n,), generator=gen)]


def test_one_batched_pass_equals_a_pass_per_prompt(attn_model):
    prompts = _ragged()
    sites = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
    middle = [len(p) // 2 for p in prompts]
    acts = probe_activations(attn_model, prompts, sites, {"middle": middle, "last": -1, "second": 1}, batch_size=4)
    H, K = attn_model.cfg.n_heads, attn_model.cfg.d_head
    assert acts.acts_SQND.shape == (3, 3, len(prompts), H * K) and acts.positions == ("middle", "last", "second")
    for i, p in enumerate(prompts):
        _, alone = run_collect(attn_model, p[None], sites)
        for s, site in enumerate(sites):
            per_token = alone[site][0].flatten(1)  # [L, D]
            for q, index in enumerate((middle[i], len(p) - 1, 1)):
                torch.testing.assert_close(acts.acts_SQND[s, q, i], per_token[index], atol=1e-5, rtol=1e-5)
                assert int(acts.index_QN[q, i]) == index and int(acts.tokens_QN[q, i]) == int(p[index])
    torch.testing.assert_close(acts.at("blocks.1.hook_resid_post", "last"), acts.acts_SQND[2, 1])


def test_every_position_of_equal_prompts_text_prompts_and_storage(attn_model, tokens):
    acts = probe_activations(attn_model, tokens, ["blocks.0.hook_resid_pre"], dtype=torch.bfloat16)
    assert acts.positions == tuple(str(p) for p in range(tokens.shape[1])) and acts.acts_SQND.dtype == torch.bfloat16
    _, alone = run_collect(attn_model, tokens, ["blocks.0.hook_resid_pre"])
    torch.testing.assert_close(acts.acts_SQND[0].float(), alone["blocks.0.hook_resid_pre"].transpose(0, 1).float(),
                               atol=0.05, rtol=0.02)
    text = probe_activations(attn_model, ["a cat", "the dog sat"], ["blocks.0.hook_resid_post"], -1)
    assert text.n_prompts == 2 and text.positions == ("-1",)


def test_bad_sites_and_positions_are_refused(attn_model):
    prompts = _ragged(4)
    with pytest.raises(HookNameError):
        probe_activations(attn_model, prompts, ["blocks.0.hook_resid_postt"], -1)
    with pytest.raises(InputError, match="not one vector per token"):
        probe_activations(attn_model, prompts, ["blocks.0.attn.hook_pattern"], -1)
    with pytest.raises(InputError, match="one length"):
        probe_activations(attn_model, prompts, ["blocks.0.hook_resid_post"])
    with pytest.raises(InputError, match="in prompt"):
        probe_activations(attn_model, prompts, ["blocks.0.hook_resid_post"], {"far": 30})
    with pytest.raises(InputError, match="one index per prompt"):
        probe_activations(attn_model, prompts, ["blocks.0.hook_resid_post"], {"two": [1, 2]})


def test_splits_never_share_a_prompt_a_repeat_or_a_group(attn_model):
    base = _ragged(30, seed=1)
    prompts = base + base[:10]  # ten prompts appear twice
    acts = probe_activations(attn_model, prompts, ["blocks.0.hook_resid_post"], -1)
    for seed in range(5):
        split = split_prompts(acts, 0.3, seed=seed)
        assert not set(split.train) & set(split.test)
        assert sorted([*split.train, *split.test]) == list(range(40))
        for i in range(10):  # a repeated prompt lies wholly on one side
            assert (i in split.test) == (30 + i in split.test)
    groups = [f"subject {i % 7}" for i in range(40)]
    split = split_prompts(acts, 0.3, groups=groups, seed=0)
    train_groups, test_groups = {groups[i] for i in split.train}, {groups[i] for i in split.test}
    assert not train_groups & test_groups and len(test_groups) == 2 and split.grouped
    with pytest.raises(InputError, match="both the train and the test"):
        PromptSplit(np.array([0, 1]), np.array([1, 2]), np.arange(3), False)
    with pytest.raises(InputError, match="Cluster"):
        PromptSplit(np.array([0]), np.array([1]), np.array([5, 5]), True)
    with pytest.raises(InputError, match="one per prompt"):
        split_prompts(acts, 0.3, groups=groups[:5])
    with pytest.raises(InputError, match="two groups"):
        split_prompts(acts, 0.3, groups=["same"] * 40)
