"""The text pipeline, tokenizers and synthetic tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.data.text import (
    Batches,
    DataConfig,
    build_text_data,
    cache_dir,
    load_text,
    pack,
    repeated_segments,
    repeated_sequence,
    split_rows,
    stdlib_files,
)
from workbench.data.tokenizer import EOS, byte_tokenizer, eos_id, train_bpe
from workbench.errors import ConfigError, InputError, OfflineError


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)
    (folder / "sub" / "code.py").write_text("def f(x):\n    return x * 2\n" * 30)
    (folder / "image.png").write_bytes(b"\x89PNG not text")
    return folder


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "def f(x):\n\treturn 'héllo ✓'" + EOS
    ids = tok.encode(text).ids
    assert ids[:3] == [ord("d"), ord("e"), ord("f")] and ids[-1] == 256 == eos_id(tok)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.get_vocab_size() == 257


def test_bpe_trains_locally_and_round_trips(corpus):
    texts = [p.read_text() for p in sorted(corpus.rglob("*.txt"))]
    tok = train_bpe(texts, vocab_size=300)
    assert 257 < tok.get_vocab_size() <= 300 and eos_id(tok) == tok.get_vocab_size() - 1
    ids = tok.encode("the quick brown fox").ids
    assert len(ids) < len("the quick brown fox")  # merges were learned
    assert tok.decode(ids) == "the quick brown fox"


def test_local_folder_loads_text_files_only(corpus):
    ds = load_text(str(corpus))
    assert len(ds) == 7  # 6 .txt + 1 .py; the .png is skipped
    assert any("def f(x)" in t for t in ds["text"])


def test_stdlib_corpus_is_found_without_tests():
    files = stdlib_files()
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
    assert not any("test" in f.parts or "site-packages" in f.parts for f in files)


def test_pack_joins_documents_with_eos_and_drops_the_ragged_tail():
    rows = pack([[1, 2, 3], [4, 5]], eos=9, n_ctx=3)
    assert rows.tolist() == [[1, 2, 3], [9, 4, 5]]  # the final EOS does not fill a row


def test_split_is_deterministic_and_disjoint():
    rows = np.arange(200).reshape(100, 2)
    tr1, va1 = split_rows(rows, 0.1, seed=3)
    tr2, va2 = split_rows(rows, 0.1, seed=3)
    assert np.array_equal(tr1, tr2) and np.array_equal(va1, va2)
    assert len(va1) == 10 and not set(tr1[:, 0]) & set(va1[:, 0])


def test_text_data_is_cached(corpus):
    cfg = DataConfig(text=str(corpus), val_fraction=0.1)
    before = set(cache_dir().glob("packed-*.safetensors"))  # the cache is shared by the whole session
    first = build_text_data(cfg, 16, byte_tokenizer())
    assert len(set(cache_dir().glob("packed-*.safetensors")) - before) == 1
    again = build_text_data(cfg, 16, byte_tokenizer())
    assert len(set(cache_dir().glob("packed-*.safetensors")) - before) == 1
    assert np.array_equal(first.train, again.train) and np.array_equal(first.val, again.val)
    assert first.train.shape[1] == 16 and len(first.val) >= 1


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(OfflineError, match="offline"):
        load_text("hub:roneneldan/TinyStories")


def test_missing_text_source_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="neither"):
        load_text(str(tmp_path / "nope"))


def test_repeated_segments_repeat_at_varying_offsets():
    rows = repeated_segments(64, 128, 256, 4, 32, torch.Generator().manual_seed(0))
    assert rows.shape == (64, 128) and rows.max() < 256
    offsets = set()
    for row in rows.tolist():
        for s in range(8, 128):  # offsets at which an 8-gram ending at s recurs
            for d in range(8, s - 7):
                if row[s - 8 : s] == row[s - 8 - d : s - d]:
                    offsets.add(d)
    assert len(offsets) > 20  # copies sit at many different distances, not one fixed offset
    again = repeated_segments(64, 128, 256, 4, 32, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)


def test_repeated_sequence_is_a_sequence_repeated_once():
    seq = repeated_sequence(4, 10, 50, seed=1, prefix=7)
    assert seq.shape == (4, 21) and (seq[:, 0] == 7).all()
    assert torch.equal(seq[:, 1:11], seq[:, 11:])


def test_batches_depend_only_on_seed_and_step(corpus):
    cfg = DataConfig(text=str(corpus), synthetic_fraction=0.5, val_fraction=0.1)
    text = build_text_data(cfg, 16, byte_tokenizer())
    a = Batches(cfg, 16, 8, text, synthetic_vocab=256)
    b = Batches(cfg, 16, 8, text, synthetic_vocab=256)
    assert torch.equal(a.train(5), b.train(5)) and not torch.equal(a.train(5), a.train(6))
    assert a.train(0).shape == (8, 16)
    val = a.validation(4)
    assert set(val) == {"text", "synthetic"} and torch.equal(val["synthetic"], b.validation(4)["synthetic"])


def test_synthetic_rows_can_come_from_the_text_itself(corpus):
    cfg = DataConfig(text=str(corpus), synthetic_fraction=0.75, val_fraction=0.1, synthetic_uniform=1,
                     synthetic_unigram=1, synthetic_text=2)
    text = build_text_data(cfg, 64, byte_tokenizer())
    batches = Batches(cfg, 64, 16, text, synthetic_vocab=256)
    rows = batches.train(3)
    assert torch.equal(rows, Batches(cfg, 64, 16, text, synthetic_vocab=256).train(3))  # a function of (seed, step)
    uniform, unigram, from_text = rows[4:7], rows[7:10], rows[10:]  # 4 text rows, then 12 synthetic: 3, 3, 6
    in_text = set(np.unique(text.train).tolist())
    assert (uniform >= 128).any()  # bytes the corpus never uses
    assert set(unigram.unique().tolist()) <= in_text and set(from_text.unique().tolist()) <= in_text
    assert (unigram == ord(" ")).float().mean() > 0.1  # drawn at the text's frequencies: many spaces
    for row in from_text.tolist():  # real text in which some 4-gram recurs
        grams = [tuple(row[i:i + 4]) for i in range(61)]
        assert len(set(grams)) < len(grams)
    val = batches.validation(4)
    assert set(val) == {"text", "synthetic", "synthetic_uniform", "synthetic_unigram", "synthetic_text"}
    assert torch.equal(val["synthetic_text"], batches.validation(4)["synthetic_text"])


def test_default_synthetic_rows_are_uniform_random_segments(corpus):
    cfg = DataConfig(text=str(corpus), synthetic_fraction=1.0)
    assert not cfg.uses_text and cfg.synthetic_shares == {"uniform": 1.0, "unigram": 0.0, "text": 0.0}
    rows = Batches(cfg, 32, 4, None, synthetic_vocab=256).train(2)
    gen = torch.Generator().manual_seed(2)  # seed 0, step 2
    assert torch.equal(rows, repeated_segments(4, 32, 256, 4, 32, gen))
    assert DataConfig(text=str(corpus), synthetic_fraction=1.0, synthetic_uniform=0.5, synthetic_text=0.5).uses_text
    with pytest.raises(ConfigError, match=r"synthetic_uniform \+ synthetic_unigram \+ synthetic_text must be positive"):
        DataConfig(synthetic_uniform=0)


@pytest.mark.parametrize("field,value", [("tokenizer", "wordpiece"), ("val_fraction", 0.0),
                                         ("synthetic_fraction", 1.5), ("bpe_vocab_size", 100),
                                         ("synthetic_text", -0.5)])
def test_bad_data_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"DataConfig.{field}"):
        DataConfig(**{field: value})


def test_two_saved_datasets_with_the_same_splits_never_share_a_token_cache(tmp_path):
    """The cache key of a save_to_disk folder covers every file in it, not just the split names a
    DatasetDict's top-level JSON lists, so different text is never served from another's cache."""
    import datasets

    from workbench.data.text import _source_fingerprint

    for name, text in (("a", "first text " * 50), ("b", "second text " * 50)):
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [text]})}).save_to_disk(str(tmp_path / name))
    assert _source_fingerprint(str(tmp_path / "a"), None) != _source_fingerprint(str(tmp_path / "b"), None)
