"""Feature dashboards: the listed logit effects are what the feature's decoder direction does to
the logits, through the final norm's effective scale (1 + w on Gemma) and its centring (LayerNorm)."""

from __future__ import annotations

import warnings

import pytest
import torch

import workbench
from tests.hf_families import build_family
from workbench.sae import SAEConfig, make_sae
from workbench.sae.features import collect_feature_data


@pytest.fixture(scope="module", params=["gemma", "gpt2"])
def hf_model(request, tmp_path_factory):
    """A tiny random-weight HF model of the family, its norms moved off their init."""
    pytest.importorskip("transformers")
    folder = build_family(request.param, tmp_path_factory.mktemp(request.param) / request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return workbench.load(f"hf:{folder}", device="cpu")


def _unit_residual_orthogonal_to(d_D: torch.Tensor, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """[B, S, D] random residual streams, each centred, orthogonal to `d_D` and of RMS 1, so that adding
    a small multiple of `d_D` leaves the final norm's scale unchanged to first order (LN and RMSNorm)."""
    D = d_D.shape[0]
    basis = torch.linalg.qr(torch.stack([torch.ones(D, dtype=torch.float64), d_D.double()], 1))[0]  # [D, 2]
    x = torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - (x @ basis) @ basis.T
    return (x / x.pow(2).mean(-1, keepdim=True).sqrt()).float()


def test_listed_logit_effects_are_the_first_order_change_in_the_logits(hf_model):
    model = hf_model
    L, D = model.cfg.n_layers, model.cfg.d_model
    hook = f"blocks.{L - 1}.hook_resid_post"  # the final residual stream, ln_final's input
    sae = make_sae(SAEConfig(d_in=D, d_sae=6, architecture="relu", hook_name=hook), seed=1)
    rows = torch.randint(1, model.cfg.d_vocab, (4, 8), generator=torch.Generator().manual_seed(0))
    data = collect_feature_data(model, sae, rows, progress=False)

    tokens = rows[:1, :4]
    eps = 1e-2
    for j in range(sae.d_sae):
        d_D = sae.W_dec[j].detach().float()
        x_BSD = _unit_residual_orthogonal_to(d_D, tuple(tokens.shape), seed=j)

        def logits_at(resid_BSD: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: resid_BSD.to(act.dtype))]
                                            ).double()

        change_BSV = (logits_at(x_BSD + eps * d_D) - logits_at(x_BSD - eps * d_D)) / (2 * eps)
        assert torch.allclose(change_BSV, change_BSV[:1, :1].expand_as(change_BSV), atol=1e-3), \
            "with the norm's scale fixed, the change must not depend on the position"
        change_V = change_BSV[0, 0]
        up = torch.tensor([v for _, v in data.logit_up[j]], dtype=torch.float64)
        down = torch.tensor([v for _, v in data.logit_down[j]], dtype=torch.float64)
        tol = 1e-3 * float(change_V.abs().max())
        torch.testing.assert_close(up, change_V.topk(10).values, atol=tol, rtol=1e-3)
        torch.testing.assert_close(down, change_V.topk(10, largest=False).values, atol=tol, rtol=1e-3)
