"""Tokenizers, all `tokenizers.Tokenizer` objects saved as `tokenizer.json` in a model folder.

- `byte_tokenizer()`: one token per byte (id = byte value) plus `<|endoftext|>` = 256.
- `train_bpe(texts, vocab_size)`: a byte-level BPE trained locally with `tokenizers`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    """Read a `tokenizer.json`."""
    return Tokenizer.from_file(str(path))


class TextCodec:
    """The small encode/decode surface models use: str -> list[int] and back."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()
