"""A synthetic knowledge base for fact-recall studies: made-up people, their attributes, and the text
a model learns them from. Deterministic for a seed; no network.

- Subjects have two-part names of random syllables ("Tavo Rimeka"), so tokenizers split them.
- Each relation (home city, job, instrument, colour, language) has its attributes and three
  phrasing templates, one of which puts the relation before the subject; no template's prompt
  contains another's, so a held-out phrasing is never seen inside a trained one.
- Every subject has one held-out (relation, template) pair. The template is seen in training with
  other subjects, never with this one: recalling it tests a fact, not a memorised string.
- Training documents are single statements, biography passages stating several of one subject's
  facts in random order (which rewards building up the subject's representation), and filler
  sentences of ordinary text.

`KnowledgeBase.prompts(split)` gives (prompt, target) pairs ending right before the attribute;
`DataConfig(text="facts")` trains on `KnowledgeBase().documents()`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property

from workbench.config import check_types
from workbench.errors import check_field

SYLLABLES = ("ka", "lo", "mi", "ru", "te", "va", "no", "si", "be", "da", "fu", "gi", "ho", "ze", "pa", "re", "to",
             "ma", "ne", "li", "so", "ba", "ki", "du", "ve", "ro", "sa", "mo", "ti", "na")

RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # relation: (attributes, templates with {s} for the subject; the attribute follows each template)
    "city": (("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Dublin", "Quito", "Seoul"),
             ("{s} lives in", "The home town of {s} is", "{s} has a house in the city of")),
    "job": (("baker", "doctor", "farmer", "pilot", "teacher", "painter", "lawyer", "sailor"),
            ("{s} works as a", "By trade, {s} is a", "The job of {s} is")),
    "instrument": (("piano", "violin", "guitar", "drums", "flute", "cello", "harp", "trumpet"),
                   ("{s} plays the", "The instrument that {s} loves is the", "In the band, {s} is on the")),
    "color": (("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
              ("{s} likes the colour", "The favourite colour of {s} is", "{s} always wears")),
    "language": (("French", "Spanish", "German", "Arabic", "Hindi", "Swahili", "Polish", "Greek"),
                 ("{s} speaks", "The first language of {s} is", "At home, {s} talks in")),
}

FILLER = ("The river ran slowly past the old mill.", "It rained for most of the afternoon.",
          "A small dog waited by the door.", "The market opens early on Saturdays.",
          "Nobody remembered who had planted the tree.", "The train was late again this morning.",
          "She folded the letter and put it away.", "The bread was still warm when it arrived.",
          "They talked about the weather for a while.", "The lamp in the window stayed on all night.")


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, template) prompt and the attribute that completes it."""

    subject: str
    relation: str
    template: int
    prompt: str
    target: str
    """The attribute with its leading space, e.g. ' Paris'."""


@dataclass(frozen=True)
class KnowledgeBase:
    """Settings of the knowledge base; the facts themselves are derived from them."""

    n_subjects: int = 400
    """Number of made-up people."""
    relations: tuple[str, ...] = ("city", "job", "instrument", "color")
    """Relations every subject has (from RELATIONS)."""
    bios_per_subject: int = 6
    """Biography passages per subject (several facts each, random order)."""
    statements_per_fact: int = 6
    """Single-sentence statements per (subject, relation), cycling through its allowed templates."""
    filler_fraction: float = 0.2
    """Share of documents that are filler text."""
    seed: int = 0
    """Seed of names, facts, held-out pairs and documents."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "KnowledgeBase"
        check_field(isinstance(self.n_subjects, int) and 10 <= self.n_subjects <= 20_000, own, "n_subjects",
                    self.n_subjects, "an integer in [10, 20000]")
        check_field(len(self.relations) > 0 and all(r in RELATIONS for r in self.relations), own, "relations",
                    self.relations, f"a non-empty subset of {sorted(RELATIONS)}")
        check_field(0 <= self.filler_fraction < 1, own, "filler_fraction", self.filler_fraction, "in [0, 1)")
        check_field(self.statements_per_fact >= 3, own, "statements_per_fact", self.statements_per_fact,
                    "at least 3 (so that every allowed template is stated)")

    @cached_property
    def subjects(self) -> tuple[str, ...]:
        rng = random.Random(self.seed)
        names: set[str] = set()
        out = []
        while len(out) < self.n_subjects:
            first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
            last = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
            name = f"{first} {last}"
            if name not in names:
                names.add(name)
                out.append(name)
        return tuple(out)

    @cached_property
    def facts(self) -> dict[tuple[str, str], str]:
        """(subject, relation) -> attribute."""
        rng = random.Random(self.seed + 1)
        return {(s, r): rng.choice(RELATIONS[r][0]) for s in self.subjects for r in self.relations}

    @cached_property
    def held_out(self) -> dict[str, tuple[str, int]]:
        """subject -> the (relation, template) never shown in training."""
        rng = random.Random(self.seed + 2)
        return {s: (rng.choice(self.relations), rng.randrange(3)) for s in self.subjects}

    def _statement(self, subject: str, relation: str, template: int) -> str:
        return f"{RELATIONS[relation][1][template].format(s=subject)} {self.facts[subject, relation]}."

    def _allowed_templates(self, subject: str, relation: str) -> list[int]:
        held = self.held_out[subject]
        return [t for t in range(3) if (relation, t) != held]

    def documents(self) -> list[str]:
        """The training text: statements, biographies and fillers, shuffled."""
        rng = random.Random(self.seed + 3)
        docs = []
        for s in self.subjects:
            for r in self.relations:
                allowed = self._allowed_templates(s, r)
                for k in range(self.statements_per_fact):  # every allowed template at least once
                    docs.append(self._statement(s, r, allowed[k % len(allowed)]))
            for _ in range(self.bios_per_subject):
                order = list(self.relations)
                rng.shuffle(order)
                sentences = [self._statement(s, r, rng.choice(self._allowed_templates(s, r))) for r in order]
                docs.append(f"This is about {s}. " + " ".join(sentences))
        n_filler = int(len(docs) * self.filler_fraction / (1 - self.filler_fraction))
        docs += [" ".join(rng.sample(FILLER, 3)) for _ in range(n_filler)]
        rng.shuffle(docs)
        return docs

    def prompts(self, split: str = "train") -> list[Fact]:
        """'train': every (subject, relation) with a template seen in training for it;
        'heldout': each subject's held-out (relation, template) pair."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
        out = []
        for s in self.subjects:
            if split == "heldout":
                r, t = self.held_out[s]
                pairs = [(r, t)]
            else:
                pairs = [(r, self._allowed_templates(s, r)[0]) for r in self.relations]
            for r, t in pairs:
                out.append(Fact(s, r, t, RELATIONS[r][1][t].format(s=s), " " + self.facts[s, r]))
        return out
