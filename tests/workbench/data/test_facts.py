"""The synthetic knowledge base: deterministic, multi-token subjects, held-out pairs that never
appear in training, and every template seen with other subjects."""

from __future__ import annotations

import pytest

from workbench.data.facts import RELATIONS, KnowledgeBase
from workbench.data.text import DataConfig, build_tokenizer
from workbench.data.tokenizer import TextCodec
from workbench.errors import ConfigError

KB = KnowledgeBase(n_subjects=60)


def test_deterministic_for_a_seed_and_different_across_seeds():
    assert KnowledgeBase(n_subjects=60).documents() == KB.documents()
    assert KnowledgeBase(n_subjects=60, seed=1).subjects != KB.subjects
    assert len(set(KB.subjects)) == 60


def test_held_out_pairs_never_appear_in_training_but_their_templates_do():
    text = "\n".join(KB.documents())
    for fact in KB.prompts("heldout"):
        assert fact.prompt not in text  # this subject is never seen with this phrasing
        template = RELATIONS[fact.relation][1][fact.template]
        prefix, _, suffix = template.partition("{s}")
        assert any(prefix in doc and suffix in doc for doc in KB.documents() if fact.subject not in doc)
    for fact in KB.prompts("train"):
        assert fact.prompt + fact.target in text


def test_documents_include_biographies_relation_first_phrasings_and_filler():
    docs = KB.documents()
    assert any(d.startswith("This is about") and d.count(".") >= 4 for d in docs)
    assert any(d.startswith("The home town of") for d in docs)  # relation before subject
    assert any(d.startswith("It rained") or "river" in d for d in docs)


def test_subjects_are_split_by_the_tokenizer_and_targets_are_single_tokens():
    codec = TextCodec(build_tokenizer(DataConfig(text="facts", tokenizer="bpe", bpe_vocab_size=1024)))
    kb = KnowledgeBase()
    assert all(len(codec.encode(" " + s)) >= 2 for s in kb.subjects)  # names are split into pieces
    assert all(len(codec.encode(" " + a)) == 1 for r in kb.relations for a in RELATIONS[r][0])


def test_bad_settings():
    with pytest.raises(ConfigError, match="relations"):
        KnowledgeBase(relations=("shoe size",))
    with pytest.raises(ConfigError, match="n_subjects"):
        KnowledgeBase(n_subjects=3)
