"""Training data: a text pipeline on Hugging Face `datasets`, and synthetic repeated-segment tasks.

Text comes from the Python standard library's own source (the default, read from the running
interpreter), a local file or folder, or `hub:<name>` when online. It is tokenized, packed into
rows of n_ctx tokens separated by <|endoftext|>, split deterministically into train and
validation rows, and cached on disk (under $WORKBENCH_CACHE, default ~/.cache/workbench).

A training batch for step t is a pure function of (seed, t): text rows sampled from the train
split, and `synthetic_fraction` of rows made of repeated random segments. That is what makes
`--resume` bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from workbench.config import check_types
from workbench.data.tokenizer import Tokenizer, byte_tokenizer, eos_id, train_bpe
from workbench.errors import InputError, OfflineError, check_field

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".c", ".h", ".js")
_SKIP_STDLIB_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
SYNTHETIC_KINDS = ("uniform", "unigram", "text")
"""What fills a synthetic row: uniform random tokens, random tokens at the text's own frequencies,
or real training text (DataConfig.synthetic_<kind> is each one's share)."""


@dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from."""

    text: str = "stdlib"
    """'stdlib' (the running Python's standard library source), 'facts' (the synthetic knowledge
    base of workbench.data.facts), a local file or folder, or 'hub:<dataset>'."""
    tokenizer: Literal["byte", "bpe"] = "byte"
    """'byte': 256 byte tokens + <|endoftext|>; 'bpe': a byte-level BPE trained on the text."""
    bpe_vocab_size: int = 1024
    """Vocabulary size of the BPE (with tokenizer='bpe'); the model's d_vocab must equal it."""
    max_text_mb: Optional[float] = 16.0
    """Read at most this many MB of text (files in sorted order); None reads everything."""
    val_fraction: float = 0.02
    """Share of packed text rows held out for validation."""
    synthetic_fraction: float = 0.5
    """Share of each batch made of synthetic rows in which segments recur (1.0: no plain text)."""
    synthetic_uniform: float = 1.0
    """Weight of synthetic rows filled with tokens drawn uniformly from the vocabulary (bytes 0–255
    for byte models). The three synthetic_* weights share out the synthetic rows in proportion."""
    synthetic_unigram: float = 0.0
    """Weight of synthetic rows filled with tokens drawn at the training text's own token
    frequencies (mostly printable characters, for byte models)."""
    synthetic_text: float = 0.0
    """Weight of synthetic rows that are rows of the training text with some of their own spans
    repeated later in the row."""
    repeat_len_min: int = 4
    """Shortest repeated segment."""
    repeat_len_max: int = 32
    """Longest repeated segment."""
    seed: int = 0
    """Seed of the train/validation split and of every batch."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "DataConfig"
        check_field(self.tokenizer in ("byte", "bpe"), own, "tokenizer", self.tokenizer, "'byte' or 'bpe'")
        check_field(isinstance(self.bpe_vocab_size, int) and self.bpe_vocab_size > 257, own,
                    "bpe_vocab_size", self.bpe_vocab_size, "an integer above 257 (the byte tokens)")
        check_field(0.0 < self.val_fraction < 0.5, own, "val_fraction", self.val_fraction, "in (0, 0.5)")
        check_field(0.0 <= self.synthetic_fraction <= 1.0, own, "synthetic_fraction",
                    self.synthetic_fraction, "in [0, 1]")
        weights = {name: getattr(self, f"synthetic_{name}") for name in SYNTHETIC_KINDS}
        for name, weight in weights.items():
            check_field(weight >= 0, own, f"synthetic_{name}", weight, "≥ 0 (a weight)")
        check_field(sum(weights.values()) > 0, own, "synthetic_uniform + synthetic_unigram + synthetic_text",
                    sum(weights.values()), "positive (they share out the synthetic rows)")
        check_field(self.max_text_mb is None or self.max_text_mb > 0, own, "max_text_mb",
                    self.max_text_mb, "positive or None")
        check_field(self.seed >= 0, own, "seed", self.seed, "an integer ≥ 0")
        check_field(1 <= self.repeat_len_min <= self.repeat_len_max, own, "repeat_len_min",
                    (self.repeat_len_min, self.repeat_len_max), "≥1 and ≤ repeat_len_max")

    @property
    def synthetic_shares(self) -> dict[str, float]:
        """{kind: share of the synthetic rows} for each kind in SYNTHETIC_KINDS; the shares sum to 1."""
        weights = {name: getattr(self, f"synthetic_{name}") for name in SYNTHETIC_KINDS}
        total = sum(weights.values())
        return {name: w / total for name, w in weights.items()}

    @property
    def uses_text(self) -> bool:
        """False when every row is synthetic uniform random tokens, so no corpus is read."""
        return self.synthetic_fraction < 1.0 or self.synthetic_unigram > 0 or self.synthetic_text > 0

    @property
    def d_vocab(self) -> int:
        """The vocabulary size a model trained on this data must have."""
        return 257 if self.tokenizer == "byte" else self.bpe_vocab_size


# -- text sources ---------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, tests and vendored packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_STDLIB_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files)


def local_files(path: Path) -> list[Path]:
    """A file, or the text files under a folder, sorted; an InputError naming the first one that cannot be read."""
    if path.is_file():
        return _readable([path])
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise InputError(f"No text files ({', '.join(TEXT_SUFFIXES)}) under {path}.")
        return _readable(files)
    raise InputError(f"Text source {str(path)!r} is neither 'stdlib', 'hub:<name>', nor an existing "
                     "file or folder.")


def _readable(files: list[Path]) -> list[Path]:
    """`files`, once each has given its first byte (checked here, so that the error names the file instead of
    surfacing from inside `datasets` as a traceback)."""
    for f in files:
        try:
            with open(f, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise InputError(f"Cannot read the text file {f} ({err.strerror or err}); fix it, or move it out of "
                             "the text folder.") from err
    return files


def _cap(files: list[Path], max_mb: Optional[float]) -> list[Path]:
    if max_mb is None:
        return files
    kept, total = [], 0
    for f in files:
        total += f.stat().st_size
        if kept and total > max_mb * 1e6:
            break
        kept.append(f)
    return kept


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers, and the user has not set HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def require_hub(what: str) -> None:
    """Raise OfflineError unless the Hugging Face hub can be reached."""
    if not hub_reachable():
        raise OfflineError(f"{what} needs the Hugging Face hub, and this machine is offline "
                           "(or HF_HUB_OFFLINE is set). Use a local file or folder instead, "
                           "or the default 'stdlib' corpus.")


def _saved_dataset(folder: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists()


def load_text(source: str, max_mb: Optional[float] = None):
    """A `datasets.Dataset` with one document per row in a 'text' column: 'stdlib', 'facts', a local
    file or folder of text files, a folder written by `datasets`' save_to_disk, or 'hub:<name>'."""
    import datasets

    if source.startswith("hub:"):
        name = source[4:]
        require_hub(f"The dataset {name!r}")
        ds = datasets.load_dataset(name, split="train")
        if "text" not in ds.column_names:
            raise InputError(f"Hub dataset {name!r} has no 'text' column (columns: {ds.column_names}).")
        return ds.select_columns(["text"])
    if source == "facts":
        from workbench.data.facts import KnowledgeBase

        return datasets.Dataset.from_dict({"text": KnowledgeBase().documents()})
    folder = Path(source).expanduser()
    if source != "stdlib" and _saved_dataset(folder):
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if "text" not in ds.column_names:
            raise InputError(f"The dataset saved in {folder} has no 'text' column (columns: {ds.column_names}).")
        dtype = getattr(ds.features["text"], "dtype", type(ds.features["text"]).__name__)
        if dtype not in ("string", "large_string"):
            raise InputError(f"The 'text' column of the dataset saved in {folder} holds {dtype} values, not text "
                             "(strings); save the documents as strings in a 'text' column.")
        return ds.select_columns(["text"])
    files = stdlib_files() if source == "stdlib" else local_files(folder)
    files = _cap(files, max_mb)
    try:
        return datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document",
                                     split="train", encoding_errors="replace")
    except OSError as err:  # a file that gave its first byte and then failed (a disk error, a vanished mount)
        raise InputError(f"Could not read the text of {source!r} ({err}).") from err


def _source_fingerprint(source: str, max_mb: Optional[float]) -> str:
    if source.startswith("hub:"):
        return source
    if source == "facts":
        import inspect

        import workbench.data.facts as facts

        return "facts:" + hashlib.sha256(inspect.getsource(facts).encode()).hexdigest()  # changes with the generator
    folder = Path(source).expanduser()
    if source != "stdlib" and _saved_dataset(folder):  # every file, splits' Arrow shards included
        files = sorted(p for p in folder.rglob("*") if p.is_file())
    else:
        files = _cap(stdlib_files() if source == "stdlib" else local_files(folder), max_mb)
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# -- packing and caching ----------------------------------------------------------------------------
def pack(token_lists, eos: int, n_ctx: int) -> np.ndarray:
    """Join documents with <|endoftext|> and cut the stream into full rows [N, n_ctx]."""
    stream = np.fromiter((t for doc in token_lists for t in (*doc, eos)), dtype=np.int32)
    n_rows = len(stream) // n_ctx
    return stream[: n_rows * n_ctx].reshape(n_rows, n_ctx)


def split_rows(rows: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic shuffle, then the last val_fraction of rows (at least one) is validation."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = max(1, int(round(len(rows) * val_fraction)))
    if len(rows) < 2:
        raise InputError(f"The text has only {len(rows)} packed rows; give it more text or a smaller n_ctx.")
    return rows[order[n_val:]], rows[order[:n_val]]


def cache_dir() -> Path:
    """Where packed token arrays are cached ($WORKBENCH_CACHE, default ~/.cache/workbench)."""
    return Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench"))


@dataclass(frozen=True)
class TextData:
    """Packed token rows: train [N, n_ctx] and validation [M, n_ctx]."""

    train: np.ndarray
    val: np.ndarray


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The byte tokenizer, or a BPE trained on (at most 4 MB of) the configured text."""
    if cfg.tokenizer == "byte":
        return byte_tokenizer()
    ds = load_text(cfg.text, min(cfg.max_text_mb or 4.0, 4.0))
    return train_bpe((row["text"] for row in ds), cfg.bpe_vocab_size)


def build_text_data(cfg: DataConfig, n_ctx: int, tok: Tokenizer) -> TextData:
    """Tokenize, pack and split the configured text, reusing the on-disk cache when it matches."""
    key_src = json.dumps({"source": _source_fingerprint(cfg.text, cfg.max_text_mb), "n_ctx": n_ctx,
                          "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                          "tokenizer": tok.to_str()}, sort_keys=True)
    path = cache_dir() / f"packed-{hashlib.sha256(key_src.encode()).hexdigest()[:24]}.safetensors"
    if path.exists():
        try:
            arrays = load_file(str(path))
            return TextData(arrays["train"], arrays["val"])
        except Exception:  # a torn cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    ds = load_text(cfg.text, cfg.max_text_mb)
    ids = ds.map(lambda b: {"ids": [e.ids for e in tok.encode_batch(b["text"])]}, batched=True,
                 remove_columns=["text"], desc="tokenizing", load_from_cache_file=False)["ids"]
    train, val = split_rows(pack(ids, eos_id(tok), n_ctx), cfg.val_fraction, cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"train": np.ascontiguousarray(train), "val": np.ascontiguousarray(val)}, str(tmp))
    os.replace(tmp, path)
    return TextData(train, val)


# -- synthetic tasks --------------------------------------------------------------------------------
def repeated_segments(n_rows: int, n_ctx: int, vocab: int, len_min: int, len_max: int,
                      gen: torch.Generator, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows [n_rows, n_ctx] of random tokens (or of `base` [n_rows, n_ctx]) in which random segments recur.

    Each block is a random segment (length uniform in [len_min, len_max]) followed by 1 to 3
    copies of itself, each copy after a gap of 0 to len_min tokens; blocks start after a random
    gap. Lengths and gaps vary, so the distance to an earlier copy never sits at a fixed offset,
    and a model can only predict a copy by looking up what followed the current token. Without
    `base` the rows start as uniform random tokens in [0, vocab).
    """
    rows = torch.randint(0, vocab, (n_rows, n_ctx), generator=gen) if base is None else base.clone()
    draws = torch.rand(n_rows, 8 * (n_ctx // max(len_min, 1) + 2), generator=gen).tolist()
    for r in range(n_rows):
        u = iter(draws[r])
        pos = int(next(u) * len_max)
        while pos + len_min < n_ctx:
            seg = len_min + int(next(u) * (len_max - len_min + 1))
            src = pos
            pos += seg
            for _ in range(1 + int(next(u) * 3)):
                pos += int(next(u) * (len_min + 1))
                n = min(seg, n_ctx - pos)
                if n <= 0:
                    break
                rows[r, pos : pos + n] = rows[r, src : src + n]
                pos += n
            pos += int(next(u) * len_max)
    return rows


def repeated_sequence(batch: int, seq_len: int, vocab: int, seed: int, prefix: Optional[int] = None,
                      n_copies: int = 2) -> torch.Tensor:
    """[batch, n_copies*seq_len (+1)] random tokens in [0, vocab) repeated; the induction-head probe.

    With `prefix` set, every row starts with that token (e.g. a BOS/EOS id).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (batch, seq_len), generator=gen).repeat(1, n_copies)
    if prefix is not None:
        rows = torch.cat([torch.full((batch, 1), prefix), rows], dim=1)
    return rows


class Batches:
    """Training and validation batches; `train(step)` depends only on (seed, step)."""

    def __init__(self, cfg: DataConfig, n_ctx: int, batch_size: int, text: Optional[TextData],
                 synthetic_vocab: int):
        if cfg.uses_text and text is None:
            raise InputError("This DataConfig mixes in text (synthetic_fraction < 1, or synthetic rows made "
                             "from text), so it needs text data.")
        self.cfg, self.n_ctx, self.batch_size, self.text = cfg, n_ctx, batch_size, text
        self.synthetic_vocab = synthetic_vocab
        self.n_synthetic = int(round(batch_size * cfg.synthetic_fraction))
        self.unigram_V: Optional[torch.Tensor] = None
        if cfg.synthetic_unigram > 0:
            assert text is not None
            counts = np.bincount(text.train.ravel(), minlength=synthetic_vocab)  # separators included
            self.unigram_V = torch.from_numpy(counts / counts.sum())

    def _kind_rows(self, kind: str, n: int, gen: torch.Generator, pool: Optional[np.ndarray]) -> torch.Tensor:
        c = self.cfg
        base = None
        if kind == "unigram":
            assert self.unigram_V is not None
            base = torch.multinomial(self.unigram_V, n * self.n_ctx, replacement=True, generator=gen)
            base = base.view(n, self.n_ctx)
        elif kind == "text":
            assert pool is not None
            idx = torch.randint(0, len(pool), (n,), generator=gen).numpy()
            base = torch.from_numpy(pool[idx].astype(np.int64))
        return repeated_segments(n, self.n_ctx, self.synthetic_vocab, c.repeat_len_min, c.repeat_len_max, gen, base)

    def _synthetic(self, n: int, gen: torch.Generator, pool: Optional[np.ndarray] = None) -> torch.Tensor:
        """[n, n_ctx] synthetic rows, split among the kinds by their shares (largest remainder)."""
        shares = self.cfg.synthetic_shares
        counts = {k: int(np.floor(n * s)) for k, s in shares.items()}
        by_remainder = sorted(shares, key=lambda k: (-(n * shares[k] - counts[k]), SYNTHETIC_KINDS.index(k)))
        for k in by_remainder[: n - sum(counts.values())]:
            counts[k] += 1
        if pool is None and self.text is not None:
            pool = self.text.train
        parts = [self._kind_rows(k, counts[k], gen, pool) for k in SYNTHETIC_KINDS if counts[k]]
        return torch.cat(parts)

    def train(self, step: int) -> torch.Tensor:
        """Token batch [batch_size, n_ctx] for `step`."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        parts = []
        n_text = self.batch_size - self.n_synthetic
        if n_text:
            assert self.text is not None
            idx = torch.randint(0, len(self.text.train), (n_text,), generator=gen).numpy()
            parts.append(torch.from_numpy(self.text.train[idx].astype(np.int64)))
        if self.n_synthetic:
            parts.append(self._synthetic(self.n_synthetic, gen))
        return torch.cat(parts)

    def validation(self, n_rows: int = 64) -> dict[str, torch.Tensor]:
        """Fixed validation sets [<= n_rows, n_ctx], as present: 'text', 'synthetic' (the kinds
        mixed as in training) and, when several kinds are mixed, 'synthetic_<kind>' for each.
        Synthetic rows made from text start from validation text."""
        out = {}
        pool = self.text.val if self.text is not None else None
        if self.cfg.uses_text and self.text is not None:
            out["text"] = torch.from_numpy(self.text.val[:n_rows].astype(np.int64))
        if self.n_synthetic:
            seed = self.cfg.seed + 7_777_777
            out["synthetic"] = self._synthetic(n_rows, torch.Generator().manual_seed(seed), pool)
            kinds = [k for k, s in self.cfg.synthetic_shares.items() if s > 0]
            if len(kinds) > 1:
                for i, kind in enumerate(kinds):
                    gen = torch.Generator().manual_seed(seed + 1 + i)
                    out[f"synthetic_{kind}"] = self._kind_rows(kind, n_rows, gen, pool)
        return out
