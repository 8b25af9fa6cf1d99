"""Dictionaries spliced into every family's bridge (`workbench.sae.splice`): SAELens's hook points reach
run_with_cache and run_with_hooks, the error term leaves the logits as they were, ablating a latent equals
the same edit made by hand at the bridge's own hook, a transcoder replaces the MLP, leaving restores the
bridge, and a hook the bridge registers but never fires is refused, naming the family."""

from __future__ import annotations

import re

import pytest
import torch

from workbench.adapter import DoesNotApplyError, describe
from workbench.sae import SAEConfig, attach, attached, make_sae, splice
from workbench.sae.splice import HOOK_POINTS
from workbench.sae.transcoders import mlp_input_hooks, output_hook, per_token

SITE = "blocks.1.hook_resid_post"
Z = "blocks.0.attn.hook_z"


def _tokens() -> torch.Tensor:
    return torch.randint(1, 290, (2, 9), generator=torch.Generator().manual_seed(0))


def _snapshot(model):
    """What leaving must restore: hook names and their points, module names, every point's hooks."""
    hook_dict = model.hook_dict
    return ([(n, id(p)) for n, p in hook_dict.items()], list(model.mod_dict),
            {n: [id(h) for h in p.fwd_hooks] for n, p in hook_dict.items()})


def _zero(j: int):
    def zero(f, hook):
        f[..., j] = 0
        return f
    return zero


@torch.no_grad()
def test_saes_spliced_into_a_bridge_read_edit_and_leave_it_as_it_was(family):
    name, model = family
    D, H, K = model.cfg.d_model, model.cfg.n_heads, model.cfg.d_head
    resid = make_sae(SAEConfig(d_in=D, d_sae=96, architecture="relu", hook_name=SITE), seed=0)
    heads = make_sae(SAEConfig(d_in=H * K, d_sae=96, architecture="topk", k=8, hook_name=Z), seed=1)
    toks = _tokens()
    clean = model(toks)
    _, cache = model.run_with_cache(toks, names_filter=[SITE, Z])
    x, z = cache[SITE], cache[Z]
    assert z.shape == (2, 9, H, K)
    j = int(resid.encode(x).sum((0, 1)).argmax())
    jz = int(heads.encode(z.flatten(-2)).sum((0, 1)).argmax())

    def by_hand(act, hook):  # the same ablations at the bridge's own hooks, without a splice
        return act - resid.encode(act)[..., j, None] * resid.W_dec[j]

    def by_hand_z(act, hook):
        return act - (heads.encode(act.flatten(-2))[..., jz, None] * heads.W_dec[jz]).view(act.shape)

    expected = model.run_with_hooks(toks, fwd_hooks=[(SITE, by_hand), (Z, by_hand_z)])
    before = _snapshot(model)
    with splice(model, [resid, heads]) as spliced:
        added = [n for n, _ in _snapshot(model)[0] if n not in dict(before[0])]
        assert added == [f"{site}.{p}" for site in (SITE, Z) for p in HOOK_POINTS]
        assert all(model.mod_dict[n] is model.hook_dict[n] for n in added) and attached(model) == spliced
        logits, cache = model.run_with_cache(toks)
        ablated = model.run_with_hooks(toks, fwd_hooks=[(f"{SITE}.hook_sae_acts_post", _zero(j)),
                                                        (f"{Z}.hook_sae_acts_post", _zero(jz))])
    torch.testing.assert_close(logits, clean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache[f"{SITE}.hook_sae_acts_post"], resid.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache[f"{Z}.hook_sae_acts_post"], heads.encode(z.flatten(-2)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ablated, expected, rtol=1e-4, atol=1e-5)
    assert (ablated - clean).abs().max() > 1e-3, name
    assert _snapshot(model) == before and attached(model) == []
    assert torch.equal(model(toks), clean)


@torch.no_grad()
def test_a_transcoder_spliced_into_a_bridge_replaces_its_mlp(family):
    name, model = family
    D = model.cfg.d_model
    read, write = mlp_input_hooks(model)[0], output_hook(0)  # ln1 in a parallel block (GPT-J, Phi)
    tc = make_sae(SAEConfig(d_in=D, d_sae=96, architecture="topk", k=8, hook_name=read, target_hook=write, skip=True))
    tc.W_skip.copy_(0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(0)))
    toks = _tokens()
    B, S = toks.shape
    clean = model(toks)
    _, cache = model.run_with_cache(toks, names_filter=[read])
    x = per_token(cache[read], B, S)  # OPT's bridge hands the MLP its input as [B·S, D]
    j = int(tc.encode(x).sum((0, 1)).argmax())
    kept = {}

    def keep(act, hook):
        kept["x"] = per_token(act, B, S)

    def minus_latent(act, hook):
        return act - (tc.encode(kept["x"])[..., j, None] * tc.W_dec[j]).reshape(act.shape)

    def replace(act, hook):
        return tc(kept["x"]).reshape(act.shape)

    ablated_by_hand = model.run_with_hooks(toks, fwd_hooks=[(read, keep), (write, minus_latent)])
    replaced_by_hand = model.run_with_hooks(toks, fwd_hooks=[(read, keep), (write, replace)])
    before = _snapshot(model)
    with splice(model, tc):
        logits, cache = model.run_with_cache(toks)
        ablated = model.run_with_hooks(toks, fwd_hooks=[(f"{write}.hook_sae_acts_post", _zero(j))])
    with splice(model, tc, use_error_term=False):
        replaced = model(toks)
    torch.testing.assert_close(logits, clean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache[f"{write}.hook_sae_acts_post"], tc.encode(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ablated, ablated_by_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(replaced, replaced_by_hand, rtol=1e-4, atol=1e-5)
    assert (ablated - clean).abs().max() > 1e-4 and (replaced - clean).abs().max() > 1e-4, name
    assert _snapshot(model) == before and torch.equal(model(toks), clean)


@torch.no_grad()
def test_a_hook_the_bridge_never_fires_is_refused_naming_the_family(family):
    name, model = family
    fired = set()
    points = {id(p): p for p in model.hook_dict.values()}
    handles = [(p, p.add_hook(lambda act, hook, p=p: fired.add(id(p)))) for p in points.values()]
    try:
        model(_tokens())
    finally:
        for p, h in handles:
            h.hook.remove()
            p.fwd_hooks.remove(h)
    never = sorted(n for n, p in model.hook_dict.items() if id(p) not in fired and n.startswith("blocks.0."))
    assert never, name  # every family's bridge registers hooks it does not fire (hook_mlp_in, hook_result, ...)
    before = _snapshot(model)
    sae = make_sae(SAEConfig(d_in=model.cfg.d_model, d_sae=32, hook_name=never[0]))
    why = f"{describe(model).label}: splicing at {never[0]} does not apply: the model registers {never[0]} but never"
    with pytest.raises(DoesNotApplyError, match=re.escape(why)):
        attach(model, sae)
    assert _snapshot(model) == before
