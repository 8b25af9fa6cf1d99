"""Edge patching and edge attribution on every family: the component graph follows the architecture
(parallel blocks, grouped-query attention), the self-check passes, and EAP is the derivative of
exact edge patching on the Hugging Face model itself.

Every family passes, OPT and GPT-J included. Their known issue is with attention-pattern edits
(the pattern those bridges report is not the one their output is computed from, so knockout
recomputes z); edge patching never edits a pattern: it rebuilds the inputs at hook_q/k/v (the
"qkv edits" the adapter verifies), at the MLP's input hook (mlp.hook_in, through ln2, or through
ln1 where GPT-J and Phi feed one norm to both attention and MLP) and at the final residual stream,
and the self-check confirms each of those edits reproduces the model. A refusal is tested by
making a piece fail: a describe() that reports the q/k/v edits unverified, and an MLP-input edit
that is lost."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.hf_families import N_HEADS, N_LAYERS
from workbench import adapter
from workbench.adapter import probe as probing
from workbench.cache.tasks import PatchingTask
from workbench.compute.patching import edges as edges_module
from workbench.compute.patching.edges import component_graph, edge_attribution, patch_edges

PASSES = {"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "opt", "gptj", "phi", "bloom"}
"""Families whose edge patching passes the self-check: all of them (see the module docstring)."""


def _task(seed: int = 0) -> PatchingTask:
    """Unrelated clean and corrupt rows read at two positions: the random models' runs differ."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randint(1, 290, shape, generator=gen)

    return PatchingTask("random", draw(2, 7), draw(2, 7), torch.tensor([[4, 6], [5, 6]]), draw(2, 2), draw(2, 2))


def test_the_graph_follows_the_architecture(family):
    name, model = family
    arch = adapter.describe(model)
    g = component_graph(model)
    L, H, G = N_LAYERS, N_HEADS, arch.n_kv_heads
    assert len(g.nodes) == 1 + L * (H + 1) and g.readers[-1] == "logits"
    per_layer = H + 2 * G + 1
    assert len(g.readers) == L * per_layer + 1
    assert ("L0H0->MLP0" in g.edges) == (not arch.parallel)
    if arch.grouped:  # a key/value head shared by H // G query heads reads once
        assert "L1KV0.k" in g.readers and "L1H0.k" not in g.readers
        assert g.reader_nodes[g.readers.index("L1KV1.v")] == tuple(g.nodes.index(f"L1H{h}") for h in (2, 3))
    else:
        assert "L1H3.k" in g.readers
    heads_then_mlp = sum(1 + l * (H + 1) for l in range(L)) * (H + 2 * G)
    mlp_inputs = sum(1 + l * (H + 1) + (0 if arch.parallel else H) for l in range(L))
    assert g.n_edges == heads_then_mlp + mlp_inputs + len(g.nodes)


def test_each_family_passes_the_self_check_and_gives_finite_scores(family):
    name, model = family
    task = _task()
    if name not in PASSES:
        with pytest.raises(adapter.DoesNotApplyError, match=f"^{name} "):
            edge_attribution(model, task)
        return
    for direction in ("denoise", "noise"):
        s = edge_attribution(model, task, direction=direction)
        assert np.isfinite(s.scores).all() and np.abs(s.scores).max() > 0, (name, direction)
    E = s.graph.n_edges
    assert patch_edges(model, task, np.ones((1, E))) == pytest.approx([1.0], abs=1e-3)


def test_eap_is_the_derivative_of_exact_edge_patching(family):
    """d/dw at w = 0 of the exact run with one edge patched at weight w equals EAP's score, for every
    edge, to 5% of the largest score (fp32 differences on these small random models: measured at
    most 1.3%, on GPT-2)."""
    name, model = family
    task = _task()
    s = edge_attribution(model, task)
    t, E = 0.02, s.graph.n_edges
    full = patch_edges(model, task, np.eye(E) * t, normalized=False)
    half = patch_edges(model, task, np.eye(E) * t / 2, normalized=False)
    derivative = (4 * half - full - 3 * s.corrupt_metric) / t / (s.clean_metric - s.corrupt_metric)
    assert np.abs(derivative - s.scores).max() < 0.05 * np.abs(s.scores).max(), name


def test_unverified_qkv_edits_are_refused_with_the_architecture_named(family_folders, monkeypatch):
    import workbench

    real = probing._probe

    def probe(model):
        arch = real(model)
        return replace(arch, problems=(*arch.problems, ("qkv edits", "the check failed in this test")))

    monkeypatch.setattr(probing, "_probe", probe)
    model = workbench.load(f"hf:{family_folders['opt']}", device="cpu")
    with pytest.raises(adapter.DoesNotApplyError,
                       match=r"^opt \(OPTForCausalLM\): edge patching does not apply: the check failed in this test"):
        edge_attribution(model, _task())


def test_a_lost_mlp_input_edit_is_refused(family_folders, monkeypatch):
    """On GPT-J, whose MLP reads ln1's output: were the edit of the MLP's input lost, the MLP could
    not write what it wrote on the clean run, and the self-check names it."""
    import workbench

    model = workbench.load(f"hf:{family_folders['gptj']}", device="cpu")
    monkeypatch.setattr(edges_module._PatchedForward, "_mlp", lambda self, act, *args, **kwargs: act)
    with pytest.raises(adapter.DoesNotApplyError, match=r"^gptj \(GPTJForCausalLM\): .*MLP0.* do(es)? not write"):
        edge_attribution(model, _task())
