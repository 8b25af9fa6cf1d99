"""Steering: add α·v to a model's activations at one hook and read what changes, with the controls
that tell a real effect from an artefact.

    v = mean_difference(model, "blocks.3.hook_resid_post", to_prompts, from_prompts)   # ActAdd / CAA
    with steer(model, "blocks.3.hook_resid_post", v, alpha=4.0, positions="last"):
        logits = model(tokens)
    result = steering_sweep(model, "blocks.3.hook_resid_post", v, [0.5, 1, 2], task, text_rows)
    generate_steered(model, "def f(x):", "blocks.1.hook_resid_pre", v, alpha=2.0, max_new_tokens=20)

Shape letters: B batch, S positions of one forward pass, D the hook's width (d_model at a residual
hook), H heads, K d_head, A steering strengths (alphas), N random control vectors, R rows of text,
T tokens per row.

Vectors. `mean_difference` (ActAdd's one pair, CAA's many pairs: the mean activation of the
prompts to steer towards minus that of the prompts to steer away from), `feature_direction` (an SAE
or transcoder feature's decoder row), `direction` (any tensor, a probe's direction or one's own,
rescaled as asked), and `random_like` (the control: a random direction of the same norm).

Positions. A hook sees [B, S, ...] with positions in dim 1 (attention patterns [B, H, S, T] are not
steering sites). `positions` picks where α·v is added: None or "all" (every position), "last", a list
of positions (negative ones count from the end; an empty list adds nowhere), or per-row positions
[B] or [B, P] (a task's read positions, for prompts padded on the right).

Generation. With a KV cache, the model runs the prompt once and then one new token per forward pass,
so a hook sees [B, S_prompt, ...] and then [B, 1, ...]; without a cache it re-runs the whole sequence
each step. `generation` says how to read that:

- None: every forward pass is a sequence of its own and `positions` index it (during cached
  generation "last" and "all" then also steer every new token, each being the last and only
  position of its pass).
- "prompt_only" (ActAdd, Turner et al. 2023): the first pass is the prompt; `positions` index the
  prompt and tokens generated after it are never steered (they read the steered prompt through
  attention).
- "prompt_and_new" (CAA, Rimsky et al. 2024): as "prompt_only", and every generated token is
  steered too; with `positions=[]` only the generated tokens are (CAA's "after the prompt").

In both generation modes a prompt padded on the left is indexed as padded, and one steering context
follows one `generate` call (`SteeringHook.reset` starts another).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from workbench.adapter import require_edit, require_hook
from workbench.cache.collect import run_collect
from workbench.cache.tasks import PatchingTask
from workbench.compute.patching.metrics import Metric, resolve_metric
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.strict_json import finite, json_array, ratio

Positions = Union[None, Literal["all", "last"], Sequence[int], torch.Tensor]
Generation = Optional[Literal["prompt_only", "prompt_and_new"]]
GENERATION_MODES = (None, "prompt_only", "prompt_and_new")
NOT_STEERABLE = ("hook_pattern", "hook_attn_scores")  # [B, H, S, T]: positions are not in dim 1

_WIDTHS: "weakref.WeakKeyDictionary[Any, tuple[int, ...]]" = weakref.WeakKeyDictionary()  # hook point -> shape[2:]


# -- the hook -------------------------------------------------------------------------------------
class SteeringHook:
    """The forward hook that adds α·v at the chosen positions (see the module docstring for
    `positions` and `generation`). It keeps how many positions of the sequence it has seen, which
    the generation modes need to tell the prompt from the tokens generated after it."""

    def __init__(self, vector: torch.Tensor, alpha: float, positions: Positions = None,
                 generation: Generation = None, head: Optional[int] = None):
        self.vector = _checked_vector(vector)
        self.alpha = _checked_alpha(alpha)
        self.positions = _checked_positions(positions)
        if generation not in GENERATION_MODES:
            raise InputError(f"generation must be one of {GENERATION_MODES}, got {generation!r}.")
        if isinstance(self.positions, torch.Tensor) and generation is not None:
            raise InputError("Per-row positions (a tensor) index the rows of one forward pass; in generation, "
                             "give 'all', 'last' or a list of prompt positions.")
        if head is not None and (isinstance(head, bool) or not isinstance(head, int) or head < 0):
            raise InputError(f"head must be a head index ≥ 0 or None, got {head!r}.")
        self.generation = generation
        self.head = head
        self.calls = 0
        """Forward passes seen since the last reset."""
        self.prompt_len: Optional[int] = None
        """Positions of the first pass (the prompt) in a generation mode; None before it."""
        self.seen = 0
        """Positions of the sequence run so far (generation modes)."""
        self._delta: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the sequence: the next forward pass is a new prompt."""
        self.calls, self.prompt_len, self.seen = 0, None, 0

    def __call__(self, act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if act.ndim < 3:
            raise InputError(f"A steering hook needs an activation [batch, pos, ...]; {_name(hook)} gives "
                             f"{tuple(act.shape)}.")
        mask_BS = self.mask(act.shape[0], act.shape[1], act.device)
        self.calls += 1
        delta = self._delta_on(act)
        if self.head is None:
            if tuple(delta.shape) != tuple(act.shape[2:]):
                raise InputError(f"The steering vector has shape {tuple(self.vector.shape)}; {_name(hook)} is "
                                 f"{tuple(act.shape[2:])} wide per position.")
            return act + mask_BS.view(*mask_BS.shape, *([1] * delta.ndim)).to(act.dtype) * delta
        if act.ndim != 4 or self.head >= act.shape[2] or tuple(delta.shape) != (act.shape[3],):
            raise InputError(f"Steering head {self.head} adds a [{act.shape[-1]}] vector at a per-head site "
                             f"[batch, pos, heads, d_head]; {_name(hook)} gives {tuple(act.shape)} and the vector "
                             f"is {tuple(self.vector.shape)}.")
        out = act.clone()
        out[:, :, self.head] += mask_BS[..., None].to(act.dtype) * delta
        return out

    def mask(self, B: int, S: int, device: torch.device) -> torch.Tensor:
        """[B, S] or [1, S]: True where this forward pass of S positions is steered (advances the
        sequence count in the generation modes)."""
        if self.generation is None:
            return _select(self.positions, B, S, S, device)
        if self.prompt_len is None:
            self.prompt_len, start = S, 0
        elif S == 1:
            start = self.seen  # a KV-cached step: one new position after those seen
        else:
            start = 0  # no cache: the whole sequence again, prompt first
        P = self.prompt_len
        absolute = torch.arange(start, start + S, device=device)
        prompt_mask = _select(self.positions, 1, P, P, device)[0]
        in_prompt = absolute < P
        mask = torch.zeros(S, dtype=torch.bool, device=device)
        mask[in_prompt] = prompt_mask[absolute[in_prompt]]
        if self.generation == "prompt_and_new":
            mask |= ~in_prompt
        self.seen = start + S
        return mask[None]

    def _delta_on(self, act: torch.Tensor) -> torch.Tensor:
        key = (act.device, act.dtype)
        if key not in self._delta:
            self._delta[key] = (self.alpha * self.vector).to(device=act.device, dtype=act.dtype)
        return self._delta[key]


def steering_hook(vector: torch.Tensor, alpha: float, positions: Positions = None, *, generation: Generation = None,
                  head: Optional[int] = None) -> SteeringHook:
    """A hook adding `alpha * vector` at `positions` (for `model.hooks(fwd_hooks=[(name, hook)])`).
    `vector` is [D] for a site [B, S, D] (or the site's shape past [B, S]); with `head`, [K] added
    to that head of a per-head site [B, S, H, K]. It checks nothing about the model: `steer` does."""
    return SteeringHook(vector, alpha, positions, generation, head)


@contextmanager
def steer(model: HookedModel, hook_name: str, vector: torch.Tensor, alpha: float, positions: Positions = None, *,
          generation: Generation = None, head: Optional[int] = None) -> Iterator[SteeringHook]:
    """Within the block, the model adds `alpha * vector` at hook `hook_name` and `positions` on
    every forward pass (and every step of `generate`); the hook is removed on exit, whatever happens.

    Checked first: the hook exists, the vector is finite and fits the site's width, and an edit at
    the site changes the logits (`workbench.adapter.require_edit`; DoesNotApplyError where not)."""
    hook = SteeringHook(vector, alpha, positions, generation, head)
    check_site(model, hook_name, hook.vector, head)
    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        yield hook


def check_site(model: HookedModel, hook_name: str, vector: torch.Tensor, head: Optional[int] = None) -> None:
    """An error unless `vector` can steer the model at `hook_name`: a known hook, positions in dim 1,
    the vector as wide as the site (per head with `head`), and an edit there seen to take effect."""
    point = require_hook(model, hook_name)
    if hook_name.rsplit(".", 1)[-1] in NOT_STEERABLE:
        raise InputError(f"{hook_name} is an attention pattern [batch, heads, query, key]; steering adds a vector "
                         "per position. Steer hook_z, hook_v, hook_q or hook_k per head, or a residual site.")
    if point not in _WIDTHS:
        tokens = torch.zeros(1, 3, dtype=torch.long, device=_device(model))
        with torch.no_grad():
            _, acts = run_collect(model, tokens, keep=[hook_name], stop_early=True)
        act = acts[hook_name]
        if act.ndim < 3 or act.shape[1] != tokens.shape[1]:
            raise InputError(f"{hook_name} gives {tuple(act.shape)} on 3 tokens, not [batch, pos, ...]: there is no "
                             "position to add a vector at.")
        _WIDTHS[point] = tuple(act.shape[2:])
    width = _WIDTHS[point]
    vector = _checked_vector(vector)
    if head is None and tuple(vector.shape) != width:
        raise InputError(f"The steering vector has shape {tuple(vector.shape)}, but {hook_name} is {width} wide per "
                         "position" + (f" (d_model = {model.cfg.d_model})." if width == (model.cfg.d_model,) else "."))
    if head is not None and (len(width) != 2 or head >= width[0] or tuple(vector.shape) != width[1:]):
        raise InputError(f"Steering head {head} at {hook_name} needs a per-head site [batch, pos, heads, d_head] "
                         f"and a [d_head] vector; the site is {width} per position and the vector "
                         f"{tuple(vector.shape)}.")
    require_edit(model, hook_name, "steering")


# -- vectors --------------------------------------------------------------------------------------
@torch.no_grad()
def mean_difference(model: HookedModel, hook: str, positive_prompts: Union[Sequence[str], torch.Tensor],
                    negative_prompts: Union[Sequence[str], torch.Tensor], position: int = -1) -> torch.Tensor:
    """[D] (the site's shape past [B, S]) float32: the mean activation at `hook` and `position` of
    the positive prompts minus that of the negative ones (ActAdd with one pair, CAA with many).
    Adding it with α = 1 moves the mean negative activation onto the mean positive one.

    Prompts are strings (tokenized with the model's BOS rule) or token ids [B, S]; `position`
    counts within each prompt, negative from its own last token (-1: the last)."""
    pos = _mean_activation(model, hook, positive_prompts, position, "positive_prompts")
    neg = _mean_activation(model, hook, negative_prompts, position, "negative_prompts")
    return pos - neg


def feature_direction(sae: torch.nn.Module, index: int, normalize: bool = False) -> torch.Tensor:
    """[D] float32: feature `index`'s decoder row `W_dec[index]` of an SAE or of one layer's
    transcoder (`Transcoders.per_layer[l]`, which writes to that layer's `hook_mlp_out`); scaled to
    unit norm with `normalize`. Steer it at the site the dictionary writes to."""
    W_dec = getattr(sae, "W_dec", None)
    if not isinstance(W_dec, torch.Tensor) or W_dec.ndim != 2:
        raise InputError(f"feature_direction needs a dictionary with a decoder W_dec [features, d_in] (an SAE or a "
                         f"per-layer transcoder), not a {type(sae).__name__}.")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < W_dec.shape[0]:
        raise InputError(f"Feature index must be in [0, {W_dec.shape[0]}), got {index!r}.")
    row = W_dec[index].detach().float().clone()
    return direction(row, 1.0) if normalize else _checked_vector(row)


def direction(vector: Any, norm: Optional[float] = None) -> torch.Tensor:
    """A steering vector from any tensor or array (a probe's direction, one's own): a detached
    float32 copy, rescaled to `norm` (1.0 for a unit vector) when given. Errors on non-finite values,
    and on a zero vector asked to take a norm."""
    v = _checked_vector(vector)
    if norm is None:
        return v
    if not (isinstance(norm, (int, float)) and not isinstance(norm, bool) and math.isfinite(norm) and norm > 0):
        raise InputError(f"norm must be a positive number or None, got {norm!r}.")
    length = float(v.norm())
    if length == 0:
        raise InputError("The vector is zero, so it has no direction to rescale.")
    return v * (norm / length)


def random_like(vector: torch.Tensor, seed: int) -> torch.Tensor:
    """A random direction (isotropic Gaussian, drawn with its own generator from `seed`) of the same
    shape and norm as `vector`, float32 on its device: the control a steering effect is set against."""
    v = _checked_vector(vector)
    gen = torch.Generator().manual_seed(int(seed))
    r = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    return (r * (float(v.double().norm()) / float(r.norm()))).float().to(v.device)


# -- the sweep ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SteeringResult:
    """A dose-response over α at one hook: the target metric and the next-token loss on ordinary text,
    for the steering vector and for N random vectors of the same norm. Arrays are [A] (steered) and
    [N, A] (one row per control seed)."""

    hook: str
    positions: str
    """Where the vector was added for the target metric, in words."""
    cost_positions: str
    """Where it was added on the ordinary text."""
    metric: str
    alphas: np.ndarray
    """[A] steering strengths."""
    baseline: float
    """The metric unsteered (α = 0)."""
    target: np.ndarray
    """[A] the metric steered by α·v."""
    ce_cost: np.ndarray
    """[A] mean next-token loss on the text steered by α·v minus unsteered (nats per token)."""
    random_target: np.ndarray
    """[N, A] the metric steered by α·r for each random vector r."""
    random_ce_cost: np.ndarray
    """[N, A] the loss increase for each random vector."""
    seeds: tuple[int, ...]
    base_loss: float
    """Mean next-token loss on the text, unsteered."""
    vector_norm: float
    act_norm: float
    """Mean norm of the activation at the hook on the text (positions after the first), for scale:
    α·‖v‖ / act_norm is the edit's size relative to what is there."""
    text: str
    """The ordinary text the cost is measured on (rows × tokens)."""

    def __post_init__(self) -> None:
        A = len(self.alphas)
        if self.target.shape != (A,) or self.ce_cost.shape != (A,):
            raise ValueError(f"target {self.target.shape} and ce_cost {self.ce_cost.shape} must be [{A}]")
        if self.random_target.shape != (len(self.seeds), A) or self.random_ce_cost.shape != self.random_target.shape:
            raise ValueError(f"random curves {self.random_target.shape}, {self.random_ce_cost.shape} must be "
                             f"[{len(self.seeds)}, {A}]")

    @property
    def effect(self) -> np.ndarray:
        """[A] the change in the metric steering makes (target - baseline)."""
        return self.target - self.baseline

    @property
    def random_effect(self) -> np.ndarray:
        """[N, A] the change each random vector makes."""
        return self.random_target - self.baseline

    @property
    def random_effect_mean(self) -> np.ndarray:
        """[A] mean over the random vectors of the change they make."""
        return self.random_effect.mean(0)

    @property
    def random_effect_spread(self) -> np.ndarray:
        """[A] standard deviation over the random vectors (0 for one vector)."""
        return self.random_effect.std(0, ddof=1) if len(self.seeds) > 1 else np.zeros(len(self.alphas))

    @property
    def random_ce_mean(self) -> np.ndarray:
        return self.random_ce_cost.mean(0)

    @property
    def random_ce_spread(self) -> np.ndarray:
        return self.random_ce_cost.std(0, ddof=1) if len(self.seeds) > 1 else np.zeros(len(self.alphas))

    @property
    def relative_size(self) -> np.ndarray:
        """[A] |α|·‖v‖ / the activation's mean norm."""
        return np.abs(self.alphas) * self.vector_norm / max(self.act_norm, 1e-12)

    def selectivity(self) -> np.ndarray:
        """[A] |steering effect| over the mean |effect| of the random vectors at each α (NaN where that
        mean is below 1e-9)."""
        rand = np.abs(self.random_effect).mean(0)
        return np.array([np.nan if r < 1e-9 else abs(e) / r for e, r in zip(self.effect, rand)])

    def summary(self) -> str:
        i = int(np.argmax(np.abs(self.alphas)))
        return (f"{self.metric} at {self.hook} ({self.positions}): α = {self.alphas[i]:g} moves it by "
                f"{self.effect[i]:+.3g} (random vectors of the same norm: {self.random_effect_mean[i]:+.3g} ± "
                f"{self.random_effect_spread[i]:.2g}) at a loss cost of {self.ce_cost[i]:+.3g} nats/token "
                f"(random: {self.random_ce_mean[i]:+.3g}).")

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: every number finite or None."""
        i = int(np.argmax(np.abs(self.alphas)))
        rand_abs = float(np.abs(self.random_effect[:, i]).mean())
        return {"hook": self.hook, "positions": self.positions, "cost_positions": self.cost_positions,
                "metric": self.metric, "alphas": json_array(self.alphas, 6), "baseline": finite(self.baseline),
                "target": json_array(self.target, 6), "effect": json_array(self.effect, 6),
                "ce_cost": json_array(self.ce_cost, 6), "seeds": list(self.seeds),
                "random_target": json_array(self.random_target, 6),
                "random_effect_mean": json_array(self.random_effect_mean, 6),
                "random_effect_spread": json_array(self.random_effect_spread, 6),
                "random_ce_cost": json_array(self.random_ce_cost, 6),
                "random_ce_mean": json_array(self.random_ce_mean, 6),
                "base_loss": finite(self.base_loss), "vector_norm": finite(self.vector_norm),
                "act_norm": finite(self.act_norm), "relative_size": json_array(self.relative_size, 6),
                "text": self.text,
                "selectivity_at_largest_alpha": ratio(abs(float(self.effect[i])), rand_abs, 1e-9)}


Target = Union[PatchingTask, Callable[[HookedModel], float]]


@torch.no_grad()
def steering_sweep(model: HookedModel, hook: str, vector: torch.Tensor, alphas: Sequence[float],
                   task_or_metric: Target, text_rows: torch.Tensor, control_seeds: Sequence[int] = (0, 1, 2, 3, 4), *,
                   positions: Positions = None, metric: Union[Metric, str] = "auto", cost_positions: Positions = "all",
                   generation: Generation = None, head: Optional[int] = None, batch_rows: int = 16) -> SteeringResult:
    """The dose-response of steering along `vector` at `hook`, with its cost and its control.

    For each α: the target metric with α·v added at `positions`, where the target is a
    `PatchingTask` (its clean prompts, read with `metric`: logit_diff where the task has wrong
    answers, else answer_logprob) or a function model → float called inside the steering context
    (one that generates text, say, with `generation` as in `steer`); and the next-token loss on
    `text_rows` [R, T] with α·v added at `cost_positions`, minus the unsteered loss, averaged over
    the predictions at and after the first steered position (the only ones the edit can reach). Then
    both again for a random vector of the same norm per seed in `control_seeds` (`random_like`)."""
    hook_v = SteeringHook(vector, 0.0, positions, generation, head)
    v = hook_v.vector
    alphas_A = np.array([_checked_alpha(a) for a in alphas], dtype=float)
    if alphas_A.ndim != 1 or not len(alphas_A):
        raise InputError("alphas must be a non-empty list of numbers.")
    seeds = tuple(int(s) for s in control_seeds)
    if not seeds:
        raise InputError("steering_sweep reports a random control beside every curve; give at least one seed in "
                         "control_seeds.")
    if not isinstance(text_rows, torch.Tensor) or text_rows.ndim != 2 or text_rows.shape[1] < 2 or \
            text_rows.dtype not in (torch.int32, torch.int64):
        raise InputError("text_rows must be token ids [rows, tokens] with at least 2 tokens per row (e.g. "
                         "workbench.cache.rows.held_out_text(model)[0]).")
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise InputError(f"batch_rows must be a positive integer, got {batch_rows!r}.")
    if isinstance(cost_positions, torch.Tensor):
        raise InputError("cost_positions index every row of the ordinary text alike: give 'all', 'last' or a list.")
    _checked_positions(cost_positions)
    check_site(model, hook, v, head)
    read, metric_name = _target_reader(model, task_or_metric, metric)
    rows_RT = text_rows.to(_device(model))

    # Phase 1: unsteered, the baseline metric and loss, and the activation's size at the hook.
    baseline = read()
    base_loss, act_norm = _text_loss(model, rows_RT, None, batch_rows, hook)

    # Phase 2: the vector and each control, at each α.
    def curves(vec: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        target, cost = np.empty(len(alphas_A)), np.empty(len(alphas_A))
        for i, a in enumerate(alphas_A):
            if a == 0:
                target[i], cost[i] = baseline, 0.0
                continue
            with steer(model, hook, vec, float(a), positions, generation=generation, head=head):
                target[i] = read()
            steered = SteeringHook(vec, float(a), cost_positions, None, head)
            cost[i] = _text_loss(model, rows_RT, (hook, steered), batch_rows)[0] - base_loss
        return target, cost

    target, ce_cost = curves(v)
    controls = [curves(random_like(v, s)) for s in seeds]
    return SteeringResult(hook=hook, positions=describe_positions(positions, generation),
                          cost_positions=describe_positions(cost_positions, None), metric=metric_name,
                          alphas=alphas_A, baseline=float(baseline), target=target, ce_cost=ce_cost,
                          random_target=np.stack([c[0] for c in controls]),
                          random_ce_cost=np.stack([c[1] for c in controls]), seeds=seeds, base_loss=base_loss,
                          vector_norm=float(v.norm()), act_norm=act_norm,
                          text=f"{rows_RT.shape[0]} rows × {rows_RT.shape[1]} tokens")


def describe_positions(positions: Positions, generation: Generation = None) -> str:
    """`positions` (and the generation mode) in words, for a result."""
    if positions is None or positions == "all":
        where = "every position"
    elif positions == "last":
        where = "the last position"
    elif isinstance(positions, torch.Tensor):
        where = f"per-row positions {tuple(positions.shape)}"
    else:
        where = f"positions {list(positions)}"
    if generation == "prompt_only":
        where += " of the prompt, not the generated tokens"
    elif generation == "prompt_and_new":
        where += " of the prompt and every generated token"
    return where


# -- generation -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SteeredText:
    """The same prompts continued with the same seed, without and with steering."""

    prompts: tuple[str, ...]
    plain: tuple[str, ...]
    """Each prompt's continuation unsteered (the prompt included, as `generate` returns it)."""
    steered: tuple[str, ...]
    hook: str
    alpha: float
    seed: int

    def side_by_side(self) -> str:
        """Plain text: each prompt, then its unsteered and steered continuations."""
        out = []
        for p, a, b in zip(self.prompts, self.plain, self.steered):
            out += [f"prompt: {p!r}", f"  unsteered: {a!r}", f"  steered (α = {self.alpha:g} at {self.hook}): {b!r}"]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "alpha": finite(self.alpha), "seed": self.seed,
                "rows": [{"prompt": p, "unsteered": a, "steered": b}
                         for p, a, b in zip(self.prompts, self.plain, self.steered)]}


@torch.no_grad()
def generate_steered(model: HookedModel, prompt: Union[str, Sequence[str]], hook: str, vector: torch.Tensor,
                     alpha: float, *, positions: Positions = None, generation: Generation = "prompt_and_new",
                     head: Optional[int] = None, seed: int = 0, **gen_kwargs: Any) -> SteeredText:
    """Text generated from `prompt` (one or a list) without and with α·v at `hook`, each from the
    same seed (the global RNG is forked and seeded, so the caller's is left as it was), on a
    workbench Transformer or a TransformerBridge (`model.generate`, with `gen_kwargs` such as
    max_new_tokens, do_sample, temperature). By default the vector is added at every prompt
    position and every generated token (CAA); `generation="prompt_only"` is ActAdd."""
    if not hasattr(model, "generate"):
        raise InputError(f"{type(model).__name__} has no generate method; steer a workbench Transformer or a "
                         "TransformerBridge.")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("generate_steered takes a prompt string or a non-empty list of them.")
    if generation is None:
        raise InputError("generate_steered needs a generation mode: 'prompt_only' (ActAdd) or 'prompt_and_new' "
                         "(CAA).")
    gen_kwargs = {"verbose": False, **gen_kwargs, "return_type": "str"}
    device = _device(model)

    def run(steering: bool) -> list[str]:
        texts = []
        for p in prompts:  # one at a time, so each prompt's positions are its own (no padding)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                if steering:
                    with steer(model, hook, vector, alpha, positions, generation=generation, head=head):
                        out = model.generate(p, **gen_kwargs)
                else:
                    out = model.generate(p, **gen_kwargs)
            texts.append(out if isinstance(out, str) else out[0])
        return texts

    return SteeredText(tuple(prompts), tuple(run(False)), tuple(run(True)), hook, float(alpha), int(seed))


# -- helpers --------------------------------------------------------------------------------------
def _device(model: HookedModel) -> torch.device:
    return next(model.parameters()).device


def _name(hook: Any) -> str:
    return f"{hook.name}" if getattr(hook, "name", None) else "the hook"


def _checked_vector(vector: Any) -> torch.Tensor:
    if isinstance(vector, np.ndarray):
        vector = torch.from_numpy(vector)
    if not isinstance(vector, torch.Tensor):
        raise InputError(f"A steering vector is a tensor (or numpy array), not a {type(vector).__name__}.")
    if vector.ndim == 0 or vector.numel() == 0:
        raise InputError(f"A steering vector needs at least one dimension and one value; got shape "
                         f"{tuple(vector.shape)}.")
    if vector.is_complex() or not (vector.is_floating_point() or vector.dtype in (torch.int32, torch.int64)):
        raise InputError(f"A steering vector holds real numbers, not {vector.dtype}.")
    v = vector.detach().float()
    if not bool(torch.isfinite(v).all()):
        raise InputError(f"The steering vector has {int((~torch.isfinite(v)).sum())} non-finite values (NaN or "
                         "inf); it would make every steered activation non-finite.")
    return v.clone()


def _checked_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) or \
            not math.isfinite(float(alpha)):
        raise InputError(f"alpha must be a finite number, got {alpha!r}.")
    return float(alpha)


def _checked_positions(positions: Positions) -> Positions:
    if positions is None or (isinstance(positions, str) and positions in ("all", "last")):
        return positions
    if isinstance(positions, str):
        raise InputError(f"positions must be None, 'all', 'last', a list of positions or per-row positions; got "
                         f"{positions!r}.")
    if isinstance(positions, torch.Tensor):
        if positions.dtype not in (torch.int32, torch.int64) or positions.ndim not in (1, 2) or \
                bool((positions < 0).any()):
            raise InputError("Per-row positions are a tensor of non-negative integers [batch] or [batch, P].")
        return positions.view(len(positions), -1)
    items = list(positions)
    if not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in items):
        raise InputError(f"positions must be integers, got {items!r}.")
    return [int(p) for p in items]


def _select(positions: Positions, B: int, S: int, length: int, device: torch.device) -> torch.Tensor:
    """[B or 1, S] bool: the positions steered in a pass of S positions of a sequence of `length`."""
    if positions is None or positions == "all":
        return torch.ones(1, S, dtype=torch.bool, device=device)
    if positions == "last":
        mask = torch.zeros(1, S, dtype=torch.bool, device=device)
        mask[0, length - 1] = True
        return mask
    if isinstance(positions, torch.Tensor):
        if positions.shape[0] != B:
            raise InputError(f"Per-row positions are given for {positions.shape[0]} rows; this forward pass has {B}.")
        if bool((positions >= S).any()):
            raise InputError(f"Per-row positions reach {int(positions.max())}; this forward pass has {S} positions.")
        mask = torch.zeros(B, S, dtype=torch.bool, device=device)
        mask.scatter_(1, positions.to(device), True)
        return mask
    mask = torch.zeros(1, S, dtype=torch.bool, device=device)
    for p in positions:
        q = p + length if p < 0 else p
        if not 0 <= q < length:
            raise InputError(f"Steering position {p} is outside a sequence of {length} positions" +
                             (" (with a KV cache each generated token is a pass of its own: steer generation with "
                              "generation='prompt_only' or 'prompt_and_new')." if length == 1 else "."))
        mask[0, q] = True
    return mask


def _tokens_of(model: HookedModel, prompts: Union[Sequence[str], torch.Tensor], what: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, S] padded on the right, each row's length [B]) on the model's device."""
    device = _device(model)
    if isinstance(prompts, torch.Tensor):
        if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.dtype not in (torch.int32, torch.int64):
            raise InputError(f"{what}: token ids must be [batch, pos] integers with at least one row.")
        return prompts.to(device).long(), torch.full((prompts.shape[0],), prompts.shape[1], device=device)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError(f"{what} must be a non-empty list of strings or token ids [batch, pos].")
    if model.tokenizer is None or not hasattr(model, "to_tokens"):
        raise InputError(f"{what}: this model has no tokenizer; give token ids [batch, pos].")
    rows = [model.to_tokens(t)[0] for t in texts]
    tokens = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r  # padding after a row's last token cannot reach it under causal attention
    return tokens, torch.tensor([len(r) for r in rows], device=device)


def _mean_activation(model: HookedModel, hook: str, prompts: Union[Sequence[str], torch.Tensor], position: int,
                     what: str) -> torch.Tensor:
    require_hook(model, hook)
    if isinstance(position, bool) or not isinstance(position, int):
        raise InputError(f"position must be an integer, got {position!r}.")
    tokens, lengths = _tokens_of(model, prompts, what)
    at = torch.where(torch.tensor(position, device=lengths.device) < 0, lengths + position,
                     torch.full_like(lengths, position))
    if bool((at < 0).any()) or bool((at >= lengths).any()):
        raise InputError(f"{what}: position {position} is outside a prompt of {int(lengths.min())} tokens.")
    _, acts = run_collect(model, tokens, keep=[hook], stop_early=True)
    act = acts[hook]
    if act.ndim < 3 or act.shape[1] != tokens.shape[1]:
        raise InputError(f"{hook} gives {tuple(act.shape)}, not an activation [batch, pos, ...] to take a mean of.")
    return act[torch.arange(len(at), device=act.device), at.to(act.device)].float().mean(0)


def _target_reader(model: HookedModel, target: Target, metric: Union[Metric, str]
                   ) -> tuple[Callable[[], float], str]:
    """(a function giving the target metric under whatever hooks are attached, its name)."""
    if isinstance(target, PatchingTask):
        fn, name = resolve_metric(metric, target)
        task = target.to(_device(model))

        def read_task() -> float:
            return float(fn(model(task.clean), task).float().mean())

        return read_task, f"{name} on {task.name}"
    if callable(target):
        def read_fn() -> float:
            value = float(target(model))
            if not math.isfinite(value):
                raise InputError(f"The target metric {getattr(target, '__name__', 'function')} returned {value}.")
            return value

        return read_fn, getattr(target, "__name__", "custom metric")
    raise InputError(f"task_or_metric is a PatchingTask or a function model -> float, not a {type(target).__name__}.")


def _text_loss(model: HookedModel, rows_RT: torch.Tensor, steering: Optional[tuple[str, SteeringHook]],
               batch_rows: int, norm_hook: Optional[str] = None) -> tuple[float, float]:
    """(mean next-token loss over the predictions the steering can reach, mean activation norm at
    `norm_hook` when given, else NaN). The rows' last token is only a label."""
    inputs, labels = rows_RT[:, :-1], rows_RT[:, 1:]
    R, S = inputs.shape
    reach = torch.ones(S, dtype=torch.bool, device=inputs.device)
    if steering is not None:
        first = _select(steering[1].positions, R, S, S, inputs.device).any(0).nonzero()
        reach = torch.arange(S, device=inputs.device) >= (int(first[0]) if len(first) else S)
        if not bool(reach.any()):
            return float("nan"), float("nan")
    total, count, norms = 0.0, 0, []
    hooks = [steering] if steering is not None else []
    for i in range(0, R, batch_rows):
        x = inputs[i:i + batch_rows]
        if norm_hook is not None:
            logits, acts = run_collect(model, x, keep=[norm_hook], hooks=hooks)
            norms.append(acts[norm_hook][:, 1:].float().flatten(2).norm(dim=-1).flatten())
        else:
            logits = model.run_with_hooks(x, fwd_hooks=hooks)
        loss = F.cross_entropy(logits[:, reach].float().flatten(0, 1), labels[i:i + batch_rows][:, reach].flatten(),
                               reduction="sum")
        total, count = total + float(loss), count + int(reach.sum()) * len(x)
    act_norm = float(torch.cat(norms).mean()) if norms else float("nan")
    return total / count, act_norm
