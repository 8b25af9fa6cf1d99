"""Dictionaries spliced into the model, as SAELens's `HookedSAETransformer` splices them, for both kinds
of model the workbench runs: its own `Transformer` (a TransformerLens `HookedRootModule`) and
TransformerLens's `TransformerBridge` around a Hugging Face model.

    with splice(model, [sae]) as (spliced,):            # sae.cfg.hook_name: blocks.1.hook_resid_post
        logits, cache = model.run_with_cache(tokens)     # the model's own logits (the error term is on)
        cache["blocks.1.hook_resid_post.hook_sae_acts_post"]            # [B, S, F] = sae.encode(resid_post)
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post.hook_sae_acts_post", ablate)])
    # here the model is as before: the same hook_dict, modules, hooks and outputs

Shape letters as in workbench.model.transformer, plus F latents and N the width of the site (D, or
H·K at a per-head site such as hook_z, whose [B, S, H, K] activation is read flattened to [B, S, H·K],
as the SAE was trained on it, and given back in its own shape).

A spliced dictionary owns six hook points, named as SAELens names them, under the hook it writes to
(its site):

    <site>.hook_sae_input       [B, S, N]   what the dictionary reads
    <site>.hook_sae_acts_pre    [B, S, F]   pre-activations
    <site>.hook_sae_acts_post   [B, S, F]   latents
    <site>.hook_sae_recons      [B, S, N]   the reconstruction (an SAE) or prediction (a transcoder)
    <site>.hook_sae_error       [B, S, N]   the error term (fires only with use_error_term)
    <site>.hook_sae_output      [B, S, N]   what the model reads on: recons + error, or recons alone

An SAE's site is the hook it reads (`cfg.hook_name`). A transcoder reads its MLP's input
(`cfg.hook_name`, e.g. blocks.0.ln2.hook_normalized) and replaces its MLP's output (`cfg.target_hook`,
blocks.0.hook_mlp_out); its hook points live under the output hook (blocks.0.hook_mlp_out.hook_sae_acts_post),
where SAELens's `HookedSAETransformer.add_sae` puts a transcoder's too. The site is named as the workbench
names hooks on both kinds of model (blocks.1.hook_resid_post), also on a bridge, where SAELens's
`SAETransformerBridge` uses the bridge's canonical name (blocks.1.hook_out).

The error term (`use_error_term`, on by default) is the activation the dictionary replaces minus the
dictionary's output on the unhooked input, computed without the hook points and without gradient, as
SAELens's `SAE.forward` computes it. With it the model's output is unchanged, an edit of the latents
changes the output by exactly the decoder's change, and gradients reach the layers below only through
the latents.

How it attaches. SAELens swaps the model's hook point for the SAE module. Here the hook point stays where
it is: the dictionary runs as a permanent forward hook on it, placed first, so that every other hook on
that point (and the cache) sees what the model reads on, `hook_sae_output`. The dictionary's own hook
points are added to the registry the model's `hooks`, `run_with_hooks` and `run_with_cache` look names up
in: a HookedRootModule's `hook_dict` and `mod_dict` (which `setup()` builds), a bridge's `_hook_registry`
(from which its `hook_dict` and `mod_dict` properties are built on every read; SAELens's
`SAETransformerBridge` registers its SAE hooks there too). The dictionary's weights stay out of the
model's parameters and state_dict. A transcoder adds a second permanent hook, on its input hook, which
keeps the input for the output hook; it is placed after the hooks already there, so a hook added to the
input hook later (`run_with_hooks`) changes what the MLP reads but not what the transcoder reads (edit
`<site>.hook_sae_input` for that).

`attach` checks on a few fixed tokens that each dictionary's widths fit its hooks, that with the error
term the logits are the model's own, and that an edit of `hook_sae_acts_post` changes them; otherwise it
detaches what it attached and refuses: `InputError` for a dictionary that does not fit the model,
`DoesNotApplyError` where the model does not let the splice take effect.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint, LensHandle

from workbench.adapter import DoesNotApplyError, describe, require_hook
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.sae.modules import SAE
from workbench.sae.transcoders.replacement import Transcoders

HOOK_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
               "hook_sae_output")
"""The hook points every spliced dictionary owns, in the order they fire (SAELens's names)."""

Dictionaries = Union[SAE, Transcoders, "SplicedSAE", Sequence[Union[SAE, Transcoders, "SplicedSAE"]]]


class SplicedSAE(nn.Module):
    """An SAE or a per-layer transcoder with SAELens's hook points, ready to splice into a model.
    `forward(x, target)` is the whole computation; `attach` runs it at the model's hook."""

    def __init__(self, sae: SAE, use_error_term: bool = True, hook_name: Optional[str] = None):
        """`hook_name`: the hook the dictionary reads, if not its `cfg.hook_name`."""
        super().__init__()
        if not isinstance(sae, SAE):
            raise InputError(f"SplicedSAE splices a workbench SAE or per-layer transcoder, got {type(sae).__name__}; "
                             "for a Transcoders set use SplicedSAE.from_transcoders(tc, layer) or splice(model, tc).")
        self.sae = sae
        self.use_error_term = bool(use_error_term)
        """Output recons + error (the model's own activation, plus any edit's change), or recons alone."""
        self.in_hook = hook_name or sae.cfg.hook_name
        """The hook the dictionary reads."""
        if not self.in_hook:
            raise InputError("This SAE does not say which hook it reads (cfg.hook_name is empty); pass "
                             "SplicedSAE(sae, hook_name='blocks.1.hook_resid_post') or whichever it was trained on.")
        self.site = sae.cfg.target_hook or self.in_hook
        """The hook whose activation it replaces, under which its hook points are named."""
        for point in HOOK_POINTS:
            setattr(self, point, HookPoint())
        self._attachment: Optional[_Attachment] = None
        """Where it is attached, while it is."""

    @classmethod
    def from_transcoders(cls, tc: Transcoders, layer: int, use_error_term: bool = True) -> "SplicedSAE":
        """Layer `layer` of a per-layer set: reads that MLP's input, replaces its output."""
        if tc.clt is not None:
            raise InputError("A cross-layer transcoder cannot be spliced one layer at a time: the features read at "
                             "one layer write to the MLP outputs of every later layer. Splice per-layer transcoders "
                             "(`workbench transcoder train --type per-layer`).")
        if not (isinstance(layer, int) and 0 <= layer < tc.n_layers):
            raise InputError(f"layer must be one of 0–{tc.n_layers - 1} (the set's layers), got {layer!r}.")
        return cls(tc.per_layer[layer], use_error_term, hook_name=tc.in_hook(layer))

    @property
    def is_transcoder(self) -> bool:
        """Whether it replaces another hook than the one it reads (an MLP's output from its input)."""
        return self.site != self.in_hook

    def full_name(self, point: str) -> str:
        """The model-level name of one of its hook points: full_name("hook_sae_acts_post") is
        "blocks.1.hook_resid_post.hook_sae_acts_post"."""
        if point not in HOOK_POINTS:
            raise InputError(f"A spliced dictionary's hook points are {', '.join(HOOK_POINTS)}; got {point!r}.")
        return f"{self.site}.{point}"

    @property
    def hook_names(self) -> list[str]:
        """The model-level names of its six hook points."""
        return [self.full_name(p) for p in HOOK_POINTS]

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the model reads on at the site. x: the activation the dictionary reads ([B, S, N], a per-head
        [B, S, H, K], or [B·S, N] as OPT's bridge hands MLP inputs); target: the activation it replaces (x
        itself for an SAE). Returns target's shape and dtype."""
        target = x if target is None else target
        t_BSN = _flat(target).to(self.sae.W_dec.dtype)
        x_BSN = _flat(x).to(self.sae.W_dec.dtype)
        if self.is_transcoder:
            x_BSN = _per_token_like(x_BSN, t_BSN, self.in_hook, self.site)
        self.sae.check_input(x_BSN)
        with torch.no_grad():  # the unhooked dictionary, for the error term (SAELens's clean recomputation)
            clean_BSN = self.sae(x_BSN) if self.use_error_term else None
        in_BSN = self.hook_sae_input(x_BSN)
        pre_BSF = self.hook_sae_acts_pre(self.sae.pre_acts(in_BSN))
        f_BSF = self.hook_sae_acts_post(self.sae.activate(pre_BSF))
        recons_BSN = self.sae.decode(f_BSF)
        skip_BSN = self.sae.skip_out(in_BSN)
        recons_BSN = self.hook_sae_recons(recons_BSN if skip_BSN is None else recons_BSN + skip_BSN)
        if clean_BSN is not None:
            with torch.no_grad():
                error_BSN = self.hook_sae_error(t_BSN - clean_BSN)
            out_BSN = self.hook_sae_output(recons_BSN + error_BSN)
        else:
            out_BSN = self.hook_sae_output(recons_BSN)
        return out_BSN.to(target.dtype).reshape(target.shape)


def _flat(act: torch.Tensor) -> torch.Tensor:
    """A per-head activation [B, S, H, K] as [B, S, H·K], as it was read for training; others as they are."""
    return act.flatten(-2) if act.ndim == 4 else act


def _per_token_like(x: torch.Tensor, target: torch.Tensor, in_hook: str, site: str) -> torch.Tensor:
    """x with target's leading dimensions (OPT's bridge hands an MLP's input as [B·S, D], its output as
    [B, S, D])."""
    if x.shape[:-1] == target.shape[:-1]:
        return x
    if x.shape[:-1].numel() != target.shape[:-1].numel():
        raise InputError(f"The transcoder reads {in_hook} of shape {list(x.shape)} but replaces {site} of shape "
                         f"{list(target.shape)}: not one input per output position.")
    return x.reshape(*target.shape[:-1], x.shape[-1])


# -- attaching ------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Attachment:
    """One spliced dictionary on one model: the permanent hooks it added to the model's hook points, the
    names it added to the model's registry, and the input a transcoder keeps between its two hooks."""

    spliced: SplicedSAE
    model: HookedModel
    registries: list[dict[str, Any]]
    handles: list[tuple[HookPoint, LensHandle]] = field(default_factory=list)
    names: dict[str, HookPoint] = field(default_factory=dict)
    kept_input: Optional[torch.Tensor] = None
    writes: int = 0
    """Times the dictionary ran (counted for the check that the model fires its site)."""

    def read(self, act: torch.Tensor) -> None:
        self.kept_input = act

    def write(self, act: torch.Tensor) -> torch.Tensor:
        self.writes += 1
        if not self.spliced.is_transcoder:
            return self.spliced(act)
        x, self.kept_input = self.kept_input, None
        if x is None:
            raise DoesNotApplyError(f"The transcoder spliced at {self.spliced.site} found no input: the model fired "
                                    f"{self.spliced.site} without firing {self.spliced.in_hook} first.")
        return self.spliced(x, act)

    def remove(self) -> None:
        """Undo everything `_attach_one` did, in reverse."""
        for registry in self.registries:
            for name, point in self.names.items():
                if registry.get(name) is point:
                    del registry[name]
        for model_point, handle in reversed(self.handles):
            _remove_hook(model_point, handle)
        for point in self.names.values():
            point.name = None
        self.kept_input = None
        self.spliced._attachment = None


class _SpliceHook:
    """The permanent hook a splice puts on a model's hook point: `write` replaces the site's activation,
    `read` keeps a transcoder's input. A class, not a closure, so that `attached` can find it."""

    def __init__(self, attachment: _Attachment, role: Literal["read", "write"]):
        self.attachment = attachment
        self.role = role

    def __call__(self, act: torch.Tensor, hook: Any) -> Optional[torch.Tensor]:
        if self.role == "read":
            self.attachment.read(act)
            return None
        return self.attachment.write(act)

    def __repr__(self) -> str:
        return f"splice.{self.role}({self.attachment.spliced.site})"


def _registries(model: HookedModel) -> list[dict[str, Any]]:
    """The dicts in which a hook name must be for the model's hooks(), run_with_hooks and run_with_cache
    to reach it."""
    if isinstance(model, HookedRootModule):
        return [model.hook_dict, model.mod_dict]
    from transformer_lens.model_bridge import BridgeCore

    if isinstance(model, BridgeCore) and isinstance(model._hook_registry, dict):
        return [model._hook_registry]  # hook_dict and mod_dict are built from it on every read
    raise DoesNotApplyError(f"Splicing dictionaries needs a TransformerLens HookedRootModule (the workbench's "
                            f"Transformer) or TransformerBridge, got {type(model).__name__}.")


def attached(model: HookedModel) -> list[SplicedSAE]:
    """The dictionaries spliced into `model` now, in the order they were attached."""
    hook_dict = model.hook_dict
    found: dict[int, SplicedSAE] = {}
    for point in {id(p): p for p in hook_dict.values()}.values():
        for handle in point.fwd_hooks:
            if isinstance(handle.user_hook, _SpliceHook) and handle.user_hook.attachment.model is model:
                spliced = handle.user_hook.attachment.spliced
                found[id(spliced)] = spliced
    order = {name: i for i, name in enumerate(hook_dict)}  # each attach appends its names to the registry
    return sorted(found.values(), key=lambda s: order[s.hook_names[0]])


def attach(model: HookedModel, saes: Dictionaries, use_error_term: bool = True, verify: bool = True
           ) -> list[SplicedSAE]:
    """Splice `saes` into `model` until `detach`: SAEs and per-layer transcoders (wrapped with
    `use_error_term`), every layer of a per-layer `Transcoders` set, or `SplicedSAE`s (each keeping its own
    setting). With `verify` (the default) each splice is checked to take effect; see the module docstring."""
    items = [saes] if isinstance(saes, (SAE, Transcoders, SplicedSAE)) else list(saes)
    spliced = _as_spliced(items, use_error_term)
    registries = _registries(model)
    describe(model)  # probed unspliced: the adapter keeps its answers for as long as the model lives
    for tc in (item for item in items if isinstance(item, Transcoders)):
        tc.check_model(model)  # layers, widths, hooks, and the model it was trained on
    _check_names(model, spliced)
    done: list[_Attachment] = []
    try:
        with torch.no_grad():
            tokens = _probe_tokens(model)
            clean = _record_sites(model, spliced, tokens) if verify else None  # 1. unspliced: fired, widths
            for s in spliced:
                done.append(_attach_one(model, s, registries))  # 2. the hooks and the names
            if clean is not None:
                _verify(model, done, tokens, clean)  # 3. exact with the error term; an edit takes effect
    except _Refused as refused:
        for a in reversed(done):
            a.remove()
        raise DoesNotApplyError(f"{_label(model)}: {refused}.") from None  # named once the model is as it was
    except BaseException:
        for a in reversed(done):
            a.remove()
        raise
    return spliced


def detach(model: HookedModel, saes: Optional[Sequence[SplicedSAE]] = None) -> list[SplicedSAE]:
    """Remove the given spliced dictionaries (default: every one) from `model`, leaving its hook_dict,
    modules and hooks as they were before they were attached. Returns those removed."""
    now = attached(model)
    chosen = now if saes is None else [s for s in now if any(s is t for t in saes)]
    for s in reversed(chosen):
        s._attachment.remove()
    return chosen


@contextmanager
def splice(model: HookedModel, saes: Dictionaries, use_error_term: bool = True, verify: bool = True
           ) -> Iterator[list[SplicedSAE]]:
    """Splice `saes` into `model` inside the `with` block (see `attach`) and yield the `SplicedSAE`s; on
    leaving, however it is left, detach them."""
    spliced = attach(model, saes, use_error_term=use_error_term, verify=verify)
    try:
        yield spliced
    finally:
        detach(model, spliced)


def _as_spliced(items: list[Any], use_error_term: bool) -> list[SplicedSAE]:
    out: list[SplicedSAE] = []
    for item in items:
        if isinstance(item, SplicedSAE):
            out.append(item)
        elif isinstance(item, Transcoders):
            out += [SplicedSAE.from_transcoders(item, l, use_error_term) for l in range(item.n_layers)]
        elif isinstance(item, SAE):
            out.append(SplicedSAE(item, use_error_term))
        else:
            raise InputError(f"splice takes SAEs, per-layer transcoders, a Transcoders set or SplicedSAEs, got "
                             f"{type(item).__name__}.")
    if not out:
        raise InputError("Nothing to splice: give at least one SAE or transcoder.")
    return out


def _check_names(model: HookedModel, spliced: list[SplicedSAE]) -> None:
    """Every hook a dictionary reads and writes exists, no two write one site, none is attached already."""
    sites: dict[str, SplicedSAE] = {}
    for s in spliced:
        if s._attachment is not None:
            raise InputError(f"This SplicedSAE is attached already (at {s.site}); detach it first, or make another "
                             "SplicedSAE of the same SAE.")
        for name in (s.in_hook, s.site):
            require_hook(model, name)
        if s.site in sites:
            raise InputError(f"Two dictionaries replace {s.site}; a hook can hold one spliced dictionary at a time. "
                             "Splice them one after the other.")
        sites[s.site] = s
        taken = [n for n in s.hook_names if n in model.hook_dict]
        if taken:
            raise InputError(f"The model already has {taken[0]}: a dictionary is spliced at {s.site} already. "
                             "Detach it first (workbench.sae.splice.detach).")
    device = next(iter(model.parameters())).device
    for s in spliced:
        if s.sae.W_dec.device != device:
            raise InputError(f"The dictionary for {s.site} is on {s.sae.W_dec.device} and the model on {device}; "
                             f"move it first (sae.to('{device}')).")


def _attach_one(model: HookedModel, s: SplicedSAE, registries: list[dict[str, Any]]) -> _Attachment:
    a = _Attachment(s, model, registries)
    s._attachment = a
    try:
        for point, name in zip(HOOK_POINTS, s.hook_names):
            hp = getattr(s, point)
            hp.name = name
            for registry in registries:
                registry[name] = hp
            a.names[name] = hp
        if s.is_transcoder:
            reader = model.hook_dict[s.in_hook]
            a.handles.append((reader, reader.add_hook(_SpliceHook(a, "read"), is_permanent=True)))
        writer = model.hook_dict[s.site]
        a.handles.append((writer, writer.add_hook(_SpliceHook(a, "write"), is_permanent=True, prepend=True)))
        hook_dict = model.hook_dict
        missing = [n for n, hp in a.names.items() if hook_dict.get(n) is not hp]
        if missing:
            raise _Refused(f"splicing does not apply: {missing[0]} was added to the model's hook registry but its "
                           "hook_dict does not show it")
    except BaseException:
        a.remove()
        raise
    return a


# -- the check that a splice takes effect -------------------------------------------------------------------
def _probe_tokens(model: HookedModel) -> torch.Tensor:
    """[2, S] fixed random tokens (S = 8, or the context if shorter) on the model's device."""
    S = int(min(8, int(model.cfg.n_ctx)))
    gen = torch.Generator().manual_seed(0)
    device = next(iter(model.parameters())).device
    return torch.randint(0, min(int(model.cfg.d_vocab), 1000), (2, S), generator=gen).to(device)


@dataclass
class _Clean:
    """The unspliced model on the probe tokens: its logits and each dictionary's input and target."""

    logits: torch.Tensor
    acts: dict[str, torch.Tensor]


def _record_sites(model: HookedModel, spliced: list[SplicedSAE], tokens: torch.Tensor) -> _Clean:
    """Run the model unspliced, keep every hook the dictionaries read and write, and check their widths."""
    names = sorted({n for s in spliced for n in (s.in_hook, s.site)})
    acts: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any, name: str) -> None:
        acts.setdefault(name, act.detach())

    # on the points themselves, as the splice will be: a bridge refuses run_with_hooks on a hook it has
    # switched off (hook_mlp_in), where this finds that it never fires
    handles = [(p, p.add_hook(lambda a, hook, n=n: keep(a, hook, n)))
               for n in names for p in [model.hook_dict[n]]]
    try:
        logits = _forward(model, lambda: model(tokens))
    finally:
        for point, handle in handles:
            _remove_hook(point, handle)
    for s in spliced:
        unfired = [n for n in (s.in_hook, s.site) if n not in acts]
        if unfired:
            raise _Refused(f"splicing at {s.site} does not apply: the model registers {unfired[0]} but never fires it")
        for name in dict.fromkeys((s.in_hook, s.site)):
            width = _flat(acts[name]).shape[-1]
            if width != s.sae.d_in:
                raise InputError(f"The dictionary for {s.site} reads and writes width d_in = {s.sae.d_in}, but "
                                 f"{name} has width {width} (shape {list(acts[name].shape)}); was it trained on "
                                 "another model or hook?")
        if s.is_transcoder:
            _per_token_like(_flat(acts[s.in_hook]), _flat(acts[s.site]), s.in_hook, s.site)
    return _Clean(logits, acts)


def _verify(model: HookedModel, done: list[_Attachment], tokens: torch.Tensor, clean: _Clean) -> None:
    """With the error term the logits are the model's own, and a latent's edit changes them (per dictionary)."""
    scale = float(clean.logits.float().abs().max().clamp_min(1.0))
    tol = max(1e-4, 8 * torch.finfo(clean.logits.dtype).eps) * scale
    kept = [a.spliced.use_error_term for a in done]
    try:
        for a in done:
            a.spliced.use_error_term, a.writes = True, 0
        logits = _forward(model, lambda: model(tokens))
        for a in done:
            if a.writes == 0:
                raise _Refused(f"splicing at {a.spliced.site} does not apply: the model registers the hook but never "
                               "runs the hooks on it")
        miss = float((logits.float() - clean.logits.float()).abs().max())
        if not miss <= tol:
            raise _Refused(f"splicing does not apply: with the error term the logits should be the model's own, but "
                           f"they differ by {miss:.3g} (tolerance {tol:.3g})")
        for a in done:
            _check_edit(model, a, tokens, clean, logits, tol)
    finally:
        for a, k in zip(done, kept):
            a.spliced.use_error_term = k


def _check_edit(model: HookedModel, a: _Attachment, tokens: torch.Tensor, clean: _Clean, spliced_logits: torch.Tensor,
                tol: float) -> None:
    """Add to the latent with the largest decoder row as much as moves the site by its typical norm; the
    logits must change by more than the identity check's tolerance."""
    s = a.spliced
    norms = s.sae.W_dec.detach().float().norm(dim=1)
    j = int(norms.argmax())
    if float(norms[j]) == 0.0:
        raise InputError(f"Every decoder row of the dictionary for {s.site} is zero: no latent can change the model.")
    size = float(_flat(clean.acts[s.site]).float().norm(dim=-1).mean())
    amount = (size if size > 0 else 1.0) / float(norms[j])

    def bump(f: torch.Tensor, hook: Any) -> torch.Tensor:
        f = f.clone()
        f[..., j] += amount
        return f

    edited = _forward(model, lambda: model.run_with_hooks(tokens, fwd_hooks=[(s.full_name("hook_sae_acts_post"),
                                                                              bump)]))
    change = float((edited.float() - spliced_logits.float()).abs().max())
    if not change > tol:
        raise _Refused(f"splicing at {s.site} does not apply: an edit of its latents does not change the model's "
                       f"output (by {change:.3g}; the model reports this activation after using it)")


def _forward(model: HookedModel, run: Any) -> torch.Tensor:
    """run() in eval mode (so that dropout cannot tell two runs apart), the mode restored after."""
    training = model.training  # both kinds of model are nn.Modules (`_registries`)
    if training:
        model.eval()
    try:
        return run()
    finally:
        if training:
            model.train()


def _remove_hook(point: HookPoint, handle: LensHandle) -> None:
    """Remove one hook from a hook point, leaving its other hooks (permanent or not) alone."""
    handle.hook.remove()
    point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


class _Refused(Exception):
    """A check failed; `attach` detaches everything, then raises DoesNotApplyError naming the architecture
    (which `describe` must not probe while a half-checked splice is in place)."""


def _label(model: HookedModel) -> str:
    """How errors name the architecture ('gpt2 (GPT2LMHeadModel)', 'workbench')."""
    return describe(model).label
