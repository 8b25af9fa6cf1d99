"""`Transformer.generate` and its KV cache (workbench/model/generation.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import workbench
from tests.conftest import tiny_config
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.errors import InputError
from workbench.model.generation import KVCache, sample_logits
from workbench.model.transformer import Transformer

GREEDY = dict(do_sample=False, stop_at_eos=False, verbose=False)


def make_model(d_mlp=None, n_ctx=48, tokenizer=True) -> Transformer:
    cfg = tiny_config(d_mlp=d_mlp, n_ctx=n_ctx)
    return Transformer(cfg, tokenizer=TextCodec(byte_tokenizer()) if tokenizer else None).eval()


@pytest.fixture(params=[None, 64], ids=["attn-only", "mlp"])
def model(request) -> Transformer:
    return make_model(d_mlp=request.param)


@pytest.fixture
def prompts() -> torch.Tensor:
    return torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))


def _read_pattern(x, hook):  # a hook on hook_pattern sends attention down the materialised path
    return x


# -- the cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("materialised", [False, True], ids=["sdpa", "materialised"])
def test_cached_logits_equal_a_full_forward(model, prompts, materialised):
    tokens = torch.randint(0, 256, (3, 30), generator=torch.Generator().manual_seed(1))
    hooks = [(f"blocks.{l}.attn.hook_pattern", _read_pattern) for l in range(2)] if materialised else []
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        full = model(tokens)
        cache = KVCache(model.cfg, 3)
        chunks = [(0, 10), (10, 11), (11, 16), *[(i, i + 1) for i in range(16, 30)]]  # prompt, tokens, a chunk
        stepped = torch.cat([model(tokens[:, a:b], past_kv_cache=cache) for a, b in chunks], 1)
    assert cache.length == 30
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)


def test_a_pass_that_raises_leaves_the_cache_as_it_was(model):
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False

    def boom(x, hook):
        raise RuntimeError("boom")

    with torch.no_grad():
        cache = KVCache(model.cfg, 2)
        model(tokens[:, :8], attention_mask=mask[:, :8], past_kv_cache=cache)
        with pytest.raises(RuntimeError, match="boom"), model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", boom)]):
            model(tokens[:, 8:9], past_kv_cache=cache)
        assert cache.length == 8
        stepped = torch.cat([model(tokens[:, i:i + 1], past_kv_cache=cache) for i in range(8, 12)], 1)
        torch.testing.assert_close(stepped, model(tokens, attention_mask=mask)[:, 8:], atol=1e-5, rtol=0)


def test_greedy_generation_with_and_without_the_cache_is_the_same(model, prompts):
    cached = model.generate(prompts, max_new_tokens=20, **GREEDY)
    plain = model.generate(prompts, max_new_tokens=20, use_past_kv_cache=False, **GREEDY)
    assert cached.shape == (3, 30) and torch.equal(cached[:, :10], prompts)
    assert torch.equal(cached, plain)
    with torch.no_grad():  # each new token is the argmax of a full forward over what came before
        assert torch.equal(model(cached[:, :-1])[:, 9:].argmax(-1), cached[:, 10:])


@pytest.mark.parametrize("attn_only", [True, False], ids=["attn-only", "mlp"])
def test_the_same_weights_in_transformerlens_generate_the_same_tokens(attn_only, prompts):
    """TransformerLens 4 has no HookedTransformer; its TL-native bridge (boot_native) is the same model."""
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    ours = make_model(d_mlp=None if attn_only else 64)
    c = ours.cfg
    cfg = TransformerBridgeConfig(n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_head=c.d_head,
                                  d_mlp=c.d_mlp, attn_only=attn_only, n_ctx=c.n_ctx, d_vocab=c.d_vocab,
                                  act_fn=c.act_fn, normalization_type="LN")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TransformerBridge.boot_native(cfg, device="cpu")
    theirs.load_state_dict(convert_tl_checkpoint(ours.state_dict(), cfg), strict=True)
    expected = theirs.generate(prompts, max_new_tokens=16, **GREEDY)
    assert torch.equal(ours.generate(prompts, max_new_tokens=16, **GREEDY), expected)
    assert torch.equal(ours.generate(prompts, max_new_tokens=16, use_past_kv_cache=False, **GREEDY), expected)


# -- hooks ----------------------------------------------------------------------------------------
def _ablate_heads(z, hook):
    z[:, :, :] = 0.0
    return z


def test_hooks_stay_active_while_generating(model, prompts):
    clean = model.generate(prompts, max_new_tokens=12, **GREEDY)
    hooks = [(f"blocks.{l}.attn.hook_z", _ablate_heads) for l in range(2)]
    with model.hooks(fwd_hooks=hooks):
        ablated = model.generate(prompts, max_new_tokens=12, **GREEDY)
        ablated_plain = model.generate(prompts, max_new_tokens=12, use_past_kv_cache=False, **GREEDY)
    assert not torch.equal(ablated, clean)
    assert torch.equal(ablated, ablated_plain)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):  # the ablated model's own greedy continuation
        assert torch.equal(model(ablated[:, :-1])[:, 9:].argmax(-1), ablated[:, 10:])
    assert torch.equal(model.generate(prompts, max_new_tokens=12, **GREEDY), clean)  # and the hooks are gone
    model.add_hook("blocks.0.attn.hook_z", _ablate_heads, is_permanent=True)
    try:
        only_first = model.generate(prompts, max_new_tokens=12, **GREEDY)
    finally:
        model.reset_hooks(including_permanent=True)
    assert not torch.equal(only_first, clean)


def test_with_the_cache_a_hook_sees_only_the_new_positions(model, prompts):
    seen = {"resid": [], "pattern": []}
    hooks = [("blocks.1.hook_resid_pre", lambda x, hook: seen["resid"].append(tuple(x.shape))),
             ("blocks.1.attn.hook_pattern", lambda x, hook: seen["pattern"].append(tuple(x.shape)))]
    with model.hooks(fwd_hooks=hooks):
        model.generate(prompts, max_new_tokens=4, **GREEDY)
    D, H = model.cfg.d_model, model.cfg.n_heads
    assert seen["resid"] == [(3, 10, D)] + [(3, 1, D)] * 3
    assert seen["pattern"] == [(3, H, 10, 10), (3, H, 1, 11), (3, H, 1, 12), (3, H, 1, 13)]
    seen["resid"].clear()
    with model.hooks(fwd_hooks=hooks[:1]):
        model.generate(prompts, max_new_tokens=4, use_past_kv_cache=False, **GREEDY)
    assert seen["resid"] == [(3, S, D) for S in range(10, 14)]


def test_an_edit_of_the_keys_is_kept_in_the_cache(model, prompts):
    """The cache holds the keys as the hook left them, so a steered key affects later tokens too."""
    def scale(k, hook):
        return k * 3.0

    hooks = [("blocks.0.attn.hook_k", scale)]
    with model.hooks(fwd_hooks=hooks):
        cached = model.generate(prompts, max_new_tokens=12, **GREEDY)
        plain = model.generate(prompts, max_new_tokens=12, use_past_kv_cache=False, **GREEDY)
    assert torch.equal(cached, plain)


# -- sampling -------------------------------------------------------------------------------------
def test_sampling_is_deterministic_for_a_seed(model, prompts):
    def sample(**kw):
        return model.generate(prompts, max_new_tokens=15, stop_at_eos=False, verbose=False, **kw)

    torch.manual_seed(0)
    a = sample()
    torch.manual_seed(0)
    b = sample()
    assert torch.equal(a, b)
    state = torch.random.get_rng_state()
    c, d, e = sample(seed=3), sample(seed=3), sample(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seed of its own leaves the global RNG alone
    assert torch.equal(c, d) and not torch.equal(c, e)
    assert torch.equal(sample(seed=3, use_past_kv_cache=False), c)


def test_top_k_1_temperature_0_and_a_tiny_top_p_are_greedy(model, prompts):
    greedy = model.generate(prompts, max_new_tokens=10, **GREEDY)
    for kw in (dict(top_k=1), dict(temperature=0.0), dict(top_p=1e-6)):
        sampled = model.generate(prompts, max_new_tokens=10, stop_at_eos=False, verbose=False, seed=0, **kw)
        assert torch.equal(sampled, greedy), kw


def test_sample_logits_keeps_to_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.7, generator=gen).tolist()) == {0, 1}  # 0.5 < 0.7 ≤ 0.8
    assert set(sample_logits(logits, top_p=0.45, generator=gen).tolist()) == {0}
    assert set(sample_logits(logits, generator=gen).tolist()) == {0, 1, 2, 3}
    share = (sample_logits(logits, temperature=2.0, generator=gen) == 0).float().mean()
    assert 0.3 < share < 0.42  # p^(1/2) renormalised: 0.707 / 1.96 = 0.36
    tokens = torch.zeros(4000, 3, dtype=torch.long)  # token 0 seen three times
    assert (sample_logits(logits, freq_penalty=10.0, tokens_BN=tokens, generator=gen) != 0).all()


def test_a_left_padded_batch_generates_what_each_prompt_does_alone(model):
    rows = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 6)]
    S = 9
    tokens = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, S - len(r):], mask[i, S - len(r):] = r, True
    for use_cache in (True, False):
        batch = model.generate(tokens, max_new_tokens=12, attention_mask=mask, use_past_kv_cache=use_cache, **GREEDY)
        for i, r in enumerate(rows):
            alone = model.generate(r[None], max_new_tokens=12, **GREEDY)
            assert torch.equal(batch[i, S - len(r):], alone[0]), (i, use_cache)


def test_a_padded_forward_gives_each_row_its_own_logits(model):
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)
        torch.testing.assert_close(padded[1, 3:], model(tokens[1:, 3:])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(padded[0], model(tokens[:1])[0], atol=1e-5, rtol=0)


# -- stopping and text ----------------------------------------------------------------------------
def test_each_row_stops_at_its_eos_and_is_filled_with_it(model, prompts):
    free = model.generate(prompts, max_new_tokens=12, **GREEDY)
    eos = int(free[0, 13])  # what row 0 says fourth
    stopped = model.generate(prompts, max_new_tokens=12, do_sample=False, eos_token_id=eos, verbose=False)
    first = [next((j for j in range(10, 22) if free[i, j] == eos), None) for i in range(3)]
    assert first[0] is not None and first[0] <= 13
    assert stopped.shape[1] == (22 if None in first else max(first) + 1)
    for i, j in enumerate(first):
        if j is not None:
            assert torch.equal(stopped[i, : j + 1], free[i, : j + 1]) and (stopped[i, j:] == eos).all()
        else:
            assert torch.equal(stopped[i], free[i, : stopped.shape[1]])


def test_strings_in_strings_out(model):
    text = model.generate("def f(x):", max_new_tokens=6, **GREEDY)
    assert isinstance(text, str) and text.startswith("def f(x):")
    tokens = model.generate("def f(x):", max_new_tokens=6, return_type="tokens", **GREEDY)
    assert text == "def f(x):" + model.to_string(tokens[0, -6:])  # ASCII prompt: nothing to merge across
    batch = model.generate(["def f(x):", "ab"], max_new_tokens=6, **GREEDY)
    assert batch == [text, model.generate("ab", max_new_tokens=6, **GREEDY)]
    eos = model.tokenizer.eos_token_id  # an empty prompt starts where documents do, after <|endoftext|>
    from_scratch = model.generate(torch.tensor([[eos]]), max_new_tokens=6, **GREEDY)
    assert model.generate("", max_new_tokens=6, **GREEDY) == model.to_string(from_scratch[0, 1:])
    assert model.generate(["", "ab"], max_new_tokens=6, **GREEDY)[0] == model.to_string(from_scratch[0, 1:])
    with_bos = model.generate("ab", max_new_tokens=6, prepend_bos=True, return_type="tokens", **GREEDY)
    assert with_bos[0, 0] == eos and model.generate("ab", max_new_tokens=6, prepend_bos=True, **GREEDY) == \
        model.to_string(with_bos[0, 1:])


def test_verbose_shows_a_progress_bar(model, prompts, capsys):
    model.generate(prompts, max_new_tokens=3, do_sample=False, stop_at_eos=False)
    assert "generate" in capsys.readouterr().err
    model.generate(prompts, max_new_tokens=3, **GREEDY)
    assert capsys.readouterr().err == ""


def test_a_model_without_a_tokenizer_generates_from_tokens_only(prompts):
    model = make_model(tokenizer=False)
    out = model.generate(prompts, max_new_tokens=5, verbose=False)  # stop_at_eos: there is no eos to stop at
    assert out.shape == (3, 15)
    with pytest.raises(InputError, match="no tokenizer"):
        model.generate("hello", verbose=False)
    with pytest.raises(InputError, match="no tokenizer"):
        model.generate(prompts, return_type="str", verbose=False)


def test_generation_fills_n_ctx_and_no_further(prompts):
    model = make_model(n_ctx=16)
    assert model.generate(prompts, max_new_tokens=6, **GREEDY).shape == (3, 16)
    with pytest.raises(InputError, match="n_ctx=16. Ask for at most 6 new tokens"):
        model.generate(prompts, max_new_tokens=7, **GREEDY)
    with pytest.raises(InputError, match="positions"):
        cache = KVCache(model.cfg, 3, capacity=12)
        model(prompts, past_kv_cache=cache)
        model(prompts[:, :3], past_kv_cache=cache)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"), (dict(freq_penalty=-0.5), "freq_penalty"),
    (dict(return_type="embeds"), "return_type"), (dict(padding_side="right"), "pad"),
    (dict(eos_token_id=10_000), "eos_token_id"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]] * 3)), "ends in padding"),
])
def test_bad_arguments_are_input_errors(kwargs, match):
    model = make_model()
    with pytest.raises(InputError, match=match):
        model.generate(torch.zeros(3, 3, dtype=torch.long), verbose=False, **kwargs)


def test_bad_inputs_are_input_errors(model):
    for bad in ([], [1, 2], 3, torch.tensor([[0.5]])):
        with pytest.raises(InputError):
            model.generate(bad, verbose=False)
    with pytest.raises(InputError, match="batch of 2"):
        model(torch.zeros(3, 2, dtype=torch.long), past_kv_cache=KVCache(model.cfg, 2))


# -- models it must work on -----------------------------------------------------------------------
def test_every_shipped_model_generates_the_same_with_and_without_the_cache():
    import workbench
    from workbench.model.loading import shipped_models

    for name in shipped_models():
        model = workbench.load(name, device="cpu")
        n = min(8, model.cfg.n_ctx - 1)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.cfg.d_vocab, (2, model.cfg.n_ctx - n), generator=gen)
        cached = model.generate(prompt, max_new_tokens=n, **GREEDY)
        assert torch.equal(cached, model.generate(prompt, max_new_tokens=n, use_past_kv_cache=False, **GREEDY)), name


def test_a_bridge_generates_with_transformerlens_own_loop(tiny_gpt2):
    """On an hf: model generation is TransformerLens's; the workbench's loading must leave it working."""
    import workbench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices
        bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
        text = bridge.generate("def main", max_new_tokens=4, do_sample=False, verbose=False)
        tokens = bridge.to_tokens("def main")
        out = bridge.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    assert isinstance(text, str) and text.startswith("def main")
    with torch.no_grad():
        assert torch.equal(bridge(out[:, :-1])[:, tokens.shape[1] - 1:].argmax(-1), out[:, tokens.shape[1]:])


def test_an_empty_prompt_on_a_tokenizer_without_a_bos_says_so():
    model = workbench.load("modular-addition", device="cpu")
    with pytest.raises(InputError, match="empty prompt starts from the BOS"):
        model.generate("", max_new_tokens=1, verbose=False)
