"""Dictionaries spliced into the workbench's Transformer (`workbench.sae.splice`): SAELens's hook names,
the error term, edits through the latents against the same edit made by hand, transcoders, detaching,
and refusals. The same on every family bridge: tests/families/test_splice.py."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.hook_points import HookPoint

import workbench
from tests.conftest import tiny_config
from workbench.adapter import DoesNotApplyError
from workbench.errors import InputError
from workbench.model.transformer import Transformer
from workbench.sae import SAEConfig, SplicedSAE, attach, attached, detach, make_sae, splice
from workbench.sae.interventions import splice_hook
from workbench.sae.splice import HOOK_POINTS
from workbench.sae.transcoders import CrossLayerTranscoder, Transcoders, input_hook, load_transcoders, output_hook

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def attn():
    return workbench.load("attn-only-2l")


@pytest.fixture(scope="module")
def gelu():
    return workbench.load("gelu-2l")


@pytest.fixture(scope="module")
def toks():
    return torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))


def _sae(d_in, hook=SITE, arch="relu", d_sae=128, seed=0, **kw):
    return make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=8, hook_name=hook, **kw), seed=seed)


def _snapshot(model):
    """What detaching must restore: the registries, the module tree, every hook point's hooks."""
    points = {id(p): p for p in model.hook_dict.values()}
    return (list(model.hook_dict.items()), list(model.mod_dict.items()), [n for n, _ in model.named_modules()],
            {i: list(p.fwd_hooks) for i, p in points.items()}, list(model.state_dict()))


def _cached(model, toks, names):
    _, cache = model.run_with_cache(toks, names_filter=names)
    return cache


def _top_latent(sae, x):
    """The latent with the largest total activation on x."""
    return int(sae.encode(x).sum(dim=tuple(range(x.ndim - 1))).argmax())


@torch.no_grad()
def test_the_hook_points_are_named_as_saelens_names_them_and_show_each_step(attn, toks):
    sae = _sae(attn.cfg.d_model)
    clean = attn(toks)
    x = _cached(attn, toks, [SITE])[SITE]
    with splice(attn, [sae]) as (spliced,):
        assert spliced.hook_names == [f"{SITE}.{p}" for p in HOOK_POINTS]
        for name, point in zip(spliced.hook_names, HOOK_POINTS):
            assert attn.hook_dict[name] is getattr(spliced, point) is attn.mod_dict[name]
        logits, cache = attn.run_with_cache(toks)
        sae_in, f = cache[f"{SITE}.hook_sae_input"], cache[f"{SITE}.hook_sae_acts_post"]
        torch.testing.assert_close(sae_in, x)  # the same activation (cached on another run: to rounding)
        torch.testing.assert_close(f, sae.encode(x))
        assert f.shape == (2, 16, 128) and 0 < (f > 0).float().mean() < 1
        # each step, from the previous one, as SAE.forward computes it
        assert torch.equal(cache[f"{SITE}.hook_sae_acts_pre"], sae.pre_acts(sae_in))
        assert torch.equal(f, sae.activate(cache[f"{SITE}.hook_sae_acts_pre"]))
        recons = cache[f"{SITE}.hook_sae_recons"]
        assert torch.equal(recons, sae.decode(f))
        assert torch.equal(cache[f"{SITE}.hook_sae_error"], sae_in - recons)
        assert torch.equal(cache[f"{SITE}.hook_sae_output"], recons + (sae_in - recons))
        torch.testing.assert_close(cache[SITE], sae_in)  # the site carries what the model reads on
        assert (recons - x).abs().max() > 0.1  # a poor random dictionary: only the error term makes it exact
    torch.testing.assert_close(logits, clean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
@torch.no_grad()
def test_zero_ablating_a_latent_changes_the_logits_by_its_decoder_contribution(attn, toks, arch):
    sae = _sae(attn.cfg.d_model, arch=arch, jumprelu_init_threshold=0.01)
    x = _cached(attn, toks, [SITE])[SITE]
    j = _top_latent(sae, x)
    clean = attn(toks)

    def by_hand(act, hook):  # the same edit at the model's own hook, without a splice
        return act - sae.encode(act)[..., j, None] * sae.W_dec[j]

    def zero(f, hook):
        f[..., j] = 0
        return f

    expected = attn.run_with_hooks(toks, fwd_hooks=[(SITE, by_hand)])
    with splice(attn, sae):
        ablated = attn.run_with_hooks(toks, fwd_hooks=[(f"{SITE}.hook_sae_acts_post", zero)])
        with attn.hooks(fwd_hooks=[(lambda name: name.endswith("hook_sae_acts_post"), zero)]):
            ablated_in_context = attn(toks)
    torch.testing.assert_close(ablated, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ablated_in_context, expected, rtol=1e-5, atol=1e-5)
    assert (ablated - clean).abs().max() > 1e-3  # a hundred times the tolerance above


@torch.no_grad()
def test_without_the_error_term_the_model_reads_the_reconstruction(attn, toks):
    sae = _sae(attn.cfg.d_model)
    expected = attn.run_with_hooks(toks, fwd_hooks=[(SITE, splice_hook(sae))])
    with splice(attn, sae, use_error_term=False) as (spliced,):
        assert spliced.use_error_term is False
        logits, cache = attn.run_with_cache(toks)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert f"{SITE}.hook_sae_error" not in cache  # fires only with the error term
    torch.testing.assert_close(cache[f"{SITE}.hook_sae_output"], cache[f"{SITE}.hook_sae_recons"])
    assert (logits - attn(toks)).abs().max() > 1e-2


@torch.no_grad()
def test_a_per_head_site_is_read_flattened_and_given_back_in_its_shape(attn, toks):
    H, K = attn.cfg.n_heads, attn.cfg.d_head
    name = "blocks.0.attn.hook_z"
    sae = _sae(H * K, hook=name)
    z = _cached(attn, toks, [name])[name]
    assert z.shape == (2, 16, H, K)
    j = _top_latent(sae, z.flatten(-2))

    def by_hand(act, hook):
        return act - (sae.encode(act.flatten(-2))[..., j, None] * sae.W_dec[j]).view(act.shape)

    def zero(f, hook):
        f[..., j] = 0
        return f

    expected = attn.run_with_hooks(toks, fwd_hooks=[(name, by_hand)])
    with splice(attn, sae):
        logits, cache = attn.run_with_cache(toks)
        ablated = attn.run_with_hooks(toks, fwd_hooks=[(f"{name}.hook_sae_acts_post", zero)])
    assert cache[f"{name}.hook_sae_input"].shape == (2, 16, H * K) and cache[name].shape == (2, 16, H, K)
    torch.testing.assert_close(cache[f"{name}.hook_sae_acts_post"], sae.encode(z.flatten(-2)))
    torch.testing.assert_close(logits, attn(toks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ablated, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_leaving_restores_the_model_exactly_even_after_an_error(attn, toks):
    before, clean = _snapshot(attn), attn(toks)
    with pytest.raises(RuntimeError, match="inside"):
        with splice(attn, [_sae(attn.cfg.d_model), _sae(attn.cfg.d_model, hook="blocks.0.hook_resid_post")]):
            assert len(attached(attn)) == 2 and _snapshot(attn) != before
            raise RuntimeError("inside")
    assert _snapshot(attn) == before and attached(attn) == []
    assert torch.equal(attn(toks), clean)


@torch.no_grad()
def test_attach_and_detach_leave_the_other_splices_alone(attn, toks):
    before, clean = _snapshot(attn), attn(toks)
    first = attach(attn, _sae(attn.cfg.d_model))
    second = attach(attn, _sae(attn.cfg.d_model, hook="blocks.0.hook_attn_out"))
    try:
        assert attached(attn) == first + second
        assert detach(attn, first) == first
        assert attached(attn) == second
        assert f"{SITE}.hook_sae_acts_post" not in attn.hook_dict
        assert "blocks.0.hook_attn_out.hook_sae_acts_post" in attn.hook_dict
        again = attach(attn, first)  # a detached SplicedSAE splices again, keeping its own setting
        assert again == first and attached(attn) == second + first
    finally:
        detach(attn)
    assert _snapshot(attn) == before and torch.equal(attn(toks), clean)
    assert all(p.name is None for s in first + second for p in (getattr(s, h) for h in HOOK_POINTS))


def test_gradients_reach_the_latents_and_the_error_term_carries_none(attn, toks):
    sae = _sae(attn.cfg.d_model)
    kept = {}

    def keep(t, hook):
        if t.requires_grad:
            t.retain_grad()
        kept[hook.name] = t

    with splice(attn, sae):
        with attn.hooks(fwd_hooks=[(f"{SITE}.hook_sae_acts_post", keep), (f"{SITE}.hook_sae_error", keep)]):
            attn(toks, return_type="loss").backward()
    f, error = kept[f"{SITE}.hook_sae_acts_post"], kept[f"{SITE}.hook_sae_error"]
    assert f.grad is not None and f.grad.abs().max() > 0
    assert not error.requires_grad  # computed without gradient, as SAELens computes it
    attn.zero_grad(set_to_none=True)


# -- transcoders -------------------------------------------------------------------------------------------
@torch.no_grad()
def test_shipped_transcoders_replace_the_mlp_outputs(gelu, toks):
    tc = load_transcoders("models/gelu-2l/transcoders")
    names = [h for l in range(2) for h in (input_hook(l), output_hook(l))]
    clean_cache = _cached(gelu, toks, names)
    clean = gelu(toks)
    with splice(gelu, tc) as spliced:
        assert [s.site for s in spliced] == [output_hook(0), output_hook(1)]
        assert all(s.is_transcoder and s.sae.cfg.skip for s in spliced)
        logits, cache = gelu.run_with_cache(toks)
    torch.testing.assert_close(logits, clean, rtol=1e-5, atol=1e-5)
    for l in range(2):
        site = output_hook(l)
        torch.testing.assert_close(cache[f"{site}.hook_sae_input"], clean_cache[input_hook(l)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[f"{site}.hook_sae_acts_post"], tc.encode(l, clean_cache[input_hook(l)]),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache[f"{site}.hook_sae_error"],
                                   clean_cache[site] - cache[f"{site}.hook_sae_recons"], rtol=1e-4, atol=1e-4)
    assert f"{input_hook(0)}.hook_sae_acts_post" not in cache  # named under the output hook, as SAELens does


@torch.no_grad()
def test_a_transcoder_latent_ablated_or_every_mlp_replaced_matches_the_edit_by_hand(gelu, toks):
    tc = load_transcoders("models/gelu-2l/transcoders")
    l0 = tc.per_layer[0]
    x = _cached(gelu, toks, [input_hook(0)])[input_hook(0)]
    j = _top_latent(l0, x)
    kept = {}

    def keep(act, hook, l):
        kept[l] = act

    def minus_latent(act, hook):
        return act - l0.encode(kept[0])[..., j, None] * l0.W_dec[j]

    def replace(act, hook, l):
        return tc.per_layer[l](kept[l])

    def zero(f, hook):
        f[..., j] = 0
        return f

    reads = [(input_hook(l), lambda a, hook, l=l: keep(a, hook, l)) for l in range(2)]
    ablated_by_hand = gelu.run_with_hooks(toks, fwd_hooks=reads + [(output_hook(0), minus_latent)])
    replaced_by_hand = gelu.run_with_hooks(toks, fwd_hooks=reads + [
        (output_hook(l), lambda a, hook, l=l: replace(a, hook, l)) for l in range(2)])
    with splice(gelu, SplicedSAE.from_transcoders(tc, 0)):
        ablated = gelu.run_with_hooks(toks, fwd_hooks=[(f"{output_hook(0)}.hook_sae_acts_post", zero)])
    with splice(gelu, tc, use_error_term=False):
        replaced = gelu(toks)
    torch.testing.assert_close(ablated, ablated_by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replaced, replaced_by_hand, rtol=1e-5, atol=1e-5)
    clean = gelu(toks)
    assert (ablated - clean).abs().max() > 1e-3 and (replaced - clean).abs().max() > 1e-3


# -- refusals ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_dictionaries_that_do_not_fit_are_refused_and_leave_the_model_alone(attn, gelu):
    before = _snapshot(attn)
    D = attn.cfg.d_model
    cases = [
        (_sae(D + 1), "width 128"),
        (_sae(D, hook="blocks.9.hook_resid_post"), "no hook 'blocks.9.hook_resid_post'"),
        ([_sae(D), _sae(D, seed=1)], "Two dictionaries replace blocks.1.hook_resid_post"),
        (_sae(D, hook=""), "cfg.hook_name is empty"),
        ([], "Nothing to splice"),
        ("blocks.1.hook_resid_post", "got str"),
        (make_sae(SAEConfig(d_in=D, d_sae=64, hook_name=input_hook(0), target_hook=output_hook(0))),
         "no hook 'blocks.0.ln2.hook_normalized'"),  # a transcoder on an attention-only model
    ]
    for saes, message in cases:
        with pytest.raises(InputError, match=message):
            attach(attn, saes)
        assert _snapshot(attn) == before
    with splice(attn, _sae(D)) as (spliced,):
        with pytest.raises(InputError, match="already"):
            attach(attn, _sae(D, seed=2))
        with pytest.raises(InputError, match="attached already"):
            attach(attn, spliced)
    assert _snapshot(attn) == before
    D = gelu.cfg.d_model
    clt = Transcoders("gelu-2l", 2, clt=CrossLayerTranscoder(SAEConfig(d_in=2 * D, d_sae=64, target_hook="clt"), 2))
    with pytest.raises(InputError, match="cross-layer"):
        attach(gelu, clt)


class _Quirky(Transformer):
    """A Transformer with two hook points a splice cannot use: one it never fires, and one it fires with
    the logits after it has computed them, ignoring what the hooks return."""

    def __init__(self):
        super().__init__(tiny_config())
        self.hook_never = HookPoint()  # [B, S, D]
        self.hook_reported = HookPoint()  # [B, S, V]
        self.setup()

    def forward(self, tokens, return_type="logits", **kwargs):
        logits = super().forward(tokens, return_type, **kwargs)
        if return_type == "logits":
            self.hook_reported(logits)  # reported after use: an edit here changes nothing
        return logits


@torch.no_grad()
def test_a_splice_that_would_not_take_effect_is_refused():
    model = _Quirky().eval()
    before = _snapshot(model)
    with pytest.raises(DoesNotApplyError, match="workbench: splicing at hook_never does not apply: the model "
                                                "registers hook_never but never fires it"):
        attach(model, _sae(32, hook="hook_never"))
    with pytest.raises(DoesNotApplyError, match="workbench: splicing at hook_reported does not apply: an edit of its "
                                                "latents does not change the model's output"):
        attach(model, _sae(model.cfg.d_vocab, hook="hook_reported"))
    assert _snapshot(model) == before
    spliced = attach(model, _sae(model.cfg.d_vocab, hook="hook_reported"), verify=False)  # unchecked: the caller's risk
    assert attached(model) == spliced
    detach(model)
    assert _snapshot(model) == before
