"""Activation patching: run the model on one prompt of each pair with one piece of an activation
taken from the run on the other, and read the metric. Denoising runs the corrupt prompt with a
clean piece (which pieces are sufficient to restore the behaviour); noising runs the clean prompt
with a corrupt piece (which are necessary).

    r = activation_patch(model, task, "resid_pre", by="position")      # every (layer, position)
    r = activation_patch(model, task, "z", by="head")                  # every head, all positions
    r = activation_patch(model, task, "blocks.1.hook_resid_post.hook_sae_acts_post", by="feature")

Many patches run as one batch: the batch holds k copies of the B prompts, and the hook writes
patch j's piece into copy j only, so a forward pass does the work of k of TransformerLens's
`patching` calls. Before any number is computed, each hook is checked to take effect
(`workbench.adapter.require_edit`) and to fire on every batch.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench import adapter
from workbench.adapter import DoesNotApplyError
from workbench.cache.collect import run_collect
from workbench.cache.tasks import PatchingTask
from workbench.compute.patching.metrics import METRICS, Metric, normalize, resolve_metric
from workbench.compute.patching.result import PatchingResult
from workbench.compute.patching.sites import SITES, By, Patch, axes_of, layout_of, make_patches, site_hooks
from workbench.errors import InputError
from workbench.model.hooked import HookedModel


def _device(model: HookedModel) -> torch.device:
    return next(model.parameters()).device


def position_labels(model: HookedModel, task: PatchingTask) -> list[str]:
    """'p tok' for each position of the first clean prompt, 'p tok→tok′' where its corrupt twin differs."""
    clean = adapter.token_strings(model, task.clean[0])
    corrupt = adapter.token_strings(model, task.corrupt[0])
    return [f"{p} {c}" if c == x else f"{p} {c}→{x}" for p, (c, x) in enumerate(zip(clean, corrupt))]


@dataclass(frozen=True, eq=False)
class Route:
    """How a batch of patches runs, where the model was seen to give the same logits that way:
    from the layer of its earliest patch (`start_at_layer`, on the base run's residual stream) and
    to the logits at the read positions only (`stop_at_layer` = n_layers, then ln_final and the
    unembedding on those positions). A patch at layer l changes nothing before l, and a metric of
    the task's read positions needs no other logits."""

    resid: Optional[list[torch.Tensor]]
    """The base run's blocks.l.hook_resid_pre for every l, or None: every run starts at the embedding."""
    tail: bool
    """Logits only at the read positions (a metric of METRICS): the run stops at the last block's
    hook_resid_post."""


class _Stop(Exception):
    """Ends a forward pass at the last block's output, which a tail Route has kept."""


def _final_resid(model: HookedModel, inputs: torch.Tensor, hooks: list, **kwargs) -> torch.Tensor:
    """The residual stream after the last block, on a run with `hooks`, stopping there."""
    kept: list[torch.Tensor] = []

    def stop(act: torch.Tensor, hook) -> None:
        kept.append(act)
        raise _Stop

    try:
        last = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post"
        model.run_with_hooks(inputs, fwd_hooks=[*hooks, (last, stop)], **kwargs)
    except _Stop:
        return kept[0]
    raise DoesNotApplyError(f"{adapter.describe(model).label}: the last block's hook_resid_post did not fire.")


def _layer_of(hook: str) -> int:
    """The block a hook is in; -1 for a hook outside the blocks (which a Route cannot shorten)."""
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else -1


def _read_logits(model: HookedModel, resid_RSD: torch.Tensor, task: PatchingTask) -> torch.Tensor:
    """Logits [R, P, V] at the task's read positions from the residual stream after the last block."""
    pos = task.position.to(resid_RSD.device)[torch.arange(len(resid_RSD), device=resid_RSD.device) % task.n_prompts]
    x = resid_RSD.gather(1, pos[..., None].expand(-1, -1, resid_RSD.shape[-1]))
    return model.unembed(model.ln_final(x))


def _compact(task: PatchingTask) -> PatchingTask:
    """The task as its metric sees logits already taken at the read positions."""
    P = task.position.shape[1]
    pos = torch.arange(P, device=task.position.device).expand(task.n_prompts, -1)
    return PatchingTask(task.name, pos, pos, pos, task.answer, task.wrong)


@torch.no_grad()
def fast_route(model: HookedModel, task: PatchingTask, base: torch.Tensor, metric: Metric) -> Route:
    """The Route this model, task and metric allow: each shortcut is used only where it reproduces
    the model's own logits on the base prompts (to 1e-4 of their scale; starting at a layer is
    checked from the middle layer and from the last)."""
    L = int(model.cfg.n_layers)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
    if L == 0 or any(n not in model.hook_dict for n in [*names, f"blocks.{L - 1}.hook_resid_post"]):
        return Route(None, False)
    logits, resid = run_collect(model, base, names)
    at = logits.gather(1, task.position[..., None].expand(-1, -1, logits.shape[-1])).float()
    tol = 1e-4 * (1.0 + float(at.abs().max()))
    resid_list: Optional[list[torch.Tensor]] = [resid[n] for n in names]
    same = True
    for start in sorted({L // 2, L - 1} - {0}):  # checked from the middle layer and from the last
        try:
            fired: list[int] = []
            out = model.run_with_hooks(resid[names[start]], start_at_layer=start,
                                       fwd_hooks=[(names[start], lambda a, hook, fired=fired: fired.append(1))])
            same = same and bool(fired) and out.shape == logits.shape and \
                float((out.float() - logits.float()).abs().max()) < tol
        except Exception:  # a model without start_at_layer
            same = False
    if not same:
        resid_list = None
    tail = False
    if any(metric is m for m in METRICS.values()) and hasattr(model, "ln_final") and hasattr(model, "unembed"):
        try:
            tail = float((_read_logits(model, _final_resid(model, base, []), task).float() - at).abs().max()) < tol
        except Exception:  # final modules that do not take the residual stream alone
            tail = False
    return Route(resid_list, tail)


class Setup:
    """What every patching method starts from: the metric, the hooks of the site (each checked to
    take effect), the base and source prompts by direction, the source run's activations and the
    two unpatched metric values."""

    def __init__(self, model: HookedModel, task: PatchingTask, site: str, by: By, direction: str,
                 metric: "Metric | str", layers: Optional[Sequence[int]], features: Optional[Sequence[int]],
                 what: str) -> None:
        if direction not in ("denoise", "noise"):
            raise InputError(f"direction must be 'denoise' (clean into corrupt) or 'noise' (corrupt into clean), "
                             f"got {direction!r}.")
        self.model, self.task, self.site, self.by, self.direction = model, task.to(_device(model)), site, by, direction
        self.metric, self.metric_name = resolve_metric(metric, task)
        self.hooks, hook_labels = site_hooks(model, site, layers)
        for hook in self.hooks:
            adapter.require_edit(model, hook, what)
        t = self.task
        self.base, source = (t.corrupt, t.clean) if direction == "denoise" else (t.clean, t.corrupt)
        with torch.no_grad():
            source_logits, self.source = run_collect(model, source, self.hooks)
            base_logits = model(self.base)
        m_source = float(self.metric(source_logits, t).mean())
        m_base = float(self.metric(base_logits, t).mean())
        self.clean, self.corrupt = (m_source, m_base) if direction == "denoise" else (m_base, m_source)
        shapes = [tuple(self.source[h].shape[1:]) for h in self.hooks]
        self.position_labels = position_labels(model, t)
        self.patches = make_patches(self.hooks, hook_labels, shapes, by, self.position_labels, features)
        self.axes = axes_of(by, layout_of(self.hooks[0]), "{l}" in SITES.get(site, site))
        self.labels = _axis_labels(self.axes, self.patches)
        self.route = fast_route(model, t, self.base, self.metric)

    def finish(self, raw: np.ndarray, normalized: bool, method: str, check=None) -> PatchingResult:
        """A PatchingResult of the raw metric per patch (normalised if asked)."""
        values = normalize(torch.as_tensor(raw), self.clean, self.corrupt).numpy() if normalized else raw
        return PatchingResult(method, self.task.name, self.site, self.by, self.direction, self.metric_name,
                              normalized, self.clean, self.corrupt,
                              np.asarray(values, dtype=np.float64).reshape([len(lab) for lab in self.labels]),
                              self.axes, self.labels, check)


def _axis_labels(axes: tuple[str, ...], patches: list[Patch]) -> tuple[tuple[str, ...], ...]:
    """Each axis's labels in first-seen order; a single hook's patches carry its name first, which
    is dropped when the result has no layer axis."""
    skip = 0 if axes and axes[0] == "layer" else 1
    out = []
    for a in range(len(axes)):
        seen: dict[str, None] = {}
        for p in patches:
            seen.setdefault(p.label[a + skip], None)
        out.append(tuple(seen))
    if int(np.prod([len(lab) for lab in out])) != len(patches):
        raise AssertionError("patches do not fill the result's axes")
    return tuple(out)


@torch.no_grad()
def run_patches(model: HookedModel, task: PatchingTask, base: torch.Tensor, source: dict[str, torch.Tensor],
                patches: Sequence[Patch], metric: Metric, batch_rows: int = 64, desc: str = "patching",
                progress: bool = True, route: Optional[Route] = None) -> np.ndarray:
    """The metric (mean over the task's prompts) of a run on `base` with each patch's piece taken
    from `source` ({hook: [B, ...]}), for every patch; k = batch_rows // B patches per forward pass,
    a batch holding patches of one layer, run by `route` where given."""
    B = task.n_prompts
    k_max = max(1, batch_rows // B)
    out = np.empty(len(patches))
    chunks, start = [], 0
    while start < len(patches):  # batches of consecutive patches at one layer (patches come layer by layer)
        end = start + 1
        while end < len(patches) and end - start < k_max and \
                _layer_of(patches[end].hook) == _layer_of(patches[start].hook):
            end += 1
        chunks.append(range(start, end))
        start = end
    compact = _compact(task) if route is not None and route.tail else None
    for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress, leave=False):
        start, k = chunk.start, len(chunk)
        by_hook: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
        for j, i in enumerate(chunk):
            by_hook[patches[i].hook].append((j, patches[i].index))
        fired: set[str] = set()

        def writer(name: str, items: list[tuple[int, tuple]], k: int = k, fired: set[str] = fired):
            src = source[name]

            def write(act: torch.Tensor, hook) -> torch.Tensor:
                fired.add(name)
                act = act.clone(memory_format=torch.contiguous_format)
                view = act.view(k, B, *act.shape[1:])
                for j, idx in items:
                    view[(j, slice(None), *idx)] = src[(slice(None), *idx)].to(act.dtype)
                return act
            return write

        hooks = [(h, writer(h, it)) for h, it in by_hook.items()]
        layer = _layer_of(patches[start].hook)
        kwargs: dict = {}
        inputs = base.repeat(k, 1)
        if route is not None and route.resid is not None and layer > 0:
            inputs, kwargs = route.resid[layer].repeat(k, 1, 1), {"start_at_layer": layer}
        if compact is not None and layer >= 0:
            logits, scored = _read_logits(model, _final_resid(model, inputs, hooks, **kwargs), task), compact
        else:
            logits, scored = model.run_with_hooks(inputs, fwd_hooks=hooks, **kwargs), task
        if fired != set(by_hook):
            missing = sorted(set(by_hook) - fired)
            raise DoesNotApplyError(f"{adapter.describe(model).label}: patching does not apply: {missing[0]} did not "
                                    "fire on the batched run, so the patch was not made.")
        out[start:start + k] = metric(logits, scored).float().view(k, B).mean(1).cpu().numpy()
    return out


def activation_patch(model: HookedModel, task: PatchingTask, site: str = "resid_pre", by: By = "position", *,
                     direction: str = "denoise", metric: "Metric | str" = "auto", normalized: bool = True,
                     layers: Optional[Sequence[int]] = None, features: Optional[Sequence[int]] = None,
                     batch_rows: int = 64, progress: bool = True) -> PatchingResult:
    """The metric after patching each piece of `site` (cut `by` layer, position, head,
    head_position or feature), from the clean run into the corrupt one (`direction="denoise"`) or
    the reverse ("noise"). `metric` is a name of `METRICS`, "auto" (logit_diff where the task has
    wrong answers, else answer_logprob) or a function (logits [R, S, V], task) -> [R]. With
    `normalized`, 1 is the clean run's metric and 0 the corrupt run's. `batch_rows` bounds the rows
    of one forward pass (patches × prompts)."""
    setup = Setup(model, task, site, by, direction, metric, layers, features, "activation patching")
    raw = run_patches(model, setup.task, setup.base, setup.source, setup.patches, setup.metric, batch_rows,
                      desc=f"activation patching {site} by {by}", progress=progress, route=setup.route)
    return setup.finish(raw, normalized, "activation patching")
