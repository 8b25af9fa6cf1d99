"""The model type the adapter, cache and compute layers take: both kinds of model satisfy it."""

from __future__ import annotations

import workbench
from workbench.model.hooked import HookedModel, ModelShape


def test_the_workbench_transformer_and_a_transformer_bridge_are_hooked_models(mlp_model, tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    for model in (mlp_model, bridge):
        assert isinstance(model, HookedModel), type(model)
        assert isinstance(model.cfg, ModelShape), type(model.cfg)
        assert "blocks.0.hook_resid_pre" in model.hook_dict
    assert not isinstance(object(), HookedModel)
