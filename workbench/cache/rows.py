"""The token rows analyses run on: the repeated-random-token probe and probes made from text, rows of
the model's own training text (or of the Python standard library's source), and the special ids
they never use."""

from __future__ import annotations

from typing import Optional

import torch

from workbench.data.text import DataConfig, build_text_data, repeated_sequence, stdlib_files
from workbench.data.tokenizer import readable_tokens
from workbench.errors import InputError
from workbench.model.hooked import HookedModel


def special_ids(model: HookedModel) -> tuple[Optional[int], set[int]]:
    """(BOS id or None, ids never sampled as random tokens)."""
    tok = model.tokenizer
    if tok is None:
        return None, set()
    if hasattr(tok, "all_special_ids"):  # a Hugging Face tokenizer (TransformerBridge)
        return tok.bos_token_id, set(tok.all_special_ids)
    from workbench.data.tokenizer import eos_id

    eos = eos_id(tok.tok)
    return eos, {eos}


def readable_ids(model: HookedModel) -> torch.Tensor:
    """Token ids that read as letters, never special ones (so a prompt made of them is legible); every
    ordinary id when fewer than 16 do, or the model has no tokenizer."""
    _, special = special_ids(model)
    if model.tokenizer is None:
        return torch.tensor([i for i in range(int(model.cfg.d_vocab)) if i not in special])
    ids = [i for i in range(int(model.cfg.d_vocab)) if i not in special]
    names = readable_tokens(model.tokenizer, ids)
    good = [i for i, s in zip(ids, names) if s.strip().isalpha() and s.strip().isascii()]
    return torch.tensor(good if len(good) >= 16 else ids)


def probe_tokens(model: HookedModel, seq_len: int, n_copies: int, batch: int, seed: int, prepend_bos: bool
                 ) -> tuple[torch.Tensor, int]:
    """([batch, prefix + n_copies * seq_len] random tokens repeated, prefix length), on the
    model's device, never using special ids; the prefix is the model's BOS when asked for."""
    bos, special = special_ids(model)
    allowed = torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])
    prefix = _probe_prefix(model, seq_len, n_copies, prepend_bos)
    rows = allowed[repeated_sequence(batch, seq_len, len(allowed), seed, n_copies=n_copies)]
    return _with_prefix(model, rows, prefix), prefix


def _probe_prefix(model: HookedModel, seq_len: int, n_copies: int, prepend_bos: bool) -> int:
    """The probe's prefix length (1 with a BOS, else 0); an error when the probe cannot fit in n_ctx."""
    bos, _ = special_ids(model)
    prefix = 1 if prepend_bos and bos is not None else 0
    needed, n_ctx = prefix + n_copies * seq_len, int(model.cfg.n_ctx)
    if needed > n_ctx:
        fit = (n_ctx - prefix) // n_copies
        raise InputError(f"A length-{seq_len} sequence repeated {n_copies}× needs {needed} positions but the model "
                         f"has n_ctx={n_ctx}; " + (f"use a sequence length of at most {fit} (--seq-len, "
                                                   "--prefix-seq-len)." if fit >= 2 else
                                                   "it has too little context for an induction probe, which needs "
                                                   f"at least {prefix + 2 * n_copies} positions."))
    return prefix


def _with_prefix(model: HookedModel, rows: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, prefix + T] rows with the model's BOS in front when prefix is 1, on the model's device."""
    if prefix:
        rows = torch.cat([torch.full((len(rows), 1), special_ids(model)[0]), rows], dim=1)
    return rows.to(next(model.parameters()).device)


def check_rows(n_rows: int, seq_len: int) -> None:
    """An InputError, naming the command-line flag, unless rows of text can be cut: at least one row
    (--rows) of at least one token (--seq-len)."""
    if n_rows < 1:
        raise InputError(f"--rows must be positive (the rows of text to read), got {n_rows}.")
    if seq_len < 1:
        raise InputError(f"--seq-len must be positive (the tokens per row), got {seq_len}.")


def text_batch(model: HookedModel, n_rows: int, seq_len: int) -> torch.Tensor:
    """[<= n_rows, seq_len] tokens of the Python standard library's source (text every machine has),
    encoded with the model's own tokenizer and cut into rows; an error if it has no tokenizer."""
    check_rows(n_rows, seq_len)
    if model.tokenizer is None:
        raise InputError("This model has no tokenizer, so it cannot read text; use token ids.")
    ids: list[int] = []
    for path in stdlib_files():
        ids += model.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= n_rows * seq_len:
            break
    n = min(n_rows, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], device=next(model.parameters()).device).view(n, seq_len)


def text_rows(model: HookedModel, source: str, n_rows: int, seq_len: int) -> torch.Tensor:
    """[<= n_rows, seq_len] token ids of the text `source` (see `workbench.data.text.load_text`: 'stdlib', a
    file or folder, a saved dataset, 'hub:<name>'), tokenized document by document until enough rows
    are made (streaming: the rest is never tokenized). Documents are joined by the model's EOS (its
    BOS where it has no EOS), and every row starts with the BOS when the model has one, so the
    activations at position 0, which training leaves out, are always a BOS's."""
    from workbench.data.text import load_text

    check_rows(n_rows, seq_len)
    if model.tokenizer is None:
        raise InputError("This model has no tokenizer, so it cannot read text; use token ids.")
    tok = model.tokenizer
    bos, _ = special_ids(model)
    sep = getattr(tok, "eos_token_id", None) if hasattr(tok, "all_special_ids") else bos
    sep = sep if sep is not None else bos
    body = seq_len - (1 if bos is not None else 0)
    if body < 1:
        raise InputError(f"--seq-len {seq_len} leaves no room for text: every row starts with the BOS, which "
                         "training leaves out. Use --seq-len 2 or more.")
    rows, stream = [], []
    for i, doc in enumerate(load_text(source)):
        text = doc["text"]
        if not isinstance(text, str):  # a saved dataset's column may hold None for a missing document
            raise InputError(f"Row {i} of the 'text' column of {source!r} holds {text!r:.40} "
                             f"({type(text).__name__}), not text; drop such rows from the dataset (e.g. "
                             "ds.filter(lambda r: isinstance(r['text'], str))) and save it again.")
        ids = tok(text, add_special_tokens=False)["input_ids"] if hasattr(tok, "all_special_ids") else tok.encode(text)
        stream += list(ids) + ([sep] if sep is not None else [])
        while len(stream) >= body and len(rows) < n_rows:
            rows.append(([bos] if bos is not None else []) + stream[:body])
            stream = stream[body:]
        if len(rows) >= n_rows:
            break
    if not rows:
        raise InputError(f"The text {source!r} holds fewer than {body} tokens; give more text or a shorter seq_len.")
    return torch.tensor(rows, device=next(model.parameters()).device)


TEXT_PROBES = ("text-distribution", "passage")
"""Induction probes made from text: random tokens at the text's own frequencies, and a passage of
real text (see `text_probe_tokens`)."""


def _own_text(model: HookedModel, split: str, n_rows: int, row_len: int) -> Optional[tuple[torch.Tensor, str]]:
    """Rows of the model's own training text, split 'train' or 'val', when its folder records it."""
    if model.tokenizer is None:
        raise InputError("This model has no tokenizer, so it cannot read text; use token ids.")
    data = (getattr(model, "meta", None) or {}).get("train", {}).get("data")
    if data is None or not hasattr(model.tokenizer, "tok"):
        return None
    cfg = DataConfig(**data)
    if not cfg.uses_text:
        return None
    rows = getattr(build_text_data(cfg, int(model.cfg.n_ctx), model.tokenizer.tok), split)[:n_rows]
    where = f"the training split of {cfg.text!r}" if split == "train" else f"held-out validation text of {cfg.text!r}"
    return torch.from_numpy(rows.astype("int64")), where


def training_text(model: HookedModel, n_rows: int = 2000, row_len: int = 256) -> tuple[torch.Tensor, str]:
    """([<= n_rows, T] token ids, on the CPU; where they come from): the training split of the model's
    own training text when its folder records it, else the standard library's source (as
    `held_out_text`, whose rows these never overlap when both come from the model's text)."""
    check_rows(n_rows, row_len)
    own = _own_text(model, "train", n_rows, row_len)
    if own is not None:
        return own
    return text_batch(model, n_rows, min(row_len, int(model.cfg.n_ctx))).cpu(), "the Python standard library's source"


def held_out_text(model: HookedModel, n_rows: int = 512, row_len: int = 256) -> tuple[torch.Tensor, str]:
    """([<= n_rows, T] token ids of text, on the CPU; where it comes from).

    The validation split of the model's own training text when its folder records how it was
    trained (text it never trained on); otherwise the Python standard library's source in the
    model's tokenizer, cut into rows of `row_len` tokens. An error if the model has no tokenizer.
    """
    own = _own_text(model, "val", n_rows, row_len)
    if own is not None:
        return own
    rows = text_batch(model, n_rows, min(row_len, int(model.cfg.n_ctx))).cpu()
    return rows, "the Python standard library's source (the model may have trained on it)"


def text_probe_tokens(model: HookedModel, kind: str, text_RT: torch.Tensor, seq_len: int, n_copies: int, batch: int,
                      seed: int, prepend_bos: bool) -> tuple[torch.Tensor, int]:
    """Like `probe_tokens`, with the repeated sequence made from the text rows `text_RT` [R, T].

    kind 'text-distribution': tokens drawn independently at their frequencies in the text;
    kind 'passage': `seq_len` consecutive tokens of one text row, at a random place where the
    window holds no special token (no document boundary). Special ids are never used.
    """
    if kind not in TEXT_PROBES:
        raise InputError(f"Unknown text probe {kind!r}; choose one of {', '.join(TEXT_PROBES)}.")
    prefix = _probe_prefix(model, seq_len, n_copies, prepend_bos)
    _, special = special_ids(model)
    gen = torch.Generator().manual_seed(seed)
    ordinary_RT = ~torch.isin(text_RT, torch.tensor(sorted(special), dtype=text_RT.dtype))
    if kind == "text-distribution":
        counts_V = torch.bincount(text_RT[ordinary_RT], minlength=int(model.cfg.d_vocab)).double()
        body = torch.multinomial(counts_V, batch * seq_len, replacement=True, generator=gen).view(batch, seq_len)
    else:
        # windows [t, t + seq_len) of a row that hold only ordinary tokens: no special one inside
        n_special = torch.cat([torch.zeros(len(text_RT), 1), (~ordinary_RT).double().cumsum(1)], dim=1)
        n_windows = max(text_RT.shape[1] - seq_len + 1, 0)
        clean_RW = n_special[:, seq_len: seq_len + n_windows] == n_special[:, :n_windows]
        starts = clean_RW.nonzero()
        if len(starts) == 0:
            raise InputError(f"The text has no run of {seq_len} tokens without a special token; use a shorter "
                             "--seq-len.")
        pick = starts[torch.randint(0, len(starts), (batch,), generator=gen)]
        body = torch.stack([text_RT[r, t : t + seq_len] for r, t in pick.tolist()])
    return _with_prefix(model, body.repeat(1, n_copies), prefix), prefix
