"""Where to patch: a site names hook points (one per layer, or one hook), and `by` cuts each hook's
activation into the pieces patched one at a time.

Sites by short name (one hook per layer), or any hook name the model has (a spliced SAE's latents,
`blocks.1.hook_resid_post.hook_sae_acts_post`; an MLP's neurons, `blocks.0.mlp.hook_post`), or a
hook name with `{l}` in it for every layer:

    resid_pre resid_mid resid_post attn_out mlp_out     [B, S, D]  by layer | position | feature
    z q k v (a head's output, query, key and value)      [B, S, H, K] by layer | position | head | head_position
    pattern (attention pattern, by query position)       [B, H, S, T] by layer | position | head | head_position

`feature` patches one coordinate of the last axis (a latent, a neuron) at every position;
`features` limits it to some. Under grouped-query attention, k and v have a key/value head's index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

from workbench.errors import InputError
from workbench.model.hooked import HookedModel

By = Literal["layer", "position", "head", "head_position", "feature"]
Layout = Literal["stream", "heads", "pattern"]

SITES: dict[str, str] = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "pattern": "blocks.{l}.attn.hook_pattern",
}
_HEAD_HOOKS = ("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_result")
_PATTERN_HOOKS = ("attn.hook_pattern", "attn.hook_attn_scores")


@dataclass(frozen=True)
class Patch:
    """One piece of one hook's activation: `index` applies after the batch axis."""

    hook: str
    index: tuple
    label: tuple[str, ...]


def layout_of(hook: str) -> Layout:
    if hook.endswith(_PATTERN_HOOKS):
        return "pattern"
    if hook.endswith(_HEAD_HOOKS):
        return "heads"
    return "stream"


def site_hooks(model: HookedModel, site: str, layers: Optional[Sequence[int]] = None) -> tuple[list[str], list[str]]:
    """(hook names, their labels): `L{l}` per layer for a short name or a `{l}` template, the hook
    name itself for one hook."""
    template = SITES.get(site, site)
    if site not in SITES and "." not in site:
        raise InputError(f"Unknown site {site!r}; choose one of {sorted(SITES)} or give a hook name.")
    if "{l}" not in template:
        if layers is not None:
            raise InputError(f"layers= applies to a site over layers; {site!r} is one hook.")
        return [template], [template]
    L = int(model.cfg.n_layers)
    chosen = list(range(L)) if layers is None else [int(l) for l in layers]
    bad = [l for l in chosen if not 0 <= l < L]
    if bad or not chosen:
        raise InputError(f"layers must be a non-empty list of layers in [0, {L}); got {list(layers or [])}.")
    return [template.format(l=l) for l in chosen], [f"L{l}" for l in chosen]


def axes_of(by: By, layout: Layout, over_layers: bool) -> tuple[str, ...]:
    """The result's axes for `by` on hooks of `layout` (with a layer axis for a site over layers)."""
    per = {"layer": (), "position": ("position",), "head": ("head",), "head_position": ("position", "head"),
           "feature": ("feature",)}
    if by not in per:
        raise InputError(f"by must be one of {sorted(per)}, got {by!r}.")
    if by in ("head", "head_position") and layout == "stream":
        raise InputError(f"by={by!r} needs a site with heads (z, q, k, v, pattern); this site has none.")
    if by == "feature" and layout != "stream":
        raise InputError("by='feature' patches one coordinate of a [batch, seq, width] activation at every "
                         "position; this site is per head.")
    return (("layer",) if over_layers or by == "layer" else ()) + per[by]


def make_patches(hooks: Sequence[str], labels: Sequence[str], shapes: Sequence[tuple[int, ...]], by: By,
                 position_labels: Sequence[str], features: Optional[Sequence[int]] = None) -> list[Patch]:
    """Every patch of `by` over `hooks` (activation shapes without the batch axis), in the order of
    the result's axes (layer outermost)."""
    patches = []
    every = slice(None)
    for hook, label, shape in zip(hooks, labels, shapes):
        layout = layout_of(hook)
        pos_axis, head_axis = {"stream": (0, None), "heads": (0, 1), "pattern": (1, 0)}[layout]
        n_pos = shape[pos_axis]
        n_heads = shape[head_axis] if head_axis is not None else 0

        def index(pos=every, head=every, feature=every, shape=shape, pos_axis=pos_axis, head_axis=head_axis) -> tuple:
            idx = [every] * len(shape)
            idx[pos_axis] = pos
            if head_axis is not None:
                idx[head_axis] = head
            if feature is not every:
                idx[-1] = feature
            return tuple(idx)

        if by == "layer":
            patches.append(Patch(hook, index(), (label,)))
        elif by == "position":
            patches += [Patch(hook, index(pos=p), (label, position_labels[p])) for p in range(n_pos)]
        elif by == "head":
            patches += [Patch(hook, index(head=h), (label, f"H{h}")) for h in range(n_heads)]
        elif by == "head_position":
            patches += [Patch(hook, index(pos=p, head=h), (label, position_labels[p], f"H{h}"))
                        for p in range(n_pos) for h in range(n_heads)]
        else:
            chosen = range(shape[-1]) if features is None else [int(f) for f in features]
            bad = [f for f in chosen if not 0 <= f < shape[-1]]
            if bad:
                raise InputError(f"features must lie in [0, {shape[-1]}) for {hook}; got {bad[:3]}.")
            patches += [Patch(hook, index(feature=f), (label, str(f))) for f in chosen]
    return patches
