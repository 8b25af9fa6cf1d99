"""Clean/corrupt prompt pairs to patch between: the tokens, the answers and where they are read.

A `PatchingTask` holds B pairs of prompts of equal length S (row b of `corrupt` is row b of `clean`
with something changed), and, for P read positions per prompt, the token the clean prompt should
give there (`answer`) and, where there is one, the token the corrupt prompt leads to (`wrong`).
The metrics of `workbench.compute.patching.metrics` read logits at those positions.

    induction_task(model)                  repeated random tokens; the corrupt first half is fresh
    fact_task(model)                       a known fact with its subject swapped for another's
    modular_task(model)                    a + b = with one operand changed
    task_from_strings(model, clean, corrupt, answers, wrong)   one's own pairs

Pairs of different lengths are padded on the right: under causal attention a padding token after
the read position cannot change the logits there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from workbench.cache.rows import special_ids
from workbench.errors import InputError
from workbench.model.hooked import HookedModel


@dataclass(frozen=True, eq=False)
class PatchingTask:
    """B clean/corrupt prompt pairs and the answers read at P positions of each."""

    name: str
    clean: torch.Tensor
    """[B, S] token ids."""
    corrupt: torch.Tensor
    """[B, S] token ids, the same length as `clean`, row by row."""
    position: torch.Tensor
    """[B, P] positions whose next-token logits the metrics read."""
    answer: torch.Tensor
    """[B, P] the token the clean prompt should give at each read position."""
    wrong: Optional[torch.Tensor] = None
    """[B, P] the competing token (the corrupt prompt's answer), or None where there is none."""

    def __post_init__(self) -> None:
        if self.clean.ndim != 2 or self.clean.shape != self.corrupt.shape:
            raise InputError(f"Task {self.name!r}: clean and corrupt tokens must both be [batch, seq] of one shape; "
                             f"got {tuple(self.clean.shape)} and {tuple(self.corrupt.shape)}.")
        B, S = self.clean.shape
        if B == 0 or S == 0:
            raise InputError(f"Task {self.name!r} has no prompts.")
        for field in ("position", "answer") + (("wrong",) if self.wrong is not None else ()):
            value = getattr(self, field)
            if value.ndim != 2 or value.shape[0] != B or value.shape != self.position.shape:
                raise InputError(f"Task {self.name!r}: {field} must be [batch, read positions] = [{B}, P] like "
                                 f"position; got {tuple(value.shape)}.")
        if bool((self.position < 0).any()) or bool((self.position >= S).any()):
            raise InputError(f"Task {self.name!r}: read positions must lie in [0, {S}).")

    @property
    def n_prompts(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    def to(self, device: torch.device) -> "PatchingTask":
        """The same task with every tensor on `device`."""
        wrong = None if self.wrong is None else self.wrong.to(device)
        return PatchingTask(self.name, self.clean.to(device), self.corrupt.to(device), self.position.to(device),
                            self.answer.to(device), wrong)


def _device(model: HookedModel) -> torch.device:
    return next(model.parameters()).device


def induction_task(model: HookedModel, n_prompts: int = 8, half: int = 10, seed: int = 0) -> PatchingTask:
    """Random tokens repeated once, [BOS] x1..xn x1..xn, read at every position of the second copy
    but its last (where x_{i+1} is predictable only by induction). The corrupt prompt has a fresh
    random first half, so that the second half repeats nothing. No `wrong` token: use a
    probability or loss metric."""
    if half < 2 or n_prompts < 1:
        raise InputError(f"induction_task needs half >= 2 and n_prompts >= 1; got half={half}, n_prompts={n_prompts}.")
    bos, avoid = special_ids(model)
    prefix = 1 if bos is not None else 0
    if prefix + 2 * half > model.cfg.n_ctx:
        raise InputError(f"induction_task: {prefix + 2 * half} tokens do not fit the model's context of "
                         f"{model.cfg.n_ctx}; use a smaller half.")
    allowed = torch.tensor([t for t in range(model.cfg.d_vocab) if t not in avoid])
    gen = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        return allowed[torch.randint(len(allowed), (n_prompts, half), generator=gen)]

    first, fresh = draw(), draw()
    start = torch.full((n_prompts, prefix), bos if bos is not None else 0, dtype=torch.long)
    clean = torch.cat([start, first, first], 1)
    corrupt = torch.cat([start, fresh, first], 1)
    pos = torch.arange(prefix + half, prefix + 2 * half - 1).expand(n_prompts, -1)
    answer = clean.gather(1, pos + 1)
    return PatchingTask("induction", clean, corrupt, pos.clone(), answer).to(_device(model))


def task_from_strings(model: HookedModel, clean: Sequence[str], corrupt: Sequence[str], answers: Sequence[str],
                      wrong: Optional[Sequence[str]] = None, name: str = "custom") -> PatchingTask:
    """A task from text: each clean prompt, its corrupt twin (the same number of tokens), the
    single-token answer the clean prompt should give next and, optionally, the corrupt prompt's
    answer. The answers are read after the last token of each prompt; shorter pairs are padded on
    the right."""
    if model.tokenizer is None or not hasattr(model, "to_tokens"):
        raise InputError("task_from_strings needs a model with a tokenizer and to_tokens.")
    n = len(clean)
    if n == 0 or len(corrupt) != n or len(answers) != n or (wrong is not None and len(wrong) != n):
        raise InputError(f"task_from_strings needs as many corrupt prompts, answers (and wrong answers) as clean "
                         f"prompts, at least one; got {n} clean, {len(corrupt)} corrupt, {len(answers)} answers"
                         + (f", {len(wrong)} wrong." if wrong is not None else "."))
    rows_c = [model.to_tokens(s)[0] for s in clean]
    rows_x = [model.to_tokens(s)[0] for s in corrupt]
    for i, (a, b) in enumerate(zip(rows_c, rows_x)):
        if len(a) != len(b):
            raise InputError(f"Pair {i}: the clean prompt {clean[i]!r} is {len(a)} tokens and the corrupt one "
                             f"{corrupt[i]!r} is {len(b)}; patching needs the two aligned, token for token.")

    def single(text: str, i: int) -> int:
        ids = model.to_tokens(text, prepend_bos=False)[0]
        if len(ids) != 1:
            raise InputError(f"Pair {i}: the answer {text!r} is {len(ids)} tokens under this model's tokenizer; it "
                             "must be exactly one (try a leading space).")
        return int(ids[0])

    S = max(len(r) for r in rows_c)
    pad = special_ids(model)[0] or 0
    device = _device(model)
    tokens = torch.full((2, n, S), pad, dtype=torch.long, device=device)
    for i, (a, b) in enumerate(zip(rows_c, rows_x)):
        tokens[0, i, :len(a)], tokens[1, i, :len(b)] = a, b
    position = torch.tensor([[len(r) - 1] for r in rows_c], device=device)
    answer = torch.tensor([[single(a, i)] for i, a in enumerate(answers)], device=device)
    wrong_t = None if wrong is None else torch.tensor([[single(w, i)] for i, w in enumerate(wrong)], device=device)
    return PatchingTask(name, tokens[0], tokens[1], position, answer, wrong_t)


def fact_task(model: HookedModel, n_prompts: int = 16, relation: Optional[str] = None, seed: int = 0,
              known_only: bool = True) -> PatchingTask:
    """Facts of the workbench's knowledge base (the `facts` model's training data) with the subject
    swapped for another subject of the same length in tokens whose attribute differs: the answer is
    the clean subject's attribute, `wrong` the swapped-in subject's. With `known_only`, only facts
    the model completes top-1 under both subjects are kept, so that both answers are the model's own."""
    from workbench.data.facts import KnowledgeBase

    kb = KnowledgeBase()
    facts = [f for f in kb.prompts("train") if relation is None or f.relation == relation]
    if not facts:
        raise InputError(f"No facts of relation {relation!r}; the relations are {list(kb.relations)}.")
    rng = random.Random(seed)
    by_shape: dict[tuple[str, int, int], list] = {}
    for f in facts:
        n_tok = len(model.to_tokens(f.prompt)[0])
        by_shape.setdefault((f.relation, f.template, n_tok), []).append(f)
    device = _device(model)
    top1: dict[str, bool] = {}

    def known(f) -> bool:
        if f.prompt not in top1:
            with torch.no_grad():
                logits = model(model.to_tokens(f.prompt))[0, -1]
            top1[f.prompt] = int(logits.argmax()) == int(model.to_tokens(f.target, prepend_bos=False)[0, 0])
        return top1[f.prompt]

    pairs, used = [], set()
    groups = list(by_shape.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
        for a in group:
            partners = [b for b in group if b.target != a.target and b.prompt not in used]
            if a.prompt in used or not partners or (known_only and not known(a)):
                continue
            b = next((b for b in partners if not known_only or known(b)), None)
            if b is not None:
                pairs.append((a, b))
                used |= {a.prompt, b.prompt}
            if len(pairs) == n_prompts:
                break
        if len(pairs) == n_prompts:
            break
    if not pairs:
        raise InputError("fact_task found no pair of facts that this model recalls under both subjects; is this "
                         "the facts model (or one trained on the knowledge base)? Pass known_only=False to "
                         "take pairs regardless.")
    task = task_from_strings(model, [a.prompt for a, _ in pairs], [b.prompt for _, b in pairs],
                             [a.target for a, _ in pairs], [b.target for _, b in pairs], name="facts")
    return task.to(device)


def modular_task(model: HookedModel, n_prompts: int = 64, operand: int = 1, seed: int = 0) -> PatchingTask:
    """`a b =` against `a b' =` (operand 1) or `a' b =` (operand 0), read at `=`: the answer is
    (a + b) mod p, `wrong` the corrupt prompt's sum. For the modular-addition model (p tokens for
    the numbers, then `=`)."""
    p = model.cfg.d_vocab - 1
    if operand not in (0, 1):
        raise InputError(f"operand must be 0 (a) or 1 (b), got {operand}.")
    if getattr(model.cfg, "n_ctx", 0) != 3 or p < 2:
        raise InputError("modular_task is for the modular-addition model: three tokens `a b =`, p numbers and `=`.")
    gen = torch.Generator().manual_seed(seed)
    ab = torch.randint(p, (n_prompts, 2), generator=gen)
    other = ab.clone()
    other[:, operand] = (ab[:, operand] + torch.randint(1, p, (n_prompts,), generator=gen)) % p
    eq = torch.full((n_prompts, 1), p, dtype=torch.long)
    clean, corrupt = torch.cat([ab, eq], 1), torch.cat([other, eq], 1)
    position = torch.full((n_prompts, 1), 2, dtype=torch.long)
    answer = (ab.sum(1, keepdim=True)) % p
    wrong = (other.sum(1, keepdim=True)) % p
    return PatchingTask("modular addition", clean, corrupt, position, answer, wrong).to(_device(model))
