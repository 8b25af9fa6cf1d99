"""The TransformerLens idioms of tests/tl_idioms.py on TransformerLens's own bridges around two Hugging Face
families: GPT-2 (learned positions, LayerNorm) and Qwen2 (rotary, RMSNorm, grouped-query attention, gated MLP).
The idioms check their own invariants (the residual decompositions sum to the stream, the pattern is the
softmax of q·k); an idiom that needs what the family lacks fails with the error tl_idioms.NEEDS names."""

from __future__ import annotations

import warnings

import pytest
import torch

import workbench
from tests.tl_idioms import IDIOMS, NEEDS, has, make_probe

FAMILIES = ("gpt2", "qwen2")
_BRIDGES: dict = {}


@pytest.fixture
def bridges(family_folders):
    """{family: (bridge, probe)}, loaded once from the session's family folders (tests/families/conftest.py)."""
    if not _BRIDGES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for family in FAMILIES:
                bridge = workbench.load(f"hf:{family_folders[family]}", device="cpu").eval()
                _BRIDGES[family] = (bridge, make_probe(bridge))
    return _BRIDGES


@pytest.mark.parametrize("key", [k for k, idiom in IDIOMS.items() if not idiom.slow])
@pytest.mark.parametrize("family", FAMILIES)
def test_idiom_runs_on_a_bridge(bridges, family, key):
    bridge, probe = bridges[family]
    idiom = IDIOMS[key]
    missing = [need for need in idiom.needs if not has(bridge, need)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if missing:
            types, pattern = NEEDS[missing[0]]
            with pytest.raises(types, match=pattern):
                idiom.run(bridge, probe)
            return
        out = idiom.run(bridge, probe)
    tensors = [v for v in out.values() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point]
    assert out and all(torch.isfinite(t).any() for t in tensors)
