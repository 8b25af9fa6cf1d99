"""Where a model recalls a fact: causal tracing (Meng et al. 2022) and attention knockout (Geva et
al. 2023), batched, on workbench and TransformerBridge models.

Causal tracing: corrupt the subject's token embeddings with Gaussian noise, then restore one clean
activation (the residual stream, an MLP's output or an attention layer's output) at one layer and
position. The indirect effect is p(target | restored) − p(target | corrupted). Every (layer,
position) restoration of a prompt runs as one batch, each row patching its own site.

Attention knockout: stop the last token from attending to a set of positions (the subject) in a
window of layers, and measure the drop in p(target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from workbench import adapter
from workbench.cache.collect import run_collect
from workbench.cache.rows import special_ids
from workbench.errors import InputError
from workbench.model.hooked import HookedModel

COMPONENTS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


@dataclass(frozen=True)
class FactPrompt:
    """A prompt, the subject it mentions, and the single-token target that should follow it."""

    prompt: str
    subject: str
    target: str


@dataclass(frozen=True)
class Encoded:
    tokens: torch.Tensor
    """[1, S] with the model's BOS first when it has one."""
    subject: tuple[int, int]
    """Token positions [start, end) of the subject."""
    target: int


def _encode_with_offsets(model: HookedModel, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    tok = model.tokenizer
    if hasattr(tok, "tok"):  # workbench TextCodec around a `tokenizers.Tokenizer`
        enc = tok.tok.encode(text)
        return list(enc.ids), [tuple(o) for o in enc.offsets]
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)  # Hugging Face
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_fact(model: HookedModel, fact: FactPrompt, row: int = 0) -> Encoded:
    """Tokens, subject span and target id of one fact; errors name the row."""
    if model.tokenizer is None:
        raise InputError("Fact prompts are text; this model has no tokenizer.")
    start = fact.prompt.find(fact.subject)
    if not fact.subject or start < 0:
        raise InputError(f"Fact row {row}: the subject {fact.subject!r} is not found in the prompt {fact.prompt!r}.")
    ids, offsets = _encode_with_offsets(model, fact.prompt)
    end = start + len(fact.subject)
    span = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    target_ids, _ = _encode_with_offsets(model, fact.target)
    if len(target_ids) != 1:
        raise InputError(f"Fact row {row}: the target {fact.target!r} is {len(target_ids)} tokens under this model's "
                         "tokenizer; it must be exactly one (try a leading space, e.g. ' Paris').")
    bos, _ = special_ids(model)
    prefix = [bos] if bos is not None else []
    device = next(model.parameters()).device
    tokens = torch.tensor([prefix + ids], device=device)
    return Encoded(tokens, (span[0] + len(prefix), span[-1] + 1 + len(prefix)), target_ids[0])


@torch.no_grad()
def top1_hits(model: HookedModel, encs: list[Encoded], batch_size: int = 64) -> list[bool]:
    """Whether the model's top-1 next token after each encoded prompt is its target (prompts of
    equal length run as one batch)."""
    by_len: dict[int, list[int]] = {}
    for i, enc in enumerate(encs):
        by_len.setdefault(enc.tokens.shape[1], []).append(i)
    hits = [False] * len(encs)
    for rows in by_len.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            top = model(torch.cat([encs[i].tokens for i in chunk]))[:, -1].argmax(-1).tolist()
            for i, t in zip(chunk, top):
                hits[i] = t == encs[i].target
    return hits


def recall(model: HookedModel, facts: Sequence[Any]) -> list[bool]:
    """Whether the model's top-1 next token after each prompt (after the model's BOS, as every
    training document starts) is its target. `facts` are `workbench.data.facts.Fact`s, or anything with
    `.prompt`, `.subject` and `.target`."""
    return top1_hits(model, [encode_fact(model, FactPrompt(f.prompt, f.subject, f.target), i)
                             for i, f in enumerate(facts)])


def embedding_noise_std(model: HookedModel) -> float:
    """Standard deviation of the entries of what the tokens write into the residual stream, i.e. of
    hook_embed (the scale noise is measured in): W_E, times √d_model on Gemma, through BLOOM's
    embedding norm."""
    return adapter.effective_embedding_std(model)


@torch.no_grad()
def _prob(logits: torch.Tensor, target: int) -> torch.Tensor:
    return logits[:, -1].float().softmax(-1)[:, target]


@torch.no_grad()
def causal_trace(model: HookedModel, enc: Encoded, noise: float, components: tuple[str, ...] = ("resid", "mlp", "attn"),
                 window: int = 1, n_samples: int = 3, seed: int = 0) -> dict[str, Any]:
    """{'p_clean', 'p_corrupt', component: effect [L, S]} averaged over `n_samples` noise draws.

    `noise` is in units of the embedding std (0: no corruption). MLP and attention restorations
    restore a window of `window` layers centred on each layer (as ROME does); the residual
    stream is restored at one layer."""
    L = model.cfg.n_layers
    tokens = enc.tokens
    S = tokens.shape[1]
    fired = adapter.describe(model).fired
    components = tuple(c for c in components if f"blocks.0.{COMPONENTS[c]}" in fired)  # attn-only: no MLP
    names = [f"blocks.{l}.{COMPONENTS[c]}" for c in components for l in range(L)]
    logits, clean = run_collect(model, tokens, names)
    p_clean = float(_prob(logits, enc.target)[0])
    std = embedding_noise_std(model) * noise
    a, b = enc.subject
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, Any] = {"p_clean": p_clean}
    rows_layer = torch.arange(L).repeat_interleave(S)  # row r restores layer r // S ...
    rows_pos = torch.arange(S).repeat(L)  # ... at position r % S
    p_corrupt_sum, effects = 0.0, {c: torch.zeros(L, S) for c in components}
    for _ in range(n_samples):
        delta = torch.randn(b - a, model.cfg.d_model, generator=gen).to(tokens.device) * std

        def corrupt(x, hook, delta=delta):
            x = x.clone()
            x[:, a:b] += delta.to(x.dtype)
            return x

        p_corrupt = float(_prob(model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", corrupt)]), enc.target)[0])
        p_corrupt_sum += p_corrupt
        batch = tokens.expand(L * S, -1)
        for comp in components:
            width = 1 if comp == "resid" else window
            hooks = [("hook_embed", corrupt)]
            for l in range(L):
                lo = rows_layer - (width - 1) // 2  # the window of row r covers layers [lo, lo + width)
                rows = ((l >= lo) & (l < lo + width)).nonzero().flatten()
                if len(rows) == 0:
                    continue
                saved = clean[f"blocks.{l}.{COMPONENTS[comp]}"][0]

                def restore(x, hook, rows=rows, saved=saved):
                    x = x.clone()
                    pos = rows_pos[rows].to(x.device)
                    x[rows.to(x.device), pos] = saved[pos].to(x.dtype)
                    return x

                hooks.append((f"blocks.{l}.{COMPONENTS[comp]}", restore))
            p = _prob(model.run_with_hooks(batch, fwd_hooks=hooks), enc.target).cpu()
            effects[comp] += (p - p_corrupt).view(L, S)
    out["p_corrupt"] = p_corrupt_sum / n_samples
    out.update({c: (effects[c] / n_samples).numpy() for c in components})
    return out


@torch.no_grad()
def attention_knockout(model: HookedModel, enc: Encoded, positions: list[int], window: int = 1) -> tuple[float, Any]:
    """(p_clean, p [L]): p(target) when the last token cannot attend to `positions` in the layers
    [l, l + window) (row l). The knockout is the adapter's, verified to take effect on this
    architecture (an error where it cannot be)."""
    L = model.cfg.n_layers
    tokens = enc.tokens
    p_clean = float(_prob(model(tokens), enc.target)[0])
    if not positions:
        return p_clean, torch.full((L,), p_clean).numpy()
    S = tokens.shape[1]
    batch = tokens.expand(L, -1)
    blocked = {}
    for l in range(L):
        rows = [r for r in range(L) if r <= l < r + window]
        mask = torch.zeros(L, S, S, dtype=torch.bool, device=tokens.device)
        rows_t, keys_t = torch.tensor(rows, device=tokens.device), torch.tensor(positions, device=tokens.device)
        mask[rows_t[:, None], -1, keys_t] = True
        blocked[l] = mask
    p = _prob(adapter.run_with_knockout(model, batch, blocked), enc.target).cpu().numpy()
    return p_clean, p


def position_groups(enc: Encoded) -> dict[str, list[int]]:
    """Token positions by role, as ROME's plots group them (empty groups are left out)."""
    a, b = enc.subject
    S = enc.tokens.shape[1]
    groups = {"first subject token": [a], "middle subject tokens": list(range(a + 1, b - 1)),
              "last subject token": [b - 1], "first subsequent token": [b] if b < S - 1 else [],
              "further tokens": list(range(b + 1, S - 1)), "last token": [S - 1]}
    if b - a == 1:
        groups["first subject token"] = []
    return groups


GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
          "further tokens", "last token")
