"""Whether an edit at a hook point takes effect: the check every intervention makes before it
reports a number.

    require_edit(model, "blocks.0.attn.hook_pattern", "activation patching")

runs the model once on a few fixed tokens with the hook's activation perturbed and refuses with
`DoesNotApplyError` where the hook never fires or where the perturbation does not change the
logits. The second happens where a model reports an activation after using it: a TransformerBridge
around OPT or GPT-J reports its attention pattern (and scores) that way, so patching them would
return the unpatched model's numbers. The answer is kept per hook point object, so a hook point
added later (a spliced SAE's) is checked when it is first used.
"""

from __future__ import annotations

import difflib
import weakref
from typing import Any

import torch

from workbench.adapter.architecture import DoesNotApplyError
from workbench.adapter.probe import _probe_tokens, describe
from workbench.errors import InputError
from workbench.model.hooked import HookedModel

_CHECKED: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()  # hook point -> problem ('' if none)


def require_hook(model: HookedModel, name: str) -> Any:
    """The hook point `name`, or an InputError naming the closest hook names the model has."""
    point = model.hook_dict.get(name)
    if point is None:
        close = difflib.get_close_matches(name, list(model.hook_dict), n=3)
        raise InputError(f"The model has no hook {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "."))
    return point


def require_edit(model: HookedModel, name: str, what: str) -> None:
    """Raise DoesNotApplyError, naming the architecture, unless an edit at hook `name` was seen to
    change the model's logits (checked once per hook point)."""
    point = require_hook(model, name)
    if point not in _CHECKED:
        _CHECKED[point] = _edit_problem(model, name)
    if _CHECKED[point]:
        raise DoesNotApplyError(f"{describe(model).label}: {what} at {name} does not apply: {_CHECKED[point]}.")


@torch.no_grad()
def _edit_problem(model: HookedModel, name: str) -> str:
    """'' where perturbing the activation at `name` changes the logits; otherwise why not."""
    tokens = _probe_tokens(model, describe(model))
    fired = []

    def perturb(act: torch.Tensor, hook: Any) -> torch.Tensor:
        fired.append(True)
        gen = torch.Generator(device=act.device).manual_seed(0)
        noise = torch.randn(act.shape, generator=gen, device=act.device, dtype=torch.float32)
        return (act.float() + noise * (act.float().std() + 1.0)).to(act.dtype)

    clean = model(tokens)
    edited = model.run_with_hooks(tokens, fwd_hooks=[(name, perturb)])
    if not fired:
        return "the model registers this hook but never fires it"
    if torch.equal(clean, edited):
        return "an edit there does not change the model's output (the model reports this activation after using it)"
    return ""
