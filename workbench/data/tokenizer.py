"""Tokenizers, all `tokenizers.Tokenizer` objects saved as `tokenizer.json` in a model folder.

- `byte_tokenizer()`: one token per byte (id = byte value) plus `<|endoftext|>` = 256.
- `train_bpe(texts, vocab_size)`: a byte-level BPE trained locally with `tokenizers`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from workbench.errors import CheckpointError

EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses for bytes 0..255, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: d_vocab 257, token id = byte value, 256 = <|endoftext|>."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    vocab[EOS] = 256
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens([EOS])
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (the 256 bytes, merges, <|endoftext|> last)."""
    if vocab_size <= 257:
        raise ValueError(f"BPE vocab_size must exceed the 257 byte tokens, got {vocab_size}.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=_byte_alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([EOS])
    return tok


def eos_id(tok: Tokenizer) -> int:
    """Id of the document separator <|endoftext|>."""
    idx = tok.token_to_id(EOS)
    if idx is None:
        raise ValueError(f"Tokenizer has no {EOS} token.")
    return idx


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write `tokenizer.json` (callers make the write atomic)."""
    tok.save(str(path))


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a `tokenizer.json`; a missing or damaged file is a CheckpointError that names it."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise CheckpointError(f"{path} is not a valid tokenizer file ({str(err)[:200]}). Restore it from the run's "
                              "checkpoints (each holds a copy) or re-train the model.") from err


class TextCodec:
    """The small encode/decode surface models use: str -> list[int] and back, with the special-token
    attributes of a Hugging Face tokenizer that TransformerLens code reads (`bos_token_id`,
    `pad_token_id`, `padding_side`, ...).

    The workbench's byte and BPE tokenizers have one special token, <|endoftext|>, the separator
    between the documents of a training row. As in GPT-2, it serves as BOS (when one is asked for),
    EOS and padding. The modular-addition tokenizer has none: those attributes are None there.
    `encode` adds no special token."""

    padding_side: str = "right"
    """Where `model.to_tokens` pads a batch of unequal lengths, unless told otherwise (TL's default)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def batch_decode(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Each row of ids decoded to text."""
        return [self.decode(list(row)) for row in rows]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eos_token(self) -> Optional[str]:
        """'<|endoftext|>', or None for a tokenizer without it."""
        return EOS if self.tok.token_to_id(EOS) is not None else None

    @property
    def eos_token_id(self) -> Optional[int]:
        """The id of <|endoftext|>, or None."""
        return self.tok.token_to_id(EOS)

    bos_token = eos_token
    bos_token_id = eos_token_id
    pad_token = eos_token
    pad_token_id = eos_token_id


# -- tokens for people to read ----------------------------------------------------------------------
_CONTROL = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_SENTENCEPIECE_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    return {ch: b for b, ch in enumerate(_byte_alphabet())}


def _escape(data: bytes) -> str:
    """UTF-8 text with control characters as escapes (\\n, \\x1b); invalid bytes as \\xNN."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in data)
    return "".join(_CONTROL.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or 127 <= ord(c) < 160 else c) for c in text)


def readable_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token id as a one-line string a person can read: its text, with newlines and other control
    characters as escapes (`\\n`, `\\x1b`), and a token that is part of a multi-byte character (a
    lone byte 0x8f, which decodes to '�') as `\\x8f`. `tokenizer` is a workbench `TextCodec` or a
    Hugging Face tokenizer; byte-level BPE (GPT-2 style) and SentencePiece byte tokens (`<0x0A>`)
    both map back to their bytes."""
    byte_of = _byte_of_char()
    if isinstance(tokenizer, TextCodec):
        pieces = [tokenizer.tok.id_to_token(int(i)) for i in ids]
    else:
        pieces = list(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))
    out = []
    for i, piece in zip(ids, pieces):
        if piece is None:
            out.append(f"<id {int(i)}>")
        elif piece in (EOS,) or (piece.startswith("<") and piece.endswith(">") and len(piece) > 2
                                 and not _SENTENCEPIECE_BYTE.match(piece)):
            out.append(piece)  # a special token: shown as it is named
        elif m := _SENTENCEPIECE_BYTE.match(piece):
            out.append(_escape(bytes([int(m.group(1), 16)])))
        elif all(c in byte_of for c in piece):  # byte-level BPE: every character stands for one byte
            out.append(_escape(bytes(byte_of[c] for c in piece)))
        else:  # SentencePiece and other vocabularies: '▁' marks a space
            out.append(_escape(piece.replace("▁", " ").encode()))
    return out
