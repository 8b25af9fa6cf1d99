"""The optimizer: one AdamW config inherited by both trainers' configs (flat JSON), the parameters that
decay, the fused kernel, and the weight checks."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_modular_config, tiny_train_config
from workbench.artifacts import read_state, write_state
from workbench.errors import ConfigError
from workbench.model.transformer import Transformer
from workbench.train.lm import TrainConfig
from workbench.train.optim import OptimizerConfig, fused_adam, make_optimizer, param_norms, weights_problem


def test_both_trainers_configs_take_the_optimizer_fields_at_the_top_level_of_their_json():
    for cfg in (tiny_train_config(), tiny_modular_config()):
        raw = cfg.to_dict()
        assert isinstance(cfg, OptimizerConfig) and type(cfg).from_dict(raw) == cfg
        assert {"lr", "warmup_steps", "weight_decay", "beta1", "beta2"} <= set(raw)
        assert "decay_every_parameter" not in raw  # a class setting, not a field
    with pytest.raises(ConfigError, match=r"TrainConfig.beta1/beta2 must be in \[0, 1\)"):
        tiny_train_config(beta2=1.0)
    assert (TrainConfig().warmup_steps, TrainConfig().weight_decay, TrainConfig().beta2) == (100, 0.05, 0.99)


def test_the_language_model_decays_weight_matrices_only_and_the_modular_model_every_parameter():
    lm_cfg, mod_cfg = tiny_train_config(weight_decay=0.1), tiny_modular_config(weight_decay=0.5)
    model = Transformer(lm_cfg.model)
    groups = make_optimizer(model, lm_cfg).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2 and not name.startswith(("embed", "pos_embed"))), name
    opt = make_optimizer(Transformer(mod_cfg.model), mod_cfg)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.5
    assert opt.param_groups[0]["betas"] == (0.9, 0.98) and opt.param_groups[0]["lr"] == mod_cfg.lr


def test_blown_up_weights_are_named():
    layer = torch.nn.Linear(4, 4)
    start = param_norms(layer)
    assert weights_problem(layer, start) is None
    with torch.no_grad():
        layer.weight.mul_(1e12)
    assert "weight" in weights_problem(layer, start)


def test_the_fused_optimizer_resumes_exactly_and_is_kept_from_non_contiguous_parameters(tmp_path):
    """fused_adam's updates equal foreach Adam's across a checkpoint round trip of its state; a
    parameter laid out unlike its (contiguous) checkpointed state gets the foreach form."""
    grads = [torch.randn(3, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    results = []
    for fused in (False, True):
        w = torch.nn.Parameter(torch.zeros(3, 5))
        opt = fused_adam(torch.optim.Adam, [w], lr=0.1) if fused else torch.optim.Adam([w], lr=0.1, foreach=False)
        assert bool(opt.defaults["fused"]) is fused
        for i, g in enumerate(grads):
            if i == 2:  # resume: the state goes through a checkpoint into a new optimizer
                (tmp_path / str(fused)).mkdir()
                write_state(tmp_path / str(fused), {"optimizer": opt.state_dict()})
                opt = fused_adam(torch.optim.Adam, [w], lr=0.1) if fused else torch.optim.Adam([w], lr=0.1)
                opt.load_state_dict(read_state(tmp_path / str(fused))["optimizer"])
            (w * g).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append(w.detach().clone())
    torch.testing.assert_close(results[1], results[0])
    transposed = torch.nn.Parameter(torch.zeros(5, 3).T)
    assert not fused_adam(torch.optim.Adam, [transposed], lr=0.1).defaults["fused"]
