"""The induction-head analysis: scores agree with independent computations and TransformerLens,
verdicts on the shipped models, labels earned on every kind of sequence (a Llama trained outside
the workbench on skewed code tokens), the phase change, the TransformerBridge path and bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformer_lens.head_detector import (
    compute_head_attention_similarity_score,
    detect_head,
    get_induction_head_detection_pattern,
)

import workbench
from analyses.induction_heads import (
    ATTENTION_SCORES,
    KINDS,
    InductionConfig,
    InductionResult,
    KindResult,
    compute,
    figures,
    kind_labels,
)
from tests.conftest import NoAttention, tiny_config
from workbench.cache.rows import held_out_text, text_probe_tokens
from workbench.compute.attention_scores import (
    duplicate_token_score,
    induction_score,
    prefix_matching_score,
    previous_token_score,
)
from workbench.compute.qk_ov import copying_score, folded_weights, ov_circuit
from workbench.data.text import stdlib_files
from workbench.errors import ConfigError, InputError
from workbench.report.pipeline import run_analysis, write_report
from workbench.report.plotting import caption_of
from workbench.report.widgets import Widget

SMALL = InductionConfig(seq_len=8, prefix_seq_len=5, n_sequences=4, icl_early=2, icl_late=20)


def _patterns(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    return [cache[f"blocks.{l}.attn.hook_pattern"] for l in range(model.cfg.n_layers)]


def _permutation_repeat(batch: int, seq_len: int, bos: int, seed: int = 0) -> torch.Tensor:
    """BOS + a random permutation (no token twice) repeated once: no accidental repeats."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.stack([torch.randperm(256, generator=gen)[:seq_len] for _ in range(batch)])
    return torch.cat([torch.full((batch, 1), bos), half, half], dim=1)


# -- the scores are what they say ---------------------------------------------------------------------
def test_induction_score_equals_a_direct_loop_and_transformer_lens(attn_model):
    L = 9
    tokens = _permutation_repeat(3, L, bos=256)
    for pattern in _patterns(attn_model, tokens):
        B, H, S, _ = pattern.shape
        direct = torch.zeros(H)
        for h in range(H):
            values = [pattern[b, h, s, s - L + 1] for b in range(B) for s in range(1 + L, S)]
            direct[h] = torch.stack(values).mean()
        ours = induction_score(pattern, L, prefix=1)
        assert torch.allclose(ours, direct, atol=1e-6)
        # TransformerLens's "mul" score divides by all S query rows; ours averages the L rows that can induct
        tl = torch.tensor([[compute_head_attention_similarity_score(
            pattern[b, h], get_induction_head_detection_pattern(tokens[b:b + 1]), exclude_bos=False,
            exclude_current_token=False, error_measure="mul") for h in range(H)] for b in range(B)]).mean(0)
        assert torch.allclose(ours * L / S, tl, atol=1e-5)
        # with one earlier copy and no accidental repeats, prefix matching is the induction score
        assert torch.allclose(prefix_matching_score(pattern, tokens, 1 + L), ours, atol=1e-6)


def test_head_detector_agrees_on_a_transformer_bridge(tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    text = "ABCDEFGHIJKLMNOPQRST"  # none of these letters was merged by the tokenizer: one token each
    L = len(text)
    tokens = bridge.to_tokens(text + text)
    assert tokens.shape == (1, 2 * L + 1) and tokens[0, 0] == bridge.tokenizer.bos_token_id
    patterns = torch.stack(_patterns(bridge, tokens))  # [L, 1, H, S, S]
    S = tokens.shape[1]
    checks = {"induction_head": [induction_score(p, L, prefix=1) * L / S for p in patterns],
              "previous_token_head": [previous_token_score(p) * (S - 1) / S for p in patterns],
              "duplicate_token_head": [duplicate_token_score(p, L, prefix=1) * L / S for p in patterns]}
    for name, ours in checks.items():
        tl = detect_head(bridge, text + text, name)
        assert torch.allclose(torch.stack(ours).float(), tl.float(), atol=1e-5), name


def test_copying_score_is_plus_one_for_a_copying_head_and_minus_one_for_a_suppressing_one():
    model = workbench.Transformer(tiny_config(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=16,
                                              normalization_type=None)).eval()
    with torch.no_grad():
        model.embed.W_E.copy_(torch.eye(16))  # tokens are the basis
        model.unembed.W_U.copy_(torch.eye(16))
        attn = model.blocks[0].attn
        basis = torch.eye(16)[:, :8]  # OV = projector onto the first 8 directions (x +1 or x -1)
        attn.W_V.copy_(torch.stack([basis, basis]))
        attn.W_O.copy_(torch.stack([basis.T, -basis.T]))
    assert torch.allclose(copying_score(ov_circuit(folded_weights(model), 0)), torch.tensor([1.0, -1.0]), atol=1e-5)


# -- the kinds of sequence ----------------------------------------------------------------------------
def test_text_probes_repeat_text_and_never_cross_a_document_boundary(attn_model):
    eos = 256
    text = torch.tensor([[ord(c) for c in "the cat sat on the mat and the dog sat too"] + [eos] * 6,
                         [ord(c) for c in "a b"] + [eos] + [ord("x")] * 44])
    passage, prefix = text_probe_tokens(attn_model, "passage", text, 6, 2, 64, seed=0, prepend_bos=True)
    assert prefix == 1 and passage.shape == (64, 13) and (passage[:, 0] == eos).all()
    assert torch.equal(passage[:, 1:7], passage[:, 7:]) and not (passage[:, 1:] == eos).any()
    windows = {bytes(row[1:7].tolist()).decode() for row in passage}
    assert windows <= {"the cat sat on the mat and the dog sat too"[i:i + 6] for i in range(37)} | {"x" * 6}
    freq, _ = text_probe_tokens(attn_model, "text-distribution", text, 10, 2, 64, seed=0, prepend_bos=False)
    assert torch.equal(freq[:, :10], freq[:, 10:]) and set(freq.unique().tolist()) <= set(text[text != eos].tolist())
    with pytest.raises(InputError, match="no run of 3 tokens"):
        text_probe_tokens(attn_model, "passage", torch.tensor([[97, 98, eos, 99, 100]]), 3, 2, 4, seed=0,
                          prepend_bos=False)


@pytest.mark.slow  # trains a model on text (about 7 s)
def test_held_out_text_is_the_models_own_validation_split(attn_model, tmp_path):
    rows, source = held_out_text(attn_model)  # no training record: the standard library's source
    assert rows.shape[1] == 24 and "standard library" in source
    shipped = workbench.load("attn-only-1l", device="cpu")
    rows, source = held_out_text(shipped, n_rows=8)
    assert rows.shape == (8, 128) and source == "held-out validation text of 'stdlib'"


def test_a_model_without_a_tokenizer_gets_the_random_kind_only():
    r = compute(workbench.Transformer(tiny_config()).eval(), SMALL)
    assert list(r.kinds) == ["random tokens"] and "tokenizer" in r.kinds_note
    assert "attention on a repeated text passage" not in figures(r)


# -- the shipped models -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def result_2l():
    return compute(workbench.load("attn-only-2l", device="cpu"), InductionConfig())


def test_attn_only_2l_has_layer_1_induction_heads_backed_by_ablation(result_2l):
    r = result_2l
    induction = r.heads_labelled("induction")
    assert any(h.startswith("L1") for h in induction)
    assert r.joint_heads == tuple(induction)
    assert r.joint_ablation["mean repeated"] >= 1.0  # nats per token, all induction heads together
    assert r.joint_ablation["zero repeated"] >= 1.0
    for key, arr in r.ablation.items():  # each head's own effect is reported, in both modes
        assert arr.shape == (2, 4) and np.isfinite(arr).all(), key
    for head in induction:
        l, h = int(head[1]), int(head[3])
        assert r.scores["induction"][l, h] >= r.config.induction_threshold
        assert r.ablation["mean repeated"][l, h] - r.ablation["mean first"][l, h] >= r.config.ablation_threshold
    assert r.heads_labelled("previous-token") and all(h.startswith("L0") for h in r.heads_labelled("previous-token"))


def test_attn_only_2l_phase_change_is_where_the_repeated_loss_drops(result_2l):
    c = result_2l.curves
    assert c is not None and c.steps[0] == 0 and len(c.steps) >= 10
    assert c.phase_change is not None and c.loss_drop is not None
    start = c.steps.index(c.phase_change[0])
    interval = c.phase_change[1] - c.phase_change[0]
    assert abs(c.loss_drop[0] - c.phase_change[0]) <= interval, (c.phase_change, c.loss_drop)
    assert c.induction_NLH[:start].max() < 0.3 < c.induction_NLH[-1].max()  # before the rise: none; after: some
    assert c.repeated_half_loss[-1] < c.repeated_half_loss[0] - 1.0
    assert np.isfinite(c.icl_score).all() and c.icl_data == "text validation rows"
    assert list(c.induction_by_kind) == list(KINDS)
    for kind, curve in c.induction_by_kind.items():  # every kind goes through the same phase change
        assert max(curve[:start]) < 0.3 and curve[-1] >= 0.4, (kind, curve)


def test_attn_only_2l_induction_works_on_every_kind_of_sequence(result_2l):
    r = result_2l
    assert r.works_on == list(KINDS) and r.kinds_note == ""
    assert "work on random tokens, text-frequency tokens, text passage" in r.kinds_verdict()
    assert all(r.label_kinds(h, label) == list(KINDS) for label in ("induction", "previous-token")
               for h in r.heads_labelled(label))  # both heads of the circuit, on every kind
    for kind, k in r.kinds.items():
        assert k.induction_LH[1].max() >= 0.4 and k.ablation["mean repeated"] >= 1.0, kind
    assert r.kinds["text passage"].source.startswith("passages of held-out validation text")
    assert r.metrics()["induction_works_on"] == list(KINDS)


@pytest.mark.slow  # runs the study over the shipped checkpoints (about 7 s)
def test_attn_only_1l_has_no_induction_head_and_no_phase_change():
    r = compute(workbench.load("attn-only-1l", device="cpu"), InductionConfig())
    assert r.heads_labelled("induction") == []
    assert r.curves is not None and r.curves.phase_change is None
    assert "no phase change" in r.phase_note and "no induction head" in r.headlines()[0]
    assert r.works_on == [] and "works on no kind of sequence" in r.kinds_verdict()
    assert all(k.induction_LH.max() < 0.2 for k in r.kinds.values())


def test_report_has_every_plot(result_2l, tmp_path):
    figs = figures(result_2l)
    for name in ("verdict", "head scores", "head scores by kind of sequence", "ablation effects",
                 "attention of the top heads", "loss by position",
                 "induction by kind of sequence", "induction score by kind of sequence",
                 "attention on a repeated text passage", "phase change: induction score",
                 "phase change: induction by kind of sequence", "phase change: in-context learning",
                 "phase change: loss on repeated sequences"):
        assert name in figs, name
    metrics = result_2l.metrics()
    assert metrics["induction_heads"] and metrics["phase_change_interval"]
    viewer = figs["attention of the top heads"]
    assert isinstance(viewer, Widget) and len(result_2l.pattern_heads) >= 4
    assert all(f.caption if isinstance(f, Widget) else caption_of(f) for f in figs.values())  # every one captioned


# -- labels from every kind of sequence ---------------------------------------------------------------
def _kind(kind: str, induction: list[float], previous: list[float], repeated: list[float]) -> KindResult:
    """A KindResult of a 2-layer, 2-head model from score tables: prefix matching equals the induction
    score, mean ablation costs the first copy nothing and the second copy `repeated`."""
    scores = {s: np.zeros((2, 2)) for s in ATTENTION_SCORES}
    scores["induction"] = scores["prefix matching"] = np.array(induction).reshape(2, 2)
    scores["previous token"] = np.array(previous).reshape(2, 2)
    ablation_LH = {"mean first": np.zeros((2, 2)), "mean repeated": np.array(repeated).reshape(2, 2)}
    return KindResult(kind, "a constructed table", scores, ablation_LH, 5.0, 1.0,
                      {"mean first": 0.0, "mean repeated": float(max(repeated))},
                      kind_labels(scores, ablation_LH, InductionConfig()))


def _result(kinds: dict[str, KindResult]) -> InductionResult:
    """An InductionResult around `kinds` (random tokens first), the rest filled in plausibly."""
    rand = kinds["random tokens"]
    ablation = {f"{m} {half}": rand.ablation_LH[f"mean {half}"]
                for m in ("zero", "mean") for half in ("first", "repeated")}
    S = 9
    return InductionResult(
        name="constructed", config=InductionConfig(), scores={**rand.scores, "copying": np.full((2, 2), 0.9)},
        ablation=ablation, clean_first_loss=5.0, clean_repeated_loss=4.0, joint_heads=("L1H1",),
        joint_ablation={"zero first": 0.0, "zero repeated": 0.1, "mean first": 0.0, "mean repeated": 0.1},
        loss_by_position={"clean": np.ones(S - 1), "ablated": np.ones(S - 1)}, tokens=tuple("abcdabcda"),
        patterns_NSS=np.full((2, S, S), 1 / S), pattern_heads=("L1H1", "L0H0"), prefix=1, curves=None,
        phase_note="no checkpoints", kinds=kinds, kinds_note="", passage_tokens=(), passage_patterns_NSS=None)


def test_labels_come_from_every_kind_with_the_same_thresholds():
    # the numbers: L1H1 does induction on text (0.84) and misses on uniform tokens (0.29, just under
    # 0.3); the previous-token head L0H0 scores 0.64 on text and 0.2 on uniform tokens
    kinds = {"random tokens": _kind("random tokens", [0, 0, 0, 0.29], [0.2, 0, 0, 0], [0, 0, 0, 0.6]),
             "text-frequency tokens": _kind("text-frequency tokens", [0, 0, 0, 0.84], [0.64, 0, 0, 0], [0, 0, 0, 7.4]),
             "text passage": _kind("text passage", [0, 0, 0, 0.64], [0.6, 0, 0, 0], [0, 0, 0, 2.1])}
    r = _result(kinds)
    assert r.heads_labelled("induction") == ["L1H1"] and r.heads_labelled("previous-token") == ["L0H0"]
    assert r.label_kinds("L1H1", "induction") == ["text-frequency tokens", "text passage"]
    assert r.labels["L1H1"] == ("induction", "copying") and kinds["random tokens"].labels["L1H1"] == ()
    assert r.works_on == ["text-frequency tokens", "text passage"]
    verdict = r.kinds_verdict()
    assert "no kind" not in verdict and "work on text-frequency tokens, text passage; not on random tokens" in verdict
    assert r.headlines()[0].startswith("induction heads: L1H1 on text-frequency tokens, text passage (text-frequency")
    assert "previous-token heads: L0H0 on text-frequency tokens, text passage" in r.headlines()
    metrics = json.loads(json.dumps(r.metrics(), allow_nan=False))
    assert metrics["induction_heads"] == ["L1H1"] and metrics["induction_works_on"] == r.works_on
    assert metrics["induction_heads_kinds"] == {"L1H1": ["text-frequency tokens", "text passage"]}
    assert metrics["random_tokens_induction_heads"] == [] and metrics["text_passage_induction_heads"] == ["L1H1"]
    table = figures(r)["verdict"].data[0].cells.values[1]
    assert table[3].startswith("induction (on text-frequency tokens, text passage), copying")
    # the thresholds mean the same on every kind: at 0.3 a head is labelled, on random tokens too
    at_threshold = _result({"random tokens": _kind("random tokens", [0, 0, 0, 0.3], [0.4, 0, 0, 0], [0, 0, 0, 0.1])})
    assert at_threshold.works_on == ["random tokens"] and at_threshold.heads_labelled("previous-token") == ["L0H0"]
    # every row's verdict follows its labels: a kind with no induction head never counts as working
    nowhere = _result({kind: _kind(kind, [0, 0, 0, 0.29], [0, 0, 0, 0], [0, 0, 0, 5.0]) for kind in KINDS})
    assert nowhere.works_on == [] and "works on no kind of sequence" in nowhere.kinds_verdict()
    assert nowhere.headlines()[0].startswith("no induction head on any kind of sequence; the highest induction score")


STEPS, VOCAB = 700, 300


@pytest.fixture(scope="module")
def llama_on_code(tmp_path_factory):
    """A 2-layer, 4-head Llama and a 300-token byte-level BPE, trained outside the workbench by a plain
    AdamW loop on standard-library code with repeated spans: each row is a window of code of random
    length 5-23, repeated to fill the row. Code's tokens are skewed: it never sees the bytes that do not
    occur in code (more than half of the ids), so a uniform draw over the vocabulary is mostly tokens
    it saw rarely or never. Saved with save_pretrained, no download; about 30 s on one CPU thread."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("llama-on-code")
    texts = [path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files()[:15]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    code = torch.tensor([i for text in texts for i in tok.encode(text).ids])
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    batch, row = 32, 47  # each row after the BOS
    for _ in range(STEPS):
        rows = []
        for start, span in zip(torch.randint(0, len(code) - row, (batch,), generator=gen).tolist(),
                               torch.randint(5, 24, (batch,), generator=gen).tolist()):
            rows.append(code[start: start + span].repeat(row // span + 1)[:row])
        x = torch.cat([torch.zeros(batch, 1, dtype=torch.long), torch.stack(rows)], dim=1)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                         eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_llama_trained_on_skewed_code_tokens_has_its_induction_head_labelled(llama_on_code):
    model = workbench.load(f"hf:{llama_on_code}", device="cpu")
    r = compute(model, InductionConfig(seq_len=20, prefix_seq_len=12, n_sequences=16))
    text, uniform = r.kinds["text-frequency tokens"], r.kinds["random tokens"]
    # the behaviour: on tokens at code's frequencies the second copy is nearly free, thanks to one layer-1 head
    head = r.heads[int(text.induction_LH.argmax())]
    l, h = r.at(head)
    assert l == 1 and text.induction_LH[l, h] >= 0.5
    assert text.first_loss - text.repeated_loss >= 3.0
    assert text.ablation_LH["mean repeated"][l, h] - text.ablation_LH["mean first"][l, h] >= 0.5
    # ... which uniform tokens over the whole vocabulary, mostly ones it rarely or never saw, show much less
    assert uniform.induction_LH.max() <= text.induction_LH.max() - 0.2
    # the verdict: an induction head, on the kinds where it works, and a verdict that agrees with its rows
    assert head in r.heads_labelled("induction") and "text-frequency tokens" in r.label_kinds(head, "induction")
    assert "text-frequency tokens" in r.works_on and "no kind" not in r.kinds_verdict()
    assert r.headlines()[0].startswith("induction heads: ") and f"{head} on " in r.headlines()[0]
    prev = r.heads_labelled("previous-token")
    assert prev and all(p.startswith("L0") for p in prev)  # the head it composes with
    metrics = json.loads(json.dumps(r.metrics(), allow_nan=False))
    assert "text-frequency tokens" in metrics["induction_heads_kinds"][head]
    assert head in metrics["text_frequency_tokens_induction_heads"]


# -- other models and bad input -----------------------------------------------------------------------
def test_runs_on_a_transformer_bridge_without_a_phase_change_section(tiny_gpt2):
    bridge = workbench.load(f"hf:{tiny_gpt2}", device="cpu")
    r = compute(bridge, replace(SMALL, seq_len=20, prefix_seq_len=12))
    assert r.scores["induction"].shape == (2, 2) and r.curves is None
    assert "not loaded from a workbench model folder" in r.phase_note
    assert list(r.kinds) == list(KINDS) and "standard library" in r.kinds["text passage"].source
    assert r.tokens[0] == "<|endoftext|>"
    assert "phase change: induction score" not in figures(r)


def test_folder_without_checkpoints_gets_everything_else_and_a_note(attn_model, tmp_path):
    workbench.save_model(attn_model, tmp_path / "m")
    section = run_analysis("induction-heads", workbench.load(tmp_path / "m", device="cpu"), SMALL)
    assert "has 0 training checkpoint(s)" in section.metrics["phase_change_note"]
    assert "head scores" in section.figures and "loss by position" in section.figures
    assert not any(name.startswith("phase change") for name in section.figures)
    assert any("checkpoint" in line for line in section.headlines)
    out = write_report(tmp_path / "r", [section])
    assert any("training checkpoint" in page.read_text() for page in out.rglob("*.html"))


def test_is_deterministic(attn_model):
    a, b = compute(attn_model, SMALL), compute(attn_model, SMALL)
    for key in a.scores:
        np.testing.assert_array_equal(a.scores[key], b.scores[key])
    np.testing.assert_array_equal(a.ablation["mean repeated"], b.ablation["mean repeated"])


def test_too_little_context_is_a_clear_error(attn_model):  # n_ctx 24
    with pytest.raises(InputError, match="at most 11"):
        compute(attn_model, replace(SMALL, seq_len=40))
    short = workbench.Transformer(tiny_config(n_ctx=4)).eval()
    with pytest.raises(InputError, match="too little context"):
        compute(short, replace(SMALL, seq_len=2))


def test_a_model_without_attention_is_a_clear_error():
    with pytest.raises(InputError, match="no attention layers"):
        compute(NoAttention(), SMALL)


@pytest.mark.parametrize("bad", [dict(seq_len=1), dict(n_sequences=0), dict(induction_threshold=0.0),
                                 dict(ablation_threshold=-1.0), dict(icl_early=50, icl_late=20)])
def test_nonsense_config_is_rejected(bad):
    with pytest.raises(ConfigError, match=next(iter(bad)).split("_")[0]):
        InductionConfig(**bad)
