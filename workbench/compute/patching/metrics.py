"""Metrics of a patched run: functions of the logits [R, S, V] and the task, giving one value per
row [R]. R is a multiple of the task's B prompts (patches run batched, the patch index outermost),
so row r belongs to prompt r mod B. Each metric averages over the task's read positions.

    logit_diff(logits, task)     logit of the answer minus logit of the wrong token
    answer_prob(logits, task)    probability of the answer
    answer_logprob(logits, task) log-probability of the answer
    answer_loss(logits, task)    cross-entropy on the answer (its negative log-probability)

Any function of this shape is a metric. `normalize(value, clean, corrupt)` maps the clean run's
value to 1 and the corrupt run's to 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from workbench.cache.tasks import PatchingTask
from workbench.errors import InputError

Metric = Callable[[torch.Tensor, PatchingTask], torch.Tensor]


def _rows(logits: torch.Tensor, task: PatchingTask) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the read positions [R, P, V], row -> prompt index [R])."""
    R, B = logits.shape[0], task.n_prompts
    if R % B:
        raise InputError(f"A metric got {R} rows of logits for a task of {B} prompts; rows must be a multiple.")
    prompt = torch.arange(R, device=logits.device) % B
    pos = task.position.to(logits.device)[prompt]  # [R, P]
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])), prompt


def _pick(values_RPV: torch.Tensor, tokens_BP: torch.Tensor, prompt_R: torch.Tensor) -> torch.Tensor:
    return values_RPV.gather(-1, tokens_BP.to(values_RPV.device)[prompt_R][..., None])[..., 0]  # [R, P]


def logit_diff(logits: torch.Tensor, task: PatchingTask) -> torch.Tensor:
    """[R] mean over read positions of logit(answer) - logit(wrong)."""
    if task.wrong is None:
        raise InputError(f"Task {task.name!r} has no wrong answer, so logit_diff does not apply; use answer_prob, "
                         "answer_logprob or answer_loss.")
    at, prompt = _rows(logits, task)
    at = at.float()
    return (_pick(at, task.answer, prompt) - _pick(at, task.wrong, prompt)).mean(-1)


def answer_logprob(logits: torch.Tensor, task: PatchingTask) -> torch.Tensor:
    """[R] mean over read positions of log p(answer)."""
    at, prompt = _rows(logits, task)
    return _pick(at.float().log_softmax(-1), task.answer, prompt).mean(-1)


def answer_prob(logits: torch.Tensor, task: PatchingTask) -> torch.Tensor:
    """[R] mean over read positions of p(answer)."""
    at, prompt = _rows(logits, task)
    return _pick(at.float().softmax(-1), task.answer, prompt).mean(-1)


def answer_loss(logits: torch.Tensor, task: PatchingTask) -> torch.Tensor:
    """[R] mean over read positions of -log p(answer)."""
    return -answer_logprob(logits, task)


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "answer_prob": answer_prob,
                              "answer_logprob": answer_logprob, "answer_loss": answer_loss}


def resolve_metric(metric: "Metric | str", task: PatchingTask) -> tuple[Metric, str]:
    """(metric function, its name): a name of METRICS or a function; the default for a task is
    logit_diff where it has wrong answers, else answer_logprob."""
    if metric == "auto":
        metric = "logit_diff" if task.wrong is not None else "answer_logprob"
    if isinstance(metric, str):
        if metric not in METRICS:
            raise InputError(f"Unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a function "
                             "(logits [R, S, V], task) -> [R].")
        return METRICS[metric], metric
    return metric, getattr(metric, "__name__", "metric")


def normalize(value: torch.Tensor, clean: float, corrupt: float) -> torch.Tensor:
    """(value - corrupt) / (clean - corrupt): 1 at the clean run, 0 at the corrupt run. An error
    where the two runs do not differ: there is nothing to recover."""
    gap = clean - corrupt
    if abs(gap) < 1e-6 * max(1.0, abs(clean)):
        raise InputError(f"The metric is {clean:.6g} on both the clean and the corrupt prompts, so nothing can be "
                         "normalised against their difference; the corruption does not change the behaviour. "
                         "Pass normalized=False to see raw values.")
    return (value - corrupt) / gap
