"""TransformerLens idioms, as people write them in notebooks (ARENA chapter 1.2, Neel Nanda's exploratory
analysis demo) and as TransformerLens's own modules use a model (`patching`, `head_detector`, `utilities`,
`SVDInterpreter`). Each idiom is a function of a model and a `Probe` that returns what it computed, so the
same idiom can run on a workbench model and on the TransformerLens model holding the same weights
(`reference`), and the two answers can be compared number by number (`assert_same`).

    probe = make_probe(model)                 # prompts and token rows that fit the model
    ref = reference(model)                    # TransformerBridge.boot_native with the same weights and tokenizer
    for idiom in IDIOMS.values(): assert_same(idiom.run(model, probe), idiom.run(ref, probe))

An idiom lists what it needs of a model (`needs`: an MLP, LayerNorm, a BOS or pad token). On a model
without it, the idiom must fail with the clear error of NEEDS.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens import FactoredMatrix, SVDInterpreter, head_detector, patching
from transformer_lens.utilities import get_act_name, test_prompt

from workbench.errors import HookNameError, InputError
from workbench.model.modular import is_modular_model

NEEDS: dict[str, tuple[tuple[type[Exception], ...], str]] = {
    "mlp": ((HookNameError, InputError, NotImplementedError), "attention-only|dense MLP weight"),
    "ln": ((HookNameError,), "no LayerNorm"),
    "bos": ((InputError,), "no BOS token"),
    "pad": ((InputError,), "no pad token"),
    # what only Hugging Face families lack (TransformerLens's errors, or the idiom's own code failing):
    "pos": ((KeyError, AttributeError), "pos_embed|W_pos"),
    "mha": ((RuntimeError,), "einsum"),
    "mlp_bias": ((AttributeError,), "bias-free"),
}
"""What an idiom may need of a model, and the error a model without it gives: (types, regex). A workbench
model can lack the first four; every workbench model has a learned positional embedding (pos), a key and value
per head (mha) and MLP biases where it has an MLP."""


def has(model: Any, need: str) -> bool:
    """Whether `model` (a workbench model or a TransformerBridge) has what `need` names (see NEEDS)."""
    cfg, tok = model.cfg, model.tokenizer
    return {"mlp": not cfg.attn_only, "ln": cfg.normalization_type is not None,
            "bos": tok is not None and tok.bos_token_id is not None,
            "pad": tok is not None and tok.pad_token_id is not None,
            "pos": cfg.positional_embedding_type == "standard",
            "mha": cfg.n_key_value_heads in (None, cfg.n_heads),
            "mlp_bias": not cfg.attn_only and not getattr(cfg, "gated_mlp", False)}[need]


# -- what the idioms run on ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """Inputs that fit one model: prompts in its tokenizer's language, and token rows within its context."""

    text: str
    """A prompt."""
    short: str
    """A shorter prompt (for padding)."""
    present: str
    """A single-token string that occurs in `text`."""
    answer: str
    """A single-token string, the 'correct' next token of logit differences."""
    wrong: str
    """Another single-token string, the 'incorrect' one."""
    repeated: str
    """A prompt in which a stretch repeats (for the head detector), shorter than n_ctx."""
    clean_BS: torch.Tensor
    """[2, S] token ids."""
    corrupt_BS: torch.Tensor
    """[2, S] other token ids, for patching."""


def make_probe(model: Any, seq_len: int = 10) -> Probe:
    """The probe of a workbench model: modular addition speaks 'a b =', the others text."""
    gen = torch.Generator().manual_seed(0)
    V, S = model.cfg.d_vocab, min(seq_len, model.cfg.n_ctx)
    if is_modular_model(model):
        p = V - 1
        clean = torch.tensor([[3, 5, p], [10, 20, p]])
        corrupt = torch.tensor([[4, 5, p], [10, 21, p]])
        return Probe(text="3 5 =", short="3", present="5", answer="8", wrong="9", repeated="7 7",
                     clean_BS=clean, corrupt_BS=corrupt)
    clean = torch.randint(0, V, (2, S), generator=gen)
    corrupt = torch.randint(0, V, (2, S), generator=gen)
    return Probe(text="def add(x, y):\n    return x + y", short="def", present="x", answer="x", wrong="y",
                 repeated="ab cd ef gh ab cd ef gh", clean_BS=clean, corrupt_BS=corrupt)


def reference(model: Any) -> Any:
    """TransformerLens's model with the same weights and tokenizer: a `TransformerBridge.boot_native` (TL 4's
    HookedTransformer-equivalent architecture) loaded from the workbench state dict, whose names are
    TransformerLens's, in compatibility mode without weight processing (LayerNorm not folded, as the
    workbench's weights are not)."""
    from tokenizers import Tokenizer
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    from transformers import PreTrainedTokenizerFast

    c = model.cfg
    cfg = TransformerBridgeConfig(
        d_model=c.d_model, n_layers=c.n_layers, d_mlp=c.d_mlp, d_head=c.d_head, n_heads=c.n_heads, n_ctx=c.n_ctx,
        d_vocab=c.d_vocab, act_fn=c.act_fn, attn_only=c.attn_only, normalization_type=c.normalization_type,
        positional_embedding_type="standard", architecture="TransformerLensNative", default_prepend_bos=False)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = None
        if model.tokenizer is not None:  # the bridge re-loads its tokenizer from the folder, while booting
            tok = model.tokenizer
            special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token") if getattr(tok, k)}
            PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.tok.to_str()), **special
                                    ).save_pretrained(folder)
            hf = PreTrainedTokenizerFast.from_pretrained(folder)
        bridge = TransformerBridge.boot_native(cfg, tokenizer=hf, device=c.device)
        bridge.load_state_dict(convert_tl_checkpoint(model.state_dict(), cfg), strict=True)
        bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return bridge.eval()


# -- comparing answers --------------------------------------------------------------------------------------
def assert_same(got: Any, want: Any, where: str = "", rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """`got` equals `want`: tensors to rtol and atol × (1 + the largest |value| of `want`), strings, numbers,
    labels and containers exactly (floats to the same tolerance)."""
    if hasattr(want, "scores") and not isinstance(want, torch.Tensor):  # TL 4's CompositionScores
        want = want.scores
    if isinstance(want, FactoredMatrix):
        want, got = want.AB, got.AB
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__}, not a tensor"
        assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if not want.dtype.is_floating_point and not want.dtype.is_complex:
            assert torch.equal(got.cpu(), want.cpu()), f"{where}: {got} != {want}"
            return
        finite = want[torch.isfinite(want)]
        scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
        torch.testing.assert_close(got.detach().cpu(), want.detach().cpu().to(got.dtype), rtol=rtol,
                                   atol=atol * scale, msg=lambda m: f"{where}: {m}")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}", rtol, atol)
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]", rtol, atol)
    elif isinstance(want, float):
        assert abs(got - want) <= atol * (1 + abs(want)), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


# -- the idioms ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Idiom:
    """A TransformerLens idiom: `run(model, probe)` returns what it computed."""

    run: Callable[[Any, Probe], dict[str, Any]]
    needs: tuple[str, ...] = ()
    slow: bool = False
    """Too slow for the fast suite (many forward passes)."""


IDIOMS: dict[str, Idiom] = {}


def idiom(*needs: str, slow: bool = False):
    def register(fn: Callable[[Any, Probe], dict[str, Any]]):
        IDIOMS[fn.__name__] = Idiom(fn, needs, slow)
        return fn
    return register


def sums_to(stack: torch.Tensor, total: torch.Tensor) -> bool:
    """Whether the components of `stack` [N, ...] add up to `total` [...] (to float32 rounding)."""
    return torch.allclose(stack.sum(0), total, rtol=1e-4, atol=1e-4 * (1 + float(total.abs().max())))


def _logit_diff(probe: Probe, model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    a, b = model.to_single_token(probe.answer), model.to_single_token(probe.wrong)
    return lambda logits: (logits[:, -1, a] - logits[:, -1, b]).mean()


# text and tokens
@idiom()
def to_tokens(model, probe):
    return {"one": model.to_tokens(probe.text), "list": model.to_tokens([probe.text, probe.text]),
            "no_bos": model.to_tokens(probe.text, prepend_bos=False), "cpu": model.to_tokens(probe.short,
                                                                                            move_to_device=False),
            "untruncated": model.to_tokens(probe.text * 40, truncate=False).shape}


@idiom("pad")
def to_tokens_padded(model, probe):
    return {"right": model.to_tokens([probe.text, probe.short]),
            "left": model.to_tokens([probe.text, probe.short], padding_side="left")}


@idiom("bos")
def to_tokens_with_bos(model, probe):
    # (Truncation is compared with a BOS only: TransformerLens 3 and 4 tokenize with a BOS, cut to n_ctx, then
    # strip the BOS, so without one they keep n_ctx - 1 tokens; the workbench keeps n_ctx, all the model takes.)
    return {"tokens": model.to_tokens(probe.text, prepend_bos=True),
            "truncated": model.to_tokens(probe.text * 40, prepend_bos=True),
            "str_tokens": model.to_str_tokens(probe.text, prepend_bos=True)}


@idiom()
def str_tokens_and_strings(model, probe):
    ids_S = model.to_tokens(probe.text)[0]
    return {"of_text": model.to_str_tokens(probe.text), "of_ids": model.to_str_tokens(ids_S),
            "of_row": model.to_str_tokens(ids_S[None]), "of_array": model.to_str_tokens(ids_S.cpu().numpy()),
            "of_list": model.to_str_tokens([probe.text, probe.short]),
            "string": model.to_string(ids_S), "strings": model.to_string(ids_S[None].expand(2, -1)),
            "one_id": model.to_string(ids_S[0]), "single": model.to_single_token(probe.answer),
            "single_str": model.to_single_str_token(model.to_single_token(probe.answer)),
            "first": model.get_token_position(probe.present, probe.text),
            "last": model.get_token_position(probe.present, probe.text, mode="last"),
            "in_ids": model.get_token_position(model.to_single_token(probe.present), ids_S[None])}


@idiom()
def forward_on_text(model, probe):
    """ARENA: `model(text, return_type=...)` and next-token predictions."""
    logits = model(probe.text, return_type="logits")
    return {"logits": logits, "loss": model(probe.text, return_type="loss"),
            "prediction": logits.argmax(dim=-1).squeeze()[:-1], "none": model(probe.text, return_type=None)}


@idiom()
def utilities_test_prompt(model, probe):
    """`transformer_lens.utilities.test_prompt`: what it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        test_prompt(probe.short, probe.answer, model, prepend_space_to_answer=False, top_k=5)
        test_prompt(probe.short, [probe.answer, probe.wrong], model, prepend_space_to_answer=False, top_k=3)
    return {"printed": out.getvalue()}


# the activation cache
@idiom("pos")
def cache_short_names(model, probe):
    """ARENA: the cache's short names and `utils.get_act_name`."""
    _, cache = model.run_with_cache(probe.clean_BS)
    return {"pattern": cache["pattern", model.cfg.n_layers - 1], "full": cache["blocks.0.attn.hook_pattern"],
            "act_name": cache[get_act_name("attn_out", 0)], "resid_last": cache["resid_post", -1],
            "q": cache["q", 0], "k": cache["k", 0, "attn"], "v": cache["v", 0], "z": cache["z", 0],
            "embed": cache["embed"], "pos_embed": cache["pos_embed"], "resid_pre": cache["resid_pre", 0]}


@idiom("mlp")
def cache_mlp_names(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    return {"mlp_out": cache["mlp_out", 0], "post": cache["post", 0], "pre": cache["pre", 0, "mlp"],
            "resid_mid": cache["resid_mid", 0]}


@idiom("ln")
def cache_ln_names(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    return {"scale": cache["scale"], "scale0": cache["scale", 0, "ln1"], "final": cache["ln_final.hook_scale"]}


@idiom()
def cache_batch_handling(model, probe):
    """`remove_batch_dim`, `apply_slice_to_batch_dim`, `to`, and a names_filter."""
    _, one = model.run_with_cache(probe.clean_BS[:1], remove_batch_dim=True)
    _, both = model.run_with_cache(probe.clean_BS)
    _, only = model.run_with_cache(probe.clean_BS, names_filter=lambda name: name.endswith("hook_pattern"))
    sliced = both.apply_slice_to_batch_dim(1)
    return {"one": one["pattern", 0], "has_batch_dim": one.has_batch_dim, "slice": sliced["resid_pre", 0],
            "moved": both.to("cpu")["z", 0], "filtered": sorted(only.keys()),
            "removed": model.run_with_cache(probe.clean_BS[1:])[1].remove_batch_dim()["resid_post", 0]}


@idiom("mha")
def pattern_from_q_and_k(model, probe):
    """ARENA: the layer-0 pattern recomputed from the cached queries and keys equals the cached one."""
    _, cache = model.run_with_cache(probe.clean_BS[:1], remove_batch_dim=True)
    q, k = cache["q", 0], cache["k", 0]
    scores = torch.einsum("qhd,khd->hqk", q, k) / model.cfg.d_head ** 0.5
    S = scores.shape[-1]
    scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool, device=scores.device), 1), -1e9)
    pattern = scores.softmax(-1)
    assert torch.allclose(pattern, cache["pattern", 0], atol=1e-5), "the pattern is softmax(q·k / sqrt(d_head))"
    return {"pattern": pattern}


@idiom()
def accumulated_resid(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    stack, labels = cache.accumulated_resid(return_labels=True)
    return {"stack": stack, "labels": labels, "ln_last": cache.accumulated_resid(apply_ln=True, pos_slice=-1),
            "layer1": cache.accumulated_resid(layer=1)}


@idiom("mlp")
def accumulated_resid_with_mid(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    return {"incl_mid": cache.accumulated_resid(incl_mid=True, return_labels=True),
            "mlp_input": cache.accumulated_resid(layer=1, mlp_input=True, apply_ln=True)}


@idiom()
def decompose_resid(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    stack, labels = cache.decompose_resid(return_labels=True)
    assert sums_to(stack, cache["resid_post", -1]), "the parts sum to the residual stream"
    return {"stack": stack, "labels": labels, "attn": cache.decompose_resid(mode="attn", return_labels=True),
            "ln_last": cache.decompose_resid(apply_ln=True, pos_slice=-1),
            "no_embeds": cache.decompose_resid(layer=1, incl_embeds=False)}


@idiom()
def stack_head_results(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    stack, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    return {"stack": stack, "labels": labels, "ln": cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True),
            "remainder": cache.stack_head_results(layer=1, incl_remainder=True, return_labels=True)}


@idiom()
def head_results(model, probe):
    """ARENA's direct logit attribution: `cache["result", l]` (per-head outputs) and the embeddings. (ARENA's model
    sets use_attn_result; TransformerLens 4 without it needs compute_head_results(), which the workbench's cache
    runs by itself on first use, so calling it is valid on both.)"""
    _, cache = model.run_with_cache(probe.clean_BS[:1], remove_batch_dim=True)
    cache.compute_head_results()
    results = [cache["result", l] for l in range(model.cfg.n_layers)]
    W_U_correct = model.W_U[:, probe.clean_BS[0, 1:]]
    direct = torch.einsum("sd,ds->s", cache["embed"][:-1], W_U_correct)
    heads = [torch.einsum("shd,ds->sh", r[:-1], W_U_correct) for r in results]
    return {"results": results, "direct": direct, "heads": heads}


@idiom()
def logit_attrs(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    stack = cache.decompose_resid(layer=-1, pos_slice=-1)
    a, b = model.to_single_token(probe.answer), model.to_single_token(probe.wrong)
    answers, wrongs = torch.tensor([a, a]), torch.tensor([b, b])
    return {"diff": cache.logit_attrs(stack, answers, wrongs, pos_slice=-1),
            "by_string": cache.logit_attrs(stack, probe.answer, pos_slice=-1),
            "heads": cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=-1), answers, pos_slice=-1)}


@idiom()
def residual_stack_to_logit_diff(model, probe):
    """Neel Nanda's exploratory-analysis demo: the logit difference each component writes."""
    _, cache = model.run_with_cache(probe.clean_BS)
    answer_tokens = torch.tensor([[model.to_single_token(probe.answer), model.to_single_token(probe.wrong)]] * 2)
    directions = model.tokens_to_residual_directions(answer_tokens)
    diff_directions = directions[:, 0] - directions[:, 1]
    accumulated = cache.accumulated_resid(layer=-1, incl_mid=False, pos_slice=-1)
    scaled = cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1)
    per_head = cache.apply_ln_to_stack(cache.stack_head_results(layer=-1, pos_slice=-1), layer=-1, pos_slice=-1)
    return {"directions": directions, "accumulated": torch.einsum("...bd,bd->...", scaled, diff_directions) / 2,
            "per_head": torch.einsum("...bd,bd->...", per_head, diff_directions) / 2,
            "final_scale": cache["resid_post", -1][:, -1].norm(dim=-1)}


@idiom()
def full_resid_decomposition(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert sums_to(stack, cache["resid_post", -1]), "the parts sum to the residual stream"
    direction = model.tokens_to_residual_directions(probe.answer)
    return {"stack": stack, "labels": labels,
            "ln": cache.get_full_resid_decomposition(expand_neurons=False, apply_ln=True, pos_slice=-1),
            "projected": cache.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1,
                                                            project_output_onto=direction)}


@idiom()
def full_resid_decomposition_by_neuron(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    stack, labels = cache.get_full_resid_decomposition(layer=1, pos_slice=-1, return_labels=True)
    assert sums_to(stack, cache["resid_post", 0][:, -1]), "neurons, heads and biases sum up"
    return {"stack": stack, "labels": labels[-5:], "n": len(labels)}


@idiom("mlp")
def stack_neuron_results(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    stack, labels = cache.stack_neuron_results(1, pos_slice=-1, return_labels=True, incl_remainder=True)
    direction = model.tokens_to_residual_directions(probe.answer)
    return {"stack": stack, "labels": labels[-3:],
            "ln": cache.stack_neuron_results(1, pos_slice=-1, neuron_slice=[0, 3, 5], apply_ln=True),
            # (apply_ln with project_output_onto fails inside TransformerLens on a model without LayerNorm)
            "projected": cache.stack_neuron_results(1, pos_slice=-1, project_output_onto=direction),
            "one": cache.get_neuron_results(0, neuron_slice=[2], pos_slice=-1)}


@idiom()
def logit_lens(model, probe):
    """TransformerLens 4's one-call logit lens over a cache, and from a prompt."""
    from transformer_lens.tools.analysis.logit_lens import logit_lens as lens

    _, cache = model.run_with_cache(probe.clean_BS)
    top = cache.logit_lens(top_k=3)
    ranks = lens(model, probe.clean_BS, targets=model.to_single_token(probe.answer), return_type="probs")
    return {"values": top.readout.values, "labels": top.labels, "probs": ranks.values,
            "rank": ranks.rank_trajectory()}


@idiom()
def stack_activation_and_ln(model, probe):
    _, cache = model.run_with_cache(probe.clean_BS)
    return {"patterns": cache.stack_activation("pattern"), "resid_pre": cache.stack_activation("resid_pre", layer=1),
            "ln_layer1": cache.apply_ln_to_stack(cache.decompose_resid(layer=1), layer=1),
            "recomputed": cache.apply_ln_to_stack(cache.accumulated_resid(), layer=-1, recompute_ln=True)}


# hooks
@idiom()
def ablate_a_head(model, probe):
    """ARENA: zero one head's z through a hook, and the loss that follows."""
    def ablate(z, hook, head=1):
        z[:, :, head, :] = 0.0
        return z

    name = get_act_name("z", 0)
    loss = model.run_with_hooks(probe.clean_BS, return_type="loss", fwd_hooks=[(name, ablate)])
    with model.hooks(fwd_hooks=[(name, ablate)]):
        logits = model(probe.clean_BS)
    return {"loss": loss, "logits": logits, "after": model(probe.clean_BS)}


@idiom("bos")
def induction_scores_by_hook(model, probe):
    """ARENA: repeated random tokens after a BOS, and each head's induction score from a pattern hook
    (`return_type=None`, a names filter as a function, `hook.layer()`, a store on `cfg.device`)."""
    seq_len = (model.cfg.n_ctx - 1) // 2
    assert model.to_tokens(probe.short, prepend_bos=True)[0, 0] == model.tokenizer.bos_token_id
    prefix = (torch.ones(1, 1) * model.tokenizer.bos_token_id).long()
    half = torch.randint(0, model.cfg.d_vocab, (1, seq_len), generator=torch.Generator().manual_seed(1))
    rep_tokens = torch.cat([prefix, half, half], dim=-1).to(model.cfg.device)
    store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=model.cfg.device)

    def score(pattern, hook):
        stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        store[hook.layer()] = stripe.mean(dim=(0, -1))

    out = model.run_with_hooks(rep_tokens, return_type=None, fwd_hooks=[(lambda n: n.endswith("pattern"), score)])
    return {"store": store, "returned": out}


# generation
@idiom()
def generate(model, probe):
    """The demo and ARENA read a model (and an ablated one) as text: greedy `generate` from token ids, with and
    without the KV cache, stopping at the end-of-text token, from a string, under a hook that zeroes the last
    layer's heads, and sampled after `torch.manual_seed` (TransformerLens's sampler draws from the global RNG).
    Prompt and new tokens fit n_ctx (modular addition's is 3: two tokens in, one out)."""
    greedy = dict(do_sample=False, stop_at_eos=False, verbose=False)
    S = min(probe.clean_BS.shape[1], model.cfg.n_ctx - 1)
    tokens, n = probe.clean_BS[:, :S], min(8, model.cfg.n_ctx - S)
    text = probe.text if model.to_tokens(probe.text).shape[1] < model.cfg.n_ctx else probe.short
    n_text = min(8, model.cfg.n_ctx - model.to_tokens(text).shape[1])

    def ablate(z, hook):
        z[:] = 0.0
        return z

    out = {"tokens": model.generate(tokens, max_new_tokens=n, **greedy),
           "no_cache": model.generate(tokens, max_new_tokens=n, use_past_kv_cache=False, **greedy),
           "stop_at_eos": model.generate(tokens, max_new_tokens=n, do_sample=False, verbose=False),
           "text": model.generate(text, max_new_tokens=n_text, **greedy),
           # as text (TransformerLens 3 and 4 decode with skip_special_tokens=True, and give one row as a string)
           "texts": model.generate(tokens, max_new_tokens=n, return_type="str", **greedy),
           "text_of_row": model.generate(tokens[:1], max_new_tokens=n, return_type="str", **greedy)}
    with model.hooks(fwd_hooks=[(get_act_name("z", model.cfg.n_layers - 1), ablate)]):
        out["ablated"] = model.generate(text, max_new_tokens=n_text, **greedy)
    torch.manual_seed(0)
    out["sampled"] = model.generate(tokens, max_new_tokens=n, top_k=5, stop_at_eos=False, verbose=False)
    return out


# TransformerLens's modules
@idiom()
def patch_heads(model, probe):
    _, clean = model.run_with_cache(probe.clean_BS)
    metric = _logit_diff(probe, model)
    args = (model, probe.corrupt_BS, clean, metric)
    return {"out": patching.get_act_patch_attn_head_out_all_pos(*args),
            "q": patching.get_act_patch_attn_head_q_all_pos(*args),
            "k": patching.get_act_patch_attn_head_k_all_pos(*args),
            "v": patching.get_act_patch_attn_head_v_all_pos(*args),
            "pattern": patching.get_act_patch_attn_head_pattern_all_pos(*args)}


@idiom(slow=True)
def patch_heads_every_kind(model, probe):
    _, clean = model.run_with_cache(probe.clean_BS)
    args = (model, probe.corrupt_BS, clean, _logit_diff(probe, model))
    return {"all_pos": patching.get_act_patch_attn_head_all_pos_every(*args),
            "out_by_pos": patching.get_act_patch_attn_head_out_by_pos(*args),
            "by_pos": patching.get_act_patch_attn_head_by_pos_every(*args),
            "dest_src": patching.get_act_patch_attn_head_pattern_dest_src_pos(
                model, probe.corrupt_BS[:, :4], model.run_with_cache(probe.clean_BS[:, :4])[1],
                _logit_diff(probe, model))}


@idiom()
def patch_residual(model, probe):
    _, clean = model.run_with_cache(probe.clean_BS)
    metric = _logit_diff(probe, model)

    def per_example(logits):
        return logits[:, -1, model.to_single_token(probe.answer)]

    result = patching.get_act_patch_attn_out(model, probe.corrupt_BS, clean, per_example, reduce="none",
                                             baseline=True)
    return {"resid_pre": patching.get_act_patch_resid_pre(model, probe.corrupt_BS, clean, metric),
            "per_example": result.values, "baseline": result.baseline}


@idiom("mlp")
def patch_mlp(model, probe):
    _, clean = model.run_with_cache(probe.clean_BS)
    args = (model, probe.corrupt_BS, clean, _logit_diff(probe, model))
    return {"mlp_out": patching.get_act_patch_mlp_out(*args), "resid_mid": patching.get_act_patch_resid_mid(*args)}


@idiom("mlp", slow=True)
def patch_every_block(model, probe):
    _, clean = model.run_with_cache(probe.clean_BS)
    return {"every": patching.get_act_patch_block_every(model, probe.corrupt_BS, clean, _logit_diff(probe, model))}


@idiom()
def detect_heads(model, probe):
    """`transformer_lens.head_detector.detect_head`, by name and with a pattern of one's own."""
    S = model.to_tokens(probe.repeated).shape[-1]
    own = torch.tril(torch.ones(S, S))
    return {name: head_detector.detect_head(model, probe.repeated, name)
            for name in ("previous_token_head", "duplicate_token_head", "induction_head")} | {
        "own_abs": head_detector.detect_head(model, probe.repeated, own, error_measure="abs", exclude_bos=True),
        "some": head_detector.detect_head(model, probe.repeated, "previous_token_head", heads=[(0, 1)])}


@idiom()
def svd_of_ov(model, probe):
    svd = SVDInterpreter(model)
    return {"ov": svd.get_singular_vectors("OV", layer_index=0, head_index=1, num_vectors=3)}


@idiom("mlp")
def svd_of_mlp(model, probe):
    svd = SVDInterpreter(model)
    return {"w_in": svd.get_singular_vectors("w_in", layer_index=0, num_vectors=3),
            "w_out": svd.get_singular_vectors("w_out", layer_index=0, num_vectors=3)}


# weights
@idiom("pos")
def weights(model, probe):
    return {name: getattr(model, name) for name in ("W_E", "W_pos", "W_E_pos", "W_U", "b_U", "W_Q", "W_K", "W_V",
                                                   "W_O", "b_Q", "b_K", "b_V", "b_O")} | {
        "block_W_Q": model.blocks[0].attn.W_Q, "block_W_O": model.blocks[0].attn.W_O}


@idiom("mlp", "mlp_bias")
def mlp_weights(model, probe):
    return {name: getattr(model, name) for name in ("W_in", "b_in", "W_out", "b_out")} | {
        "block_W_in": model.blocks[0].mlp.W_in}


@idiom("pos")
def factored_circuits(model, probe):
    """ARENA chapter 1.2, section 4: OV and QK circuits as FactoredMatrix, full circuits, positional attention,
    singular values and composition scores."""
    L = model.cfg.n_layers - 1
    W_V, W_O = model.W_V[L, 1], model.W_O[L, 1]
    full_OV = model.W_E @ FactoredMatrix(W_V, W_O) @ model.W_U
    pos_scores = model.W_pos @ model.W_Q[0, 1] @ model.W_K[0, 1].T @ model.W_pos.T
    ov = model.OV[L, 1]
    return {"OV": model.OV, "QK": model.QK, "OV_head": ov, "full_OV_diag": full_OV.AB.diag(), "pos_scores": pos_scores,
            "S": ov.svd()[1], "norm": ov.norm(), "eigenvalues": ov.eigenvalues.abs().sort().values,
            "composition_Q": model.all_composition_scores("Q"), "composition_K": model.all_composition_scores("K"),
            "composition_V": model.all_composition_scores("V"), "labels": model.all_head_labels}


@idiom()
def residual_directions_and_biases(model, probe):
    ids = torch.tensor([model.to_single_token(probe.answer), model.to_single_token(probe.wrong)])
    return {"one": model.tokens_to_residual_directions(probe.answer),
            "by_id": model.tokens_to_residual_directions(int(ids[0])),
            "many": model.tokens_to_residual_directions(ids),
            "bias": model.accumulated_bias(model.cfg.n_layers), "bias_mlp_input": model.accumulated_bias(0, True),
            "bias_no_mlp": model.accumulated_bias(1, include_mlp_biases=False)}


CONFIG_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab", "d_vocab_out", "act_fn",
                 "normalization_type", "attn_only", "positional_embedding_type", "default_prepend_bos",
                 "n_key_value_heads", "device", "dtype", "n_devices", "use_attn_result", "use_split_qkv_input",
                 "use_hook_mlp_in", "use_attn_in", "final_rms", "gated_mlp", "attention_dir", "eps",
                 "use_attn_scale", "output_logits_soft_cap")
"""Config attributes TransformerLens code reads that must agree. (Not compared: d_mlp, which the native bridge
sets to 4·d_model on an attention-only model; tokenizer_prepends_bos, which describes the bridge's re-loaded
tokenizer (it adds a BOS that to_tokens then strips) rather than the model; and model_name.)"""


@idiom()
def config(model, probe):
    return {name: getattr(model.cfg, name) for name in CONFIG_FIELDS} | {"device": str(model.cfg.device)}
