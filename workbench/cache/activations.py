"""Where SAE training data comes from: activations streamed from a model, or a store on disk.

    stream_activations   runs a workbench or TransformerBridge model over token rows and yields
                         {hook name: [batch, d]} batches through a shuffling buffer that mixes
                         tokens across sequences; one forward pass feeds every hook asked for
    ActivationStore      sharded safetensors files plus manifest.json; reading holds two shards at
                         a time (the next one is read in the background), so peak memory stays
                         flat however large the store grows
    TensorSource         an in-memory tensor, reshuffled every epoch (synthetic data, tests)

Every source is an iterator of {name: [batch, d]} dicts and is deterministic for its seed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.artifacts import STORE_MANIFEST, atomic_write_json, write_output_folder
from workbench.cache.collect import run_collect
from workbench.cache.rows import special_ids
from workbench.errors import CheckpointError, HookNameError, InputError, unknown_name_message
from workbench.model.hooked import HookedModel

Batch = dict[str, torch.Tensor]


def check_hooks(model: HookedModel, hooks: Sequence[str]) -> None:
    """A clear error, with the nearest names, for a hook the model does not have."""
    for hook in hooks:
        if hook not in model.hook_dict:
            raise HookNameError(unknown_name_message("hook name", hook, model.hook_dict,
                                                     listed_by="`workbench info <model>`"))


@torch.no_grad()
def model_activations(model: HookedModel, tokens: torch.Tensor, hooks: Sequence[str], skip_first: int = 1,
                      exclude: Optional[Sequence[int]] = None) -> Batch:
    """{hook: [rows * (positions - skip_first), d]} from one forward pass over `tokens` [rows, S].
    The first `skip_first` positions (the BOS, whose activations are outliers) are left out, and so
    is every position whose token is in `exclude` (special tokens: BOS, EOS, padding); a hook that
    the model registers but never fires is a DoesNotApplyError naming the model."""
    _, store = run_collect(model, tokens, hooks, stop_early=True)  # nothing after the last hook is needed
    out = {}
    B, S = tokens.shape[:2]
    keep = None
    if exclude:
        keep = ~torch.isin(tokens[:, skip_first:], torch.tensor(sorted(exclude), device=tokens.device)).flatten()
    for h in hooks:
        act = store[h]
        if act.ndim == 4:  # per-head activations [B, S, H, K]: one vector per token
            act = act.flatten(-2)
        elif act.ndim == 2 and act.shape[0] == B * S:  # [B·S, d]: OPT's bridge flattens tokens around its MLP
            act = act.view(B, S, -1)
        flat = act[:, skip_first:].reshape(-1, act.shape[-1]).float()
        out[h] = flat if keep is None else flat[keep.to(flat.device)]
    return out


MAX_BUFFER_PASSES = 100
"""How many passes over its rows the shuffling buffer may need before its first batch. Past one pass it holds
each activation several times over, which mixes nothing more; past this it only costs memory and a wait
that looks like a hang (64 rows and --buffer-batches 100000 would need about 3,000 passes)."""


def usable_positions(token_rows: torch.Tensor, skip_first: int = 1, exclude: Optional[Sequence[int]] = None) -> int:
    """How many activations one pass over `token_rows` [R, S] gives: the positions from `skip_first` on
    whose token is not in `exclude` (what `model_activations` keeps)."""
    body = token_rows[:, skip_first:]
    if exclude:
        return int((~torch.isin(body, torch.tensor(sorted(exclude), device=body.device))).sum())
    return body.numel()


def stream_activations(model: HookedModel, token_rows: torch.Tensor, hooks: Sequence[str], batch_size: int = 4096,
                       rows_per_forward: int = 32, buffer_batches: int = 8, seed: int = 0,
                       skip_first: int = 1, loop: bool = True, exclude_special: bool = True) -> Iterator[Batch]:
    """Batches of activations at `hooks`, mixed across sequences by a shuffling buffer of
    `buffer_batches` batches. With `loop`, starts over (in a new order) when the rows run out. The
    first `skip_first` positions and, with `exclude_special`, every special token (BOS, EOS, padding)
    are left out of training.

    Checked before any forward pass: rows that give no activation at all, and (with `loop`) a buffer
    that would need more than MAX_BUFFER_PASSES passes over the rows to fill, are InputErrors; either
    would otherwise loop forever without yielding."""
    check_hooks(model, hooks)
    if buffer_batches < 2:
        raise InputError(f"buffer_batches must be at least 2 (half the buffer is kept to mix with new rows), got "
                         f"{buffer_batches}.")
    if batch_size < 1 or rows_per_forward < 1:
        raise InputError(f"batch_size and rows_per_forward must be positive, got {batch_size} and {rows_per_forward}.")
    if token_rows.ndim != 2 or len(token_rows) == 0:
        raise InputError(f"No token rows to read activations from (token_rows has shape {tuple(token_rows.shape)}); "
                         "give at least one row of tokens (--rows must be positive).")
    special = sorted(special_ids(model)[1]) if exclude_special else None
    usable = usable_positions(token_rows, skip_first, special)
    n_rows, seq = token_rows.shape
    if usable == 0:
        if seq <= skip_first:
            raise InputError(f"Rows of {seq} token(s) give no activation: the first {skip_first} position(s) of each "
                             "row (the BOS) are left out of training. Use a longer --seq-len.")
        raise InputError(f"The {n_rows} rows give no activation: every token after the first position is a special "
                         "token (BOS, EOS, padding), and special tokens are left out of training. Give text with "
                         "ordinary tokens in it, or train on special tokens too (--keep-special, "
                         "exclude_special=False).")
    need = buffer_batches * batch_size
    if loop and need > MAX_BUFFER_PASSES * usable:
        fit = usable // batch_size
        hint = (f"Use --buffer-batches {fit} (one pass) or fewer, or give more rows (--rows)." if fit >= 2 else
                f"Give more rows (--rows) or use a smaller batch size than {batch_size:,}.")
        raise InputError(f"A shuffling buffer of {buffer_batches} batches (--buffer-batches {buffer_batches}) × "
                         f"{batch_size:,} = {need:,} activations cannot be filled from {n_rows} rows, which give "
                         f"{usable:,} usable positions per pass: it would read them about {need // usable:,} times "
                         f"over, holding every copy, before the first batch. {hint}")
    return _stream(model, token_rows, hooks, batch_size, rows_per_forward, buffer_batches, seed, skip_first, loop,
                   special)


def _stream(model: HookedModel, token_rows: torch.Tensor, hooks: Sequence[str], batch_size: int, rows_per_forward: int,
            buffer_batches: int, seed: int, skip_first: int, loop: bool, special: Optional[Sequence[int]]
            ) -> Iterator[Batch]:
    """The generator behind `stream_activations`, once its arguments are checked."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    buffer: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    filled = 0
    epoch = 0
    while True:
        order = torch.randperm(len(token_rows), generator=gen)
        for start in range(0, len(order), rows_per_forward):
            rows = token_rows[order[start:start + rows_per_forward]].to(device)
            acts = model_activations(model, rows, hooks, skip_first, special)
            for h in hooks:
                buffer[h].append(acts[h])
            filled += next(iter(acts.values())).shape[0]
            if filled >= buffer_batches * batch_size:
                merged = {h: torch.cat(buffer[h]) for h in hooks}
                perm = torch.randperm(filled, generator=gen).to(device)
                keep = filled - (buffer_batches // 2) * batch_size  # yield half, keep half to mix with new rows
                for b in range(0, keep - batch_size + 1, batch_size):
                    yield {h: merged[h][perm[b:b + batch_size]] for h in hooks}
                used = (keep // batch_size) * batch_size
                rest = perm[used:]
                buffer = {h: [merged[h][rest]] for h in hooks}
                filled = len(rest)
        epoch += 1
        if not loop:
            break
    if filled >= batch_size:  # drain what is left when not looping
        merged = {h: torch.cat(buffer[h]) for h in hooks}
        perm = torch.randperm(filled, generator=gen).to(device)
        for b in range(0, filled - batch_size + 1, batch_size):
            yield {h: merged[h][perm[b:b + batch_size]] for h in hooks}


class TensorSource:
    """{name: [batch, d]} batches from in-memory tensors, reshuffled every epoch."""

    def __init__(self, data: Union[torch.Tensor, Batch], batch_size: int, seed: int = 0, name: str = "x"):
        self.data = data if isinstance(data, dict) else {name: data}
        self.n = len(next(iter(self.data.values())))
        if batch_size > self.n:
            raise InputError(f"batch_size {batch_size} is larger than the {self.n} activations available.")
        self.batch_size, self.gen = batch_size, torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            perm = torch.randperm(self.n, generator=self.gen)
            for b in range(0, self.n - self.batch_size + 1, self.batch_size):
                idx = perm[b:b + self.batch_size]
                yield {k: v[idx] for k, v in self.data.items()}


class ActivationStore:
    """Activations on disk: `shard_XXXXX.safetensors` files (one tensor per hook, the same rows)
    and `manifest.json` listing every shard with its row count, size and SHA-256."""

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / STORE_MANIFEST).read_text())
        except FileNotFoundError as err:
            raise CheckpointError(f"{self.folder} is not an activation store: no {STORE_MANIFEST}.") from err
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{self.folder / STORE_MANIFEST} is damaged ({err}); rebuild the store.") from err
        self._check_manifest()
        self.hooks: list[str] = self.manifest["hooks"]
        self.d: dict[str, int] = self.manifest["d"]
        self._verified: set[str] = set()  # shards whose checksum this process already checked (size: every read)

    def _check_manifest(self) -> None:
        """A CheckpointError, naming the field, for a manifest this class did not write: missing or mistyped
        fields, a shard file outside the store folder, or no activations at all."""
        where, m = self.folder / STORE_MANIFEST, self.manifest

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{where} is not a valid activation store manifest: {what}. Rebuild the store "
                                   "(`workbench sae cache`).")

        if not isinstance(m, dict):
            raise bad(f"it holds {type(m).__name__}, not an object")
        hooks, d, shards = m.get("hooks"), m.get("d"), m.get("shards")
        if not isinstance(hooks, list) or not hooks or not all(isinstance(h, str) for h in hooks):
            raise bad(f"'hooks' must be a non-empty list of hook names, got {hooks!r:.80}")
        if not isinstance(d, dict) or any(not isinstance(d.get(h), int) or isinstance(d.get(h), bool)
                                          or d[h] < 1 for h in hooks):
            raise bad(f"'d' must give a positive width for each hook in 'hooks' ({', '.join(hooks)}), got {d!r:.80}")
        if not isinstance(shards, list):
            raise bad(f"'shards' must be a list, got {shards!r:.80}")
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or not all(
                    isinstance(shard.get(k), int) and shard[k] >= 0 for k in ("rows", "bytes")) \
                    or not isinstance(shard.get("sha256"), str):
                raise bad(f"shards[{i}] must be an object with 'file', 'rows', 'bytes' and 'sha256', got {shard!r:.80}")
            name = PurePath(shard["file"])
            if not shard["file"] or name.is_absolute() or ".." in name.parts:
                raise CheckpointError(f"{where} lists the shard file {shard['file']!r}, which is not inside the store "
                                      f"folder {self.folder}; a shard must be a file inside it. Rebuild the store.")
        if not any(s["rows"] for s in shards):
            raise CheckpointError(f"{self.folder} holds no activations: {STORE_MANIFEST} lists no shard with rows in "
                                  "it. "
                                  "Rebuild the store (`workbench sae cache`).")

    @property
    def n_tokens(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @classmethod
    def write(cls, folder: Union[str, Path], batches: Iterator[Batch], n_tokens: int,
              shard_tokens: int = 262_144) -> "ActivationStore":
        """Fill a new store with `n_tokens` rows from `batches`: built aside, moved into place; an existing
        folder is replaced only if the workbench wrote it (`artifacts.write_output_folder`)."""

        def build(tmp: Path) -> None:
            shards, pending, have, written = [], [], 0, 0
            hooks: Optional[list[str]] = None
            d: dict[str, int] = {}

            def flush() -> None:
                nonlocal pending, have
                merged = {h: torch.cat([p[h] for p in pending])[:shard_tokens].contiguous().cpu() for h in hooks}
                name = f"shard_{len(shards):05d}.safetensors"
                save_file(merged, str(tmp / name))
                rows = len(next(iter(merged.values())))
                shards.append({"file": name, "rows": rows, "bytes": (tmp / name).stat().st_size,
                               "sha256": hashlib.sha256((tmp / name).read_bytes()).hexdigest()})
                rest = {h: torch.cat([p[h] for p in pending])[shard_tokens:] for h in hooks}
                pending = [rest] if len(next(iter(rest.values()))) else []
                have = len(next(iter(rest.values())))

            for batch in batches:
                if hooks is None:
                    hooks, d = list(batch), {h: int(v.shape[-1]) for h, v in batch.items()}
                take = min(n_tokens - written, len(next(iter(batch.values()))))
                pending.append({h: v[:take] for h, v in batch.items()})
                have += take
                written += take
                while have >= shard_tokens:
                    flush()
                if written >= n_tokens:
                    break
            if hooks is None:
                raise InputError("No activations to store: the source was empty.")
            if have:
                flush()
            atomic_write_json(tmp / STORE_MANIFEST, {"kind": "workbench.ActivationStore", "hooks": hooks, "d": d,
                                               "shards": shards})

        return cls(write_output_folder(Path(folder), "activation store", build))

    def _open(self, shard: dict[str, Any], verify: bool):
        path = self.folder / shard["file"]
        if not path.exists():
            raise CheckpointError(f"Activation shard {path} is missing; rebuild the store.")
        if path.stat().st_size != shard["bytes"] or (
                verify and hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]):
            raise CheckpointError(f"Activation shard {path} is corrupt (its size or checksum does not match "
                                  f"{STORE_MANIFEST}); delete the store and cache the activations again.")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as err:
            raise CheckpointError(f"Activation shard {path} is corrupt ({err}); delete the store and cache the "
                                  "activations again.") from err

    def batches(self, batch_size: int, seed: int = 0, hooks: Optional[Sequence[str]] = None, loop: bool = True,
                verify: bool = True) -> Iterator[Batch]:
        """Shuffled batches: shards in a random order, rows shuffled within each shard. The next shard is
        read (and, the first time, checked against its checksum) in a background thread while the
        current one is used, so training does not wait for the disk; two shards are in memory at once."""
        hooks = list(hooks or self.hooks)
        gen = torch.Generator().manual_seed(seed)
        shards = self.manifest["shards"]

        def order() -> Iterator[int]:
            while True:
                yield from torch.randperm(len(shards), generator=gen).tolist()
                if not loop:
                    return

        def read(i: int) -> Batch:
            with self._open(shards[i], verify and shards[i]["file"] not in self._verified) as fh:
                missing = [h for h in hooks if h not in fh.keys()]
                if missing:
                    raise CheckpointError(f"Activation shard {self.folder / shards[i]['file']} has no {missing[0]!r}, "
                                          f"which {STORE_MANIFEST} lists; rebuild the store.")
                data = {h: fh.get_tensor(h) for h in hooks}
            for h, t in data.items():  # what a reader sizes itself by must be what it gets
                if tuple(t.shape) != (shards[i]["rows"], self.d[h]):
                    raise CheckpointError(f"Activation shard {self.folder / shards[i]['file']} holds {h} as "
                                          f"{list(t.shape)}, but {STORE_MANIFEST} says {shards[i]['rows']} rows "
                                          "of width "
                                          f"d = {self.d[h]}; rebuild the store.")
            self._verified.add(shards[i]["file"])
            return data

        carry: Optional[Batch] = None
        indices = order()
        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = pool.submit(read, next(indices))
            while upcoming is not None:
                data = upcoming.result()
                following = next(indices, None)
                upcoming = pool.submit(read, following) if following is not None else None
                if carry is not None:
                    data = {h: torch.cat([carry[h], data[h]]) for h in hooks}
                n = len(next(iter(data.values())))
                perm = torch.randperm(n, generator=gen)
                usable = (n // batch_size) * batch_size
                for b in range(0, usable, batch_size):
                    yield {h: data[h][perm[b:b + batch_size]] for h in hooks}
                carry = {h: data[h][perm[usable:]] for h in hooks}
                del data
