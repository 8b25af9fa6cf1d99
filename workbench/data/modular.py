"""Modular addition, the task of the grokking papers (Power et al. 2022; Nanda et al. 2023): every pair
`a b =` (token ids a, b in [0, p) and p for `=`) with its answer (a + b) mod p, a seeded split into
train and test, and the word-level tokenizer that reads the numbers.

    data = modular_data(53, train_fraction=0.5, seed=0)   # data.tokens_N3[data.train_idx], data.labels_N[...]

The model that reads it is in `workbench.model.modular`, its trainer in `workbench.train.modular`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from workbench.errors import ConfigError

TASK = "modular-addition"
"""The `task` field of a modular-addition preset and of its models' config.json."""
MAX_P = 1024
"""The largest modulus: the task holds all p² pairs, and a full-batch step computes p logits for each
training pair (about p³/2 numbers, 2 GB of float32 at p = 1024, before their gradients)."""
P_LIMIT_REASON = (f"at most {MAX_P}: the task holds all p² pairs (a b =) in memory, and every full-batch step "
                  f"computes p logits for each training pair (about p³/2 numbers, 2 GB at p = {MAX_P})")


def is_prime(n: int) -> bool:
    """Whether n is a prime number."""
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def warn_if_not_prime(p: int, where: str) -> None:
    """A warning (not an error) when p is composite: the task trains, but the Fourier story assumes Z_p is a field."""
    if not is_prime(p):
        warnings.warn(f"{where}: p={p} is not prime. Training works, but the Fourier analysis of the grokking study "
                      "assumes a prime p (every non-zero frequency then generates all of Z_p); its key frequencies "
                      "and progress measures may not mean what they do for a prime. Use a prime such as 53 or 113.",
                      stacklevel=3)


@dataclass(frozen=True, eq=False)
class ModularData:
    """Every pair of the task, and the split. Pair index i = a * p + b."""

    p: int
    tokens_N3: torch.Tensor
    """[p², 3] `a b =` for every pair, a-major."""
    labels_N: torch.Tensor
    """[p²] (a + b) mod p."""
    train_idx: torch.Tensor
    """[n_train] pair indices of the training set."""
    test_idx: torch.Tensor
    """[p² - n_train] pair indices of the test set."""

    @property
    def split_sha256(self) -> str:
        """A fingerprint of the training set, stored with the model so an analysis can check it rebuilt the split."""
        return hashlib.sha256(np.asarray(sorted(self.train_idx.tolist()), dtype=np.int64).tobytes()).hexdigest()


def modular_data(p: int, train_fraction: float, seed: int = 0) -> ModularData:
    """All p² pairs `a b =` with their answers, and a seeded split into train and test."""
    if not 3 <= p <= MAX_P:
        raise ConfigError(f"p must be an integer from 3 to {MAX_P}, got {p!r}: {P_LIMIT_REASON}.")
    if not 0 < train_fraction < 1:
        raise ConfigError(f"train_fraction must be strictly between 0 and 1, got {train_fraction!r}: it is the share "
                          f"of the {p}² pairs used for training, and the rest is the test set.")
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * p * p)
    return ModularData(p, tokens, (a + b) % p, perm[:n_train].sort().values, perm[n_train:].sort().values)


def modular_tokenizer(p: int) -> Tokenizer:
    """Word-level tokenizer: '0' ... 'p-1' are ids 0 ... p-1, '=' is p; `model.to_tokens('3 5 =')` works."""
    vocab = {str(i): i for i in range(p)}
    vocab["="] = p
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="="))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok
