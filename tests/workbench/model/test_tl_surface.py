"""TransformerLens's model surface on the workbench Transformer (workbench/model/lens_surface.py).

The contract: every idiom of tests/tl_idioms.py runs on every shipped model and gives the numbers that
TransformerLens's own model gives holding the same weights (a `TransformerBridge.boot_native`, TL 4's
HookedTransformer-equivalent architecture), or, where the model lacks what the idiom needs, the clear error
tl_idioms.NEEDS names. Below it, the surface's own behaviour on tiny models.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from transformer_lens import ActivationCache, evals, patching

import workbench
from tests.conftest import tiny_config
from tests.tl_idioms import IDIOMS, NEEDS, assert_same, has, make_probe, reference
from workbench import HookNameError, InputError, ModelConfig, Transformer
from workbench.data.modular import modular_tokenizer
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.model.loading import shipped_models

SHIPPED = shipped_models()
_PAIRS: dict = {}


def pair(name: str):
    """(the shipped model, TransformerLens's model with its weights, its probe), made once per session."""
    if name not in _PAIRS:
        model = workbench.load(name, device="cpu")
        _PAIRS[name] = (model, reference(model), make_probe(model))
    return _PAIRS[name]


def _cases():
    for name in SHIPPED:
        for key, idiom in IDIOMS.items():
            yield pytest.param(name, key, id=f"{name}-{key}", marks=[pytest.mark.slow] if idiom.slow else [])


@pytest.mark.parametrize("name,key", list(_cases()))
def test_idiom_gives_transformer_lens_numbers(name, key):
    model, ref, probe = pair(name)
    idiom = IDIOMS[key]
    missing = [need for need in idiom.needs if not has(model, need)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if missing:
            types, pattern = NEEDS[missing[0]]
            with pytest.raises(types, match=pattern):
                idiom.run(model, probe)
            return
        assert_same(idiom.run(model, probe), idiom.run(ref, probe), key)


@pytest.mark.parametrize("name", SHIPPED)
@torch.no_grad()
def test_every_cached_activation_equals_transformer_lens(name):
    model, ref, probe = pair(name)
    logits, cache = model.run_with_cache(probe.clean_BS)
    ref_logits, ref_cache = ref.run_with_cache(probe.clean_BS)
    assert isinstance(cache, ActivationCache)
    assert_same(logits, ref_logits, "logits")
    assert set(cache.keys()) <= set(ref_cache.keys()), "every workbench hook has its TransformerLens name"
    for key in cache.keys():
        got, want = cache[key], ref_cache[key]
        if key.endswith("hook_normalized"):
            # TransformerLens (3 and 4) hooks the norm before its weight and bias; the workbench after them, on
            # the sublayer's input, which its transcoders read (sae/circuit_tracer_format.py says so too)
            ln = model.get_submodule(key.rsplit(".", 1)[0])
            want = want * ln.w + ln.b
        if key.endswith("hook_attn_scores"):
            # the native bridge's hook holds the pattern; HookedTransformer's (TL 3) held the masked scores, as here
            l = int(key.split(".")[1])
            want = torch.einsum("bqhd,bkhd->bhqk", ref_cache["q", l], ref_cache["k", l]) / model.cfg.d_head ** 0.5
            S = want.shape[-1]
            want = want.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        assert_same(got, want, key)


# -- TransformerLens's own modules: what applies and what says clearly that it does not ------------------------
@pytest.mark.parametrize("name", SHIPPED)
def test_induction_loss_refuses_token_ids_outside_the_vocabulary(name):
    model, _, _ = pair(name)  # induction_loss draws ids from [100, 20000): more than any shipped vocabulary
    with pytest.raises(InputError, match=rf"Token ids must lie in \[0, {model.cfg.d_vocab}\)"):
        evals.induction_loss(model, device="cpu", subseq_len=1)


@torch.no_grad()
def test_induction_loss_equals_transformer_lens_where_the_vocabulary_fits():
    big = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=769, d_vocab=20000, seed=3)
    model = Transformer(big, tokenizer=TextCodec(byte_tokenizer())).eval()
    ref = reference(Transformer(big).eval())
    losses = []
    for m in (model, ref):
        torch.manual_seed(0)
        losses.append(evals.induction_loss(m, device="cpu", batch_size=2, subseq_len=384))
    assert_same(losses[0], losses[1], "induction_loss")


def test_direct_path_patching_is_refused_clearly(attn_model, tokens):
    _, clean = attn_model.run_with_cache(tokens)
    _, corrupt = attn_model.run_with_cache(tokens.flip(-1))
    with pytest.raises(InputError, match="hook_q_input"):
        patching.get_act_patch_direct_path(attn_model, tokens.flip(-1), clean, corrupt, lambda x: x.sum(), 0, 0)
    assert attn_model.cfg.use_split_qkv_input is False


@pytest.mark.parametrize("flag", ["use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in"])
def test_hook_flags_the_model_cannot_honour_are_refused(attn_model, flag):
    getattr(attn_model, f"set_{flag}")(False)  # already so: nothing to do
    with pytest.raises(InputError, match=f"set_{flag}"):
        getattr(attn_model, f"set_{flag}")(True)
    assert getattr(attn_model.cfg, flag) is False


# -- the config ---------------------------------------------------------------------------------------------
def test_config_is_the_model_config_and_follows_the_weights(mlp_model, tmp_path):
    cfg = mlp_model.cfg
    plain = ModelConfig(**cfg.to_dict())
    assert cfg == plain and plain == cfg and hash(cfg) == hash(plain)
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert cfg.device == torch.device("cpu") and cfg.dtype == torch.float32
    mlp_model.to(torch.float64)
    assert mlp_model.cfg.dtype == torch.float64
    mlp_model.to("meta")
    assert mlp_model.cfg.device == torch.device("meta")
    changed = dataclasses.replace(cfg, seed=5)
    assert Transformer(changed).cfg.seed == 5 and Transformer(changed).cfg.device == torch.device("cpu")
    with pytest.raises(InputError, match="not bound to a model"):
        changed.device  # noqa: B018


def test_config_answers_what_transformer_lens_reads(attn_model, mlp_model):
    cfg = attn_model.cfg
    assert cfg.default_prepend_bos is False and cfg.tokenizer_prepends_bos is False
    assert cfg.d_vocab_out == cfg.d_vocab and cfg.n_key_value_heads is None
    assert cfg.positional_embedding_type == "standard" and cfg.use_attn_result is False
    assert cfg.eps == attn_model.ln_final.eps == attn_model.blocks[0].ln1.eps
    assert cfg.attn_scale == cfg.d_head ** 0.5 and cfg.model_name == ""
    shipped = workbench.load(SHIPPED[0], device="cpu")
    assert shipped.cfg.model_name == SHIPPED[0]
    assert mlp_model.cfg.act_fn == "gelu" and mlp_model.cfg.normalization_type == "LN"


# -- the cache ----------------------------------------------------------------------------------------------
def test_run_with_cache_returns_an_activation_cache(attn_model, tokens):
    logits, cache = attn_model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache) and torch.allclose(logits, attn_model(tokens), atol=1e-5)
    _, plain = attn_model.run_with_cache(tokens, return_cache_object=False)
    assert type(plain) is dict and set(plain) == set(cache.keys())
    _, one = attn_model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert not one.has_batch_dim and one["pattern", 1].shape == (4, tokens.shape[1], tokens.shape[1])
    with pytest.raises(HookNameError, match="hook_patern"):
        attn_model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_patern"])


def test_head_results_are_computed_from_z_on_first_use(attn_model, tokens):
    _, cache = attn_model.run_with_cache(tokens)
    assert "blocks.1.attn.hook_result" not in cache.keys()
    result_BSHD = cache["result", 1]
    expected = torch.einsum("bshk,hkd->bshd", cache["z", 1], attn_model.blocks[1].attn.W_O)
    assert torch.allclose(result_BSHD, expected, atol=1e-6)
    assert torch.allclose(result_BSHD.sum(2) + attn_model.blocks[1].attn.b_O, cache["attn_out", 1], atol=1e-5)
    assert "blocks.0.attn.hook_result" in cache.keys()  # kept, as compute_head_results keeps them


def test_a_missing_activation_says_why(attn_model, tokens):
    _, cache = attn_model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(KeyError, match="names_filter left it out"):
        cache["resid_post", 0]
    with pytest.raises(HookNameError, match="attention-only"):
        cache["mlp_out", 0]
    with pytest.raises(HookNameError, match="2 layer"):
        cache["resid_pre", 7]
    with pytest.raises(InputError, match="attention-only"):
        cache.stack_neuron_results(1)
    no_ln = Transformer(tiny_config(normalization_type=None)).eval()
    with pytest.raises(HookNameError, match="no LayerNorm"):
        no_ln.run_with_cache(tokens)[1]["scale"]


# -- tokens and text ----------------------------------------------------------------------------------------
def test_to_tokens_pads_prepends_and_truncates_as_transformer_lens(attn_model):
    eos = attn_model.tokenizer.eos_token_id
    assert eos == attn_model.tokenizer.bos_token_id == attn_model.tokenizer.pad_token_id == 256
    assert attn_model.to_tokens(["ab", "c"]).tolist() == [[97, 98], [99, eos]]
    assert attn_model.to_tokens(["ab", "c"], padding_side="left").tolist() == [[97, 98], [eos, 99]]
    assert attn_model.to_tokens("ab", prepend_bos=True).tolist() == [[eos, 97, 98]]
    assert attn_model.to_tokens("x" * 50).shape == (1, attn_model.cfg.n_ctx)
    assert attn_model.to_tokens("x" * 50, truncate=False).shape == (1, 50)
    assert attn_model.to_tokens("ab", move_to_device=False).device == torch.device("cpu")
    with pytest.raises(InputError, match="padding_side"):
        attn_model.to_tokens(["a", "bc"], padding_side="middle")
    with pytest.raises(InputError, match="list of strings"):
        attn_model.to_tokens(torch.tensor([1, 2]))


def test_str_tokens_single_tokens_and_positions(attn_model):
    assert attn_model.to_str_tokens("hi!") == ["h", "i", "!"]
    assert attn_model.to_str_tokens("hi", prepend_bos=True) == ["<|endoftext|>", "h", "i"]
    assert attn_model.to_str_tokens(torch.tensor([[104, 105]])) == ["h", "i"]
    assert attn_model.to_str_tokens(["a", "bc"]) == [["a"], ["b", "c"]]
    assert attn_model.to_string(torch.tensor(104)) == "h"
    assert attn_model.to_single_token("h") == 104 and attn_model.to_single_str_token(104) == "h"
    assert attn_model.get_token_position("a", "banana") == 1
    assert attn_model.get_token_position("a", "banana", mode="last") == 5
    with pytest.raises(InputError, match="not a single token"):
        attn_model.to_single_token("hi")
    with pytest.raises(InputError, match="does not occur"):
        attn_model.get_token_position("z", "banana")
    with pytest.raises(InputError, match="one sequence"):
        attn_model.to_str_tokens(torch.zeros(2, 3, dtype=torch.long))


def test_text_goes_straight_into_the_model(attn_model):
    text = "def f(x): return x"
    tokens = attn_model.to_tokens(text)
    assert torch.equal(attn_model(text), attn_model(tokens))
    assert torch.equal(attn_model(text, return_type="loss"), attn_model(tokens, return_type="loss"))
    fired = []
    assert attn_model.run_with_hooks(text, return_type=None, fwd_hooks=[
        ("blocks.0.hook_resid_pre", lambda x, hook: fired.append(x.shape))]) is None
    assert fired == [(1, tokens.shape[1], attn_model.cfg.d_model)]


def test_a_model_without_a_tokenizer_or_special_tokens_refuses_text(tokens):
    model = Transformer(tiny_config()).eval()
    for call in (lambda: model.to_tokens("a"), lambda: model.to_str_tokens(tokens[0]), lambda: model("a"),
                 lambda: model.to_string(tokens[0]), lambda: model.to_single_token("a")):
        with pytest.raises(InputError, match="no tokenizer"):
            call()
    modular = Transformer(tiny_config(d_vocab=12, d_mlp=8), tokenizer=TextCodec(modular_tokenizer(11))).eval()
    assert modular.tokenizer.bos_token_id is None and modular.tokenizer.pad_token_id is None
    assert modular.to_tokens("3 5 =").tolist() == [[3, 5, 11]]
    with pytest.raises(InputError, match="no BOS token"):
        modular.to_tokens("3", prepend_bos=True)
    with pytest.raises(InputError, match="no pad token"):
        modular.to_tokens(["3 5", "3"])


# -- weights ------------------------------------------------------------------------------------------------
def test_circuits_are_factored_matrices_of_the_weights(mlp_model):
    for l in range(mlp_model.cfg.n_layers):
        attn = mlp_model.blocks[l].attn
        assert torch.allclose(attn.OV.AB, mlp_model.OV[l].AB) and torch.allclose(attn.QK.AB, mlp_model.QK[l].AB)
        assert torch.allclose(attn.OV.AB[2], attn.W_V[2] @ attn.W_O[2])
        assert torch.allclose(attn.QK.AB[2], attn.W_Q[2] @ attn.W_K[2].T)
    assert mlp_model.W_E_pos.shape == (mlp_model.cfg.d_vocab + mlp_model.cfg.n_ctx, mlp_model.cfg.d_model)
    scores = mlp_model.all_composition_scores("K")
    assert scores.shape == (2, 4, 2, 4) and (scores[1, :, 0] == 0).all() and (scores[0, :, 1] > 0).all()
    with pytest.raises(InputError, match="mode"):
        mlp_model.all_composition_scores("X")
    assert mlp_model.all_head_labels[:2] == ["L0H0", "L0H1"] and len(mlp_model.all_head_labels) == 8


def test_accumulated_bias_adds_the_output_biases(mlp_model):
    with torch.no_grad():
        for p in mlp_model.parameters():
            if p.ndim == 1:
                p.normal_()
    b = mlp_model
    assert torch.allclose(b.accumulated_bias(1), b.blocks[0].attn.b_O + b.blocks[0].mlp.b_out)
    assert torch.allclose(b.accumulated_bias(1, mlp_input=True), b.accumulated_bias(1) + b.blocks[1].attn.b_O)
    assert torch.allclose(b.accumulated_bias(2, include_mlp_biases=False), b.b_O.sum(0))
    with pytest.raises(InputError, match="n_layers"):
        b.accumulated_bias(2, mlp_input=True)


def test_every_need_of_an_idiom_has_its_error():
    assert set(NEEDS) >= {need for idiom in IDIOMS.values() for need in idiom.needs}


def test_the_bound_config_follows_copies_and_pickles_and_keeps_no_model_alive():
    import copy
    import gc
    import pickle
    import weakref

    model = workbench.load("attn-only-2l", device="cpu")
    twin = copy.deepcopy(model).to(torch.float64)
    assert model.cfg.dtype == torch.float32 and twin.cfg.dtype == torch.float64  # each config reads its own model
    restored = pickle.loads(pickle.dumps(model))
    assert restored.cfg.device == torch.device("cpu") and restored.cfg == model.cfg
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None  # no reference cycle through the config: freed as soon as it is dropped
    finally:
        gc.enable()


def test_every_part_holds_the_bound_config_and_the_name_is_the_folders(tmp_path):
    model = workbench.load("attn-only-2l", device="cpu")
    assert model.blocks[0].attn.cfg is model.cfg and model.blocks[0].attn.cfg.device == torch.device("cpu")
    assert model.cfg.model_name == "attn-only-2l"
    assert (model.cfg == object()) is False  # not comparable: not equal, and no error
    workbench.save_model(model, tmp_path / "renamed")
    assert workbench.load(tmp_path / "renamed", device="cpu").cfg.model_name == "renamed"  # as model_name_of says


def test_a_mask_with_nothing_padded_is_the_plain_forward_and_return_type_none_skips_the_unembedding():
    model = workbench.load("attn-only-2l", device="cpu")
    tokens = model.to_tokens("def f(x):")
    assert torch.equal(model(tokens, attention_mask=torch.ones_like(tokens)), model(tokens))
    seen = []
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: seen.append(x.shape))]):
        assert model(tokens, return_type=None) is None
    assert seen == [(1, tokens.shape[1], model.cfg.d_model)]
    with pytest.raises(InputError, match="No loss with an attention_mask"):
        model(tokens, return_type="loss", attention_mask=torch.ones_like(tokens))
