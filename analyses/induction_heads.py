# Over 500 lines for its Result (labels, evidence, metrics) and 11 figures; probing is in workbench.compute.induction.
"""Induction heads: every head's attention scores, prefix matching, copying, ablation effect, a
verdict backed by behaviour, and the in-context-learning phase change over training checkpoints.

    python -m analyses.induction_heads --model attn-only-2l
    workbench run induction-heads --model hf:/path/to/a/saved/model --seq-len 20

Every head is measured on three kinds of repeated sequence (KINDS): random tokens over the whole
vocabulary, random tokens at the frequencies of real text, and a passage of held-out text. On each
kind, one cached forward pass on a sequence repeated once gives the induction, previous-token,
duplicate-token and first-token scores (defined once, in workbench.compute.attention_scores), and a
sequence repeated `prefix_copies` times gives Olsson et al.'s prefix-matching score. Ablating each
head (mean; on random tokens also zero) measures how much the loss on the second copy relies on it.
The head's full OV circuit gives its copying score, which does not depend on the input.

Labels are earned kind by kind, with the same thresholds on every kind: a head is an induction head
on a kind when its attention (induction and prefix-matching scores) and its behaviour (an ablation
effect specific to the second copy) both say so there. A head's labels are those it earns on at
least one kind, and the result says on which: a model trained on a skewed token distribution
attends weakly to tokens it rarely saw, so a head that does induction on the text it was trained on
may miss the threshold on uniform random tokens. The induction heads work on a kind when one of
them is labelled induction on it. For a model folder with checkpoints, the probe runs at every
checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench.adapter import describe
from workbench.adapter.provenance import (
    checkpoints,
    model_label,
    run_folder,
    tokens_seen,
    training_data,
    validation_rows,
)
from workbench.adapter.tokens import token_strings
from workbench.cache.collect import half_losses, head_names, require_attention
from workbench.cache.rows import TEXT_PROBES, held_out_text, probe_tokens, text_probe_tokens
from workbench.compute.induction import (
    ATTENTION_SCORES,
    RepeatedProbe,
    icl_score,
    induction_scores_LH,
    loss_and_activations,
)
from workbench.compute.qk_ov import copying_score, folded_weights, ov_circuit
from workbench.compute.training_curves import steepest_change
from workbench.config import check_types
from workbench.errors import InputError, check_field
from workbench.model.hooked import HookedModel
from workbench.report.pipeline import Analysis
from workbench.report.plotting import captioned, heatmap, heatmap_picker, lines, table
from workbench.report.widgets import Widget, attention_viewer
from workbench.strict_json import finite, json_array

SCORES = (*ATTENTION_SCORES, "copying")
LABELS = ("induction", "previous-token", "duplicate-token", "copying")
KIND_LABELS = LABELS[:3]
"""The labels earned on a kind of sequence. 'copying' is read from the weights (the OV circuit), so it
is the same on every input."""
KINDS = {"random tokens": "uniform", "text-frequency tokens": "text-distribution", "text passage": "passage"}
"""The kinds of repeated sequence induction is measured on, and the probe that makes each (the first
is `probe_tokens` over the whole vocabulary; the others `text_probe_tokens`)."""


@dataclass(frozen=True)
class InductionConfig:
    """Settings of the induction-head analysis. Thresholds are justified in the README."""

    seq_len: int = 40
    """Length L of the random sequence that is repeated once (the model sees 2L tokens, plus a BOS)."""
    n_sequences: int = 32
    """Random sequences (batch) everything is averaged over."""
    prefix_seq_len: int = 25
    """Length of the random sequence of the prefix-matching probe (Olsson et al.: 25)."""
    prefix_copies: int = 4
    """Copies of that sequence in the prefix-matching probe (Olsson et al.: 4)."""
    prepend_bos: bool = True
    """Start every sequence with the model's BOS (for workbench models, the end-of-text id)."""
    induction_threshold: float = 0.3
    """Label 'induction' on a kind of sequence needs induction and prefix-matching scores of at least
    this on that kind, and the ablation effect below there."""
    ablation_threshold: float = 0.1
    """Label 'induction' on a kind of sequence needs mean-ablating the head to raise the second copy's
    loss by at least this many nats per token more than it raises the first copy's."""
    prev_token_threshold: float = 0.4
    """Label 'previous-token' on a kind of sequence: previous-token score at least this on it."""
    duplicate_threshold: float = 0.3
    """Label 'duplicate-token' on a kind of sequence: duplicate-token score at least this on it."""
    copying_threshold: float = 0.5
    """Label 'copying': copying score (sum λ / sum |λ| of the full OV circuit) at least this."""
    icl_early: int = 10
    """Early token of the in-context-learning score: loss at token icl_late minus loss at this one,
    on the model's own validation text (Olsson et al.: 50 of 8192)."""
    icl_late: int = 100
    """Late token of the in-context-learning score (Olsson et al.: 500 of 8192)."""
    icl_rows: int = 256
    """Validation rows the in-context-learning score averages over."""
    phase_change: bool = True
    """Run the probe at every checkpoint of the model's folder (when it has checkpoints)."""
    top_heads: int = 6
    """Heads shown in the attention-pattern picker."""
    max_ablated_heads: int = 12
    """Heads ablated one at a time (on random tokens zero and mean, on each text kind mean: four forward
    passes each). All of them when the model has at most this many; otherwise every head whose
    induction and prefix-matching scores both reach induction_threshold on some kind of sequence (the
    only heads the verdict can label induction), then the highest induction scores on any kind, up to
    this many. The others are not measured (null in metrics.json)."""
    seed: int = 0
    """Seed of the random sequences."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "InductionConfig"
        for name in ("seq_len", "prefix_seq_len", "prefix_copies"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= 2, own, name, value, "an integer ≥ 2")
        for name in ("n_sequences", "icl_rows", "top_heads", "max_ablated_heads"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= 1, own, name, value, "a positive integer")
        for name in ("induction_threshold", "prev_token_threshold", "duplicate_threshold"):
            value = getattr(self, name)
            check_field(0 < value <= 1, own, name, value, "in (0, 1] (an attention weight)")
        check_field(-1 < self.copying_threshold <= 1, own, "copying_threshold", self.copying_threshold, "in (-1, 1]")
        check_field(self.ablation_threshold >= 0, own, "ablation_threshold", self.ablation_threshold, "≥ 0 nats")
        check_field(0 < self.icl_early < self.icl_late, own, "icl_early/icl_late", (self.icl_early, self.icl_late),
                    "0 < icl_early < icl_late")


@dataclass(frozen=True)
class CheckpointCurves:
    """The probe at each checkpoint of a training run."""

    steps: tuple[int, ...]
    tokens: tuple[int, ...]
    induction_NLH: np.ndarray
    first_half_loss: tuple[float, ...]
    repeated_half_loss: tuple[float, ...]
    icl_score: tuple[float, ...]
    icl_data: str
    phase_change: Optional[tuple[int, int]]
    """(start, end step) of the interval where the max induction score rises fastest."""
    loss_drop: Optional[tuple[int, int]]
    """(start, end step) of the interval where the repeated-half loss falls fastest."""
    induction_by_kind: dict[str, tuple[float, ...]]
    """Kind of sequence -> the highest induction score at each checkpoint."""


@dataclass(frozen=True, eq=False)
class KindResult:
    """Every head on one kind of repeated sequence (length seq_len, repeated once): its attention
    scores, what ablating it does, and the labels it earns there. Arrays are [L, H]."""

    kind: str
    source: str
    """Where its tokens came from."""
    scores: dict[str, np.ndarray]
    """One [L, H] array per entry of ATTENTION_SCORES. Prefix matching is measured on prefix_seq_len
    tokens of this kind repeated prefix_copies times."""
    ablation_LH: dict[str, np.ndarray]
    """'mean first' / 'mean repeated': loss increase on the first and second copy when the head alone is
    mean-ablated on this kind (NaN where it was not ablated; see InductionConfig.max_ablated_heads)."""
    first_loss: float
    """Mean loss on the first copy (tokens 2..L)."""
    repeated_loss: float
    """Mean loss on the same tokens of the second copy."""
    ablation: dict[str, float]
    """'mean first' / 'mean repeated': loss increase with the joint heads mean-ablated together on this kind."""
    labels: dict[str, tuple[str, ...]]
    """Head name -> the KIND_LABELS it earns on this kind."""

    @property
    def induction_LH(self) -> np.ndarray:
        return self.scores["induction"]

    def heads_labelled(self, label: str) -> list[str]:
        """The heads that earn `label` (one of KIND_LABELS) on this kind, layer-major."""
        return [h for h, ls in self.labels.items() if label in ls]

    @property
    def works(self) -> bool:
        """The induction heads work here: at least one head is labelled induction on this kind."""
        return bool(self.heads_labelled("induction"))

    @property
    def induction_heads_text(self) -> str:
        """'induction heads L1H1, L1H3', or 'no induction head'."""
        heads = self.heads_labelled("induction")
        return f"induction heads {', '.join(heads)}" if heads else "no induction head"

    @property
    def loss_drop(self) -> float:
        """First-copy loss minus second-copy loss (nats/token): what repetition is worth."""
        return self.first_loss - self.repeated_loss


@dataclass(frozen=True, eq=False)
class InductionResult:
    """Everything the induction-head analysis found. Arrays are [L, H] unless named otherwise."""

    name: str
    config: InductionConfig
    scores: dict[str, np.ndarray]
    """One [L, H] array per entry of SCORES, on random tokens (the classic probe; each kind's attention
    scores are in `kinds`); copying comes from the weights."""
    ablation: dict[str, np.ndarray]
    """'<zero|mean> <first|repeated>': increase of the half's mean loss when the head is ablated, on
    random tokens (each kind's mean ablation is in `kinds`)."""
    clean_first_loss: float
    clean_repeated_loss: float
    joint_heads: tuple[str, ...]
    """Heads ablated together for the per-token loss plot (the induction heads, else the head with the
    highest induction score on any kind)."""
    joint_ablation: dict[str, float]
    """'<zero|mean> <first|repeated>' for those heads ablated together, on random tokens."""
    loss_by_position: dict[str, np.ndarray]
    """'clean' and 'ablated': mean per-token loss [S-1] on the repeated random sequences."""
    tokens: tuple[str, ...]
    patterns_NSS: np.ndarray
    pattern_heads: tuple[str, ...]
    prefix: int
    curves: Optional[CheckpointCurves]
    phase_note: str
    kinds: dict[str, KindResult]
    """Kind of sequence (KINDS, in order) -> every head on it, labels included; text kinds are missing
    for a model without a tokenizer (see kinds_note)."""
    kinds_note: str
    passage_tokens: tuple[str, ...]
    """The first repeated text passage, as strings ('' when there is none)."""
    passage_patterns_NSS: Optional[np.ndarray]
    """The attention of `pattern_heads` on that passage."""

    @property
    def labels(self) -> dict[str, tuple[str, ...]]:
        """Head name -> its labels (in LABELS order): each of KIND_LABELS that it earns on at least one
        kind of sequence (`label_kinds` says which), and 'copying' from its OV circuit."""
        copying = self.scores["copying"].ravel() >= self.config.copying_threshold
        return {h: tuple(label for label in LABELS
                         if (copying[i] if label == "copying" else self.label_kinds(h, label)))
                for i, h in enumerate(self.heads)}

    def label_kinds(self, head: str, label: str) -> list[str]:
        """The kinds of sequence on which `head` earns `label` (one of KIND_LABELS)."""
        if label not in KIND_LABELS:
            raise InputError(f"{label!r} is not a label earned on a kind of sequence; use one of "
                             f"{', '.join(KIND_LABELS)} ('copying' comes from the weights).")
        return [kind for kind, k in self.kinds.items() if label in k.labels[head]]

    def label_kinds_text(self, head: str, label: str) -> str:
        """Where `head` earns `label`, in words: 'on every kind', 'on text-frequency tokens, text passage'."""
        where = self.label_kinds(head, label)
        return "on every kind" if where == list(self.kinds) and len(where) > 1 else f"on {', '.join(where)}"

    @property
    def evidence(self) -> dict[str, str]:
        """Head name -> the numbers that earned (or missed) its labels, kind by kind."""
        out = {}
        for h in self.heads:
            i = self.at(h)
            parts = []
            for kind, k in self.kinds.items():
                s = {score: float(arr[i]) for score, arr in k.scores.items()}
                first, repeated = float(k.ablation_LH["mean first"][i]), float(k.ablation_LH["mean repeated"][i])
                ablated = (f"mean ablation {repeated:+.2f} nats on the second copy vs {first:+.2f} on the first"
                           if np.isfinite(repeated) else "not ablated")
                parts.append(f"{kind}: induction {s['induction']:.2f}, prefix matching {s['prefix matching']:.2f}, "
                             f"previous token {s['previous token']:.2f}, duplicate {s['duplicate token']:.2f}, "
                             f"{ablated}")
            out[h] = "; ".join(parts) + f"; copying {self.scores['copying'][i]:.2f} (OV circuit)"
        return out

    @property
    def works_on(self) -> list[str]:
        """The kinds of sequence the induction heads work on (where a head is labelled induction)."""
        return [k for k, v in self.kinds.items() if v.works]

    @property
    def shape(self) -> tuple[int, int]:
        return self.scores["induction"].shape

    @property
    def heads(self) -> list[str]:
        """Head names, layer-major."""
        return head_names(*self.shape)

    def at(self, head: str) -> tuple[int, int]:
        """(layer, head) index of a head name."""
        return divmod(self.heads.index(head), self.shape[1])

    def heads_labelled(self, label: str) -> list[str]:
        """The heads that earn `label` on at least one kind of sequence (copying: from the weights)."""
        return [h for h, ls in self.labels.items() if label in ls]

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"{label}_heads": self.heads_labelled(label) for label in LABELS}
        for label in KIND_LABELS:  # head -> the kinds of sequence it earns the label on
            out[f"{label.replace('-', '_')}_heads_kinds"] = {h: self.label_kinds(h, label)
                                                             for h in self.heads_labelled(label)}
        for score, arr in self.scores.items():
            key = score.replace(" ", "_")
            out[f"max_{key}"], out[f"max_{key}_head"] = float(arr.max()), self.heads[int(arr.argmax())]
            out[f"{key}_LH"] = json_array(arr)
        for k, arr in self.ablation.items():
            out[f"ablation_{k.replace(' ', '_')}_LH"] = json_array(arr)
        if np.isnan(self.ablation["mean repeated"]).any():
            out["ablation_note"] = (f"null: heads not ablated (max_ablated_heads = {self.config.max_ablated_heads} of "
                                    f"{self.ablation['mean repeated'].size}); every head that could be labelled "
                                    "induction on some kind of sequence was")
        out["clean_loss_first_half"], out["clean_loss_repeated_half"] = self.clean_first_loss, self.clean_repeated_loss
        out["joint_ablation_heads"] = list(self.joint_heads)
        out.update({f"joint_ablation_{k.replace(' ', '_')}": v for k, v in self.joint_ablation.items()})
        if self.curves is not None:
            c = self.curves
            out["checkpoint_steps"] = list(c.steps)
            out["phase_change_interval"] = list(c.phase_change) if c.phase_change else None
            out["repeated_loss_drop_interval"] = list(c.loss_drop) if c.loss_drop else None
            out["icl_score_final"] = finite(c.icl_score[-1])  # null when there was no validation data
        out["phase_change_note"] = self.phase_note
        out["induction_works_on"] = self.works_on
        for kind, k in self.kinds.items():
            key = kind.replace(" ", "_").replace("-", "_")
            out[f"{key}_max_induction"] = float(k.induction_LH.max())
            out[f"{key}_max_induction_head"] = self.heads[int(k.induction_LH.argmax())]
            out[f"{key}_first_copy_loss"], out[f"{key}_second_copy_loss"] = k.first_loss, k.repeated_loss
            out[f"{key}_joint_ablation_mean_repeated"] = k.ablation["mean repeated"]
            for label in KIND_LABELS:
                out[f"{key}_{label.replace('-', '_')}_heads"] = k.heads_labelled(label)
            for score, arr in k.scores.items():
                out[f"{key}_{score.replace(' ', '_')}_LH"] = json_array(arr)
            for half, arr in k.ablation_LH.items():
                out[f"{key}_ablation_{half.replace(' ', '_')}_LH"] = json_array(arr)
        out["text_kinds_source"] = next((k.source for n, k in self.kinds.items() if n != "random tokens"),
                                        self.kinds_note)
        return out

    def kinds_verdict(self) -> str:
        """One sentence: which kinds of sequence the induction heads work on."""
        yes = self.works_on
        if not yes:  # no head is labelled induction on any kind
            text = "no induction head, so induction works on no kind of sequence"
        else:
            no = [k for k in self.kinds if k not in yes]
            text = f"the induction heads work on {', '.join(yes)}" + (f"; not on {', '.join(no)}" if no else "")
        return text + (f" ({self.kinds_note})" if self.kinds_note else "")

    def _best_kind(self, head: str) -> str:
        """Of the kinds `head` is labelled induction on, the one where its induction score is highest."""
        i = self.at(head)
        return max(self.label_kinds(head, "induction"), key=lambda kind: self.kinds[kind].scores["induction"][i])

    def headlines(self) -> list[str]:
        out = []
        ind = self.heads_labelled("induction")
        if ind:
            parts = []
            for h in ind:
                i, k = self.at(h), self.kinds[self._best_kind(h)]
                s, abl = k.scores, k.ablation_LH
                parts.append(
                    f"{h} {self.label_kinds_text(h, 'induction')} ({k.kind}: score {s['induction'][i]:.2f}, prefix "
                    f"matching {s['prefix matching'][i]:.2f}, mean ablation {abl['mean repeated'][i]:+.2f} nats on "
                    f"the second copy vs {abl['mean first'][i]:+.2f} on the first; copying "
                    f"{self.scores['copying'][i]:.2f})")
            out.append("induction heads: " + "; ".join(parts))
        else:
            kind, k = max(self.kinds.items(), key=lambda item: item[1].induction_LH.max())
            out.append(f"no induction head on any kind of sequence; the highest induction score is "
                       f"{k.induction_LH.max():.2f} ({self.heads[int(k.induction_LH.argmax())]}, on {kind}), "
                       f"threshold {self.config.induction_threshold}")
        j = self.joint_ablation
        which = (f"ablating the induction heads together ({', '.join(self.joint_heads)})" if ind else
                 f"for comparison, ablating the top-scoring head {self.joint_heads[0]}")
        out.append(f"{which}, mean ablation on random tokens: repeated-half loss {self.clean_repeated_loss:.2f} → "
                   f"{self.clean_repeated_loss + j['mean repeated']:.2f} nats/token ({j['mean repeated']:+.2f}); "
                   f"first half {j['mean first']:+.2f}")
        c = self.curves
        if c is not None and c.phase_change is not None:
            drop = (f"; the repeated-half loss falls fastest over steps {c.loss_drop[0]}–{c.loss_drop[1]}"
                    if c.loss_drop else "")
            out.append(f"phase change: the induction score rises fastest over steps "
                       f"{c.phase_change[0]}–{c.phase_change[1]}{drop}")
        else:
            out.append(self.phase_note)
        out.append(self.kinds_verdict() + ": " + "; ".join(
            f"{kind}: {k.induction_heads_text}, best score {k.induction_LH.max():.2f} "
            f"({self.heads[int(k.induction_LH.argmax())]}), "
            f"loss {k.first_loss:.2f} → {k.repeated_loss:.2f} nats/token from the first copy to the second"
            for kind, k in self.kinds.items()))
        for label in ("previous-token", "duplicate-token"):
            heads = self.heads_labelled(label)
            if heads:
                out.append(f"{label} heads: " + "; ".join(f"{h} {self.label_kinds_text(h, label)}" for h in heads))
        if self.heads_labelled("copying"):
            out.append(f"copying heads (from the OV circuit): {', '.join(self.heads_labelled('copying'))}")
        return out


def _icl_rows(model: HookedModel, cfg: InductionConfig) -> tuple[Optional[torch.Tensor], str]:
    """The model's own validation rows (text, else synthetic) for the in-context-learning score."""
    data_cfg, why = training_data(model)
    if data_cfg is None:
        return None, why
    n_ctx = model.cfg.n_ctx
    if cfg.icl_late >= n_ctx:
        raise InputError(f"icl_late={cfg.icl_late} must be below the model's n_ctx={n_ctx}; pass --icl-late "
                         f"{n_ctx - 1} or less (and --icl-early below it).")
    return validation_rows(model, cfg.icl_rows)


@torch.no_grad()
def _probe_checkpoint(model: HookedModel, rep: torch.Tensor, prefix: int, cfg: InductionConfig,
                      icl_rows: Optional[torch.Tensor], text_probes: dict[str, torch.Tensor]
                      ) -> tuple[np.ndarray, float, float, float, dict[str, float]]:
    """(induction scores [L, H], first- and second-copy loss, ICL score, best induction score per kind) of
    one checkpoint."""
    loss, store = loss_and_activations(model, rep, keep=("attn.hook_pattern",))
    L = model.cfg.n_layers
    ind = induction_scores_LH(store, L, cfg.seq_len, prefix)
    by_kind = {"random tokens": float(ind.max())}
    for kind, tokens in text_probes.items():
        by_kind[kind] = float(induction_scores_LH(loss_and_activations(model, tokens, keep=("attn.hook_pattern",))[1],
                                                  L, cfg.seq_len, prefix).max())
    first, second = half_losses(loss, prefix, cfg.seq_len)
    icl = float("nan") if icl_rows is None else icl_score(model, icl_rows.to(rep.device), cfg.icl_early, cfg.icl_late)
    return ind.cpu().numpy(), first, second, icl, by_kind


def checkpoint_curves(model: HookedModel, cfg: InductionConfig, rep: torch.Tensor, prefix: int,
                      text_probes: dict[str, torch.Tensor]) -> tuple[Optional[CheckpointCurves], str]:
    """Run the probe at every checkpoint of the model's folder, or say why there is nothing to run."""
    if not cfg.phase_change:
        return None, "phase change not computed (phase_change=False)"
    folder, _ = run_folder(model)
    if folder is None:
        return None, ("no phase-change section: this model was not loaded from a workbench model folder, "
                      "so there are no training checkpoints to compare")
    ckpts, _ = checkpoints(model)
    if len(ckpts) < 2:
        return None, (f"no phase-change section: {folder} has {len(ckpts)} training checkpoint(s) under "
                      "checkpoints/; train with `workbench train` (which writes them) to see the curves")
    icl, icl_data = _icl_rows(model, cfg)
    device = rep.device
    results, tokens = [], []
    for ckpt in tqdm(ckpts, desc="checkpoints", unit="ckpt", disable=None, leave=False):
        at = ckpt.load(device)
        results.append(_probe_checkpoint(at, rep, prefix, cfg, icl, text_probes))
        seen = tokens_seen(at)
        tokens.append(ckpt.step if seen is None else seen)
    steps = [c.step for c in ckpts]
    induction = np.stack([r[0] for r in results])
    rep_loss = [r[2] for r in results]
    curves = CheckpointCurves(
        steps=tuple(steps), tokens=tuple(tokens), induction_NLH=induction,
        first_half_loss=tuple(r[1] for r in results), repeated_half_loss=tuple(rep_loss),
        icl_score=tuple(r[3] for r in results), icl_data=icl_data,
        phase_change=steepest_change(steps, induction.max(axis=(1, 2)).tolist(), cfg.induction_threshold),
        loss_drop=steepest_change(steps, rep_loss, cfg.ablation_threshold, rising=False),
        induction_by_kind={k: tuple(r[4][k] for r in results) for k in results[0][4]})
    if curves.phase_change is None:
        return curves, (f"no phase change across {len(steps)} checkpoints: the highest induction score never rises "
                        f"by the induction threshold ({cfg.induction_threshold}) above its value at step {steps[0]}")
    return curves, f"{len(steps)} checkpoints from {folder}"


# -- the analysis -------------------------------------------------------------------------------------
def ablated_heads(kind_scores: list[dict[str, np.ndarray]], cfg: InductionConfig) -> list[tuple[int, int]]:
    """The heads ablated one at a time (see InductionConfig.max_ablated_heads), in (layer, head) order,
    from each kind of sequence's attention scores."""
    L, H = kind_scores[0]["induction"].shape
    if L * H <= cfg.max_ablated_heads:
        return [(l, h) for l in range(L) for h in range(H)]
    passes = np.zeros(L * H, dtype=bool)  # induction and prefix matching both reach the threshold on some kind
    for s in kind_scores:
        passes |= (s["induction"].ravel() >= cfg.induction_threshold) & (
            s["prefix matching"].ravel() >= cfg.induction_threshold)
    candidates = np.flatnonzero(passes).tolist()
    best = np.max([s["induction"].ravel() for s in kind_scores], axis=0)
    rest = [i for i in np.argsort(-best).tolist() if i not in candidates]
    chosen = candidates + rest[: max(0, cfg.max_ablated_heads - len(candidates))]
    return [divmod(i, H) for i in sorted(chosen)]


def kind_labels(scores: dict[str, np.ndarray], ablation_LH: dict[str, np.ndarray], cfg: InductionConfig
                ) -> dict[str, tuple[str, ...]]:
    """Head name -> the KIND_LABELS it earns on one kind of sequence, from that kind's [L, H] attention
    scores and mean-ablation effects (a head that was not ablated, NaN, cannot be labelled induction)."""
    labels = {}
    for i, name in enumerate(head_names(*scores["induction"].shape)):
        s = {k: float(v.flat[i]) for k, v in scores.items()}
        specific = float(ablation_LH["mean repeated"].flat[i]) - float(ablation_LH["mean first"].flat[i])
        holds = {
            "induction": (s["induction"] >= cfg.induction_threshold and s["prefix matching"] >= cfg.induction_threshold
                          and specific >= cfg.ablation_threshold),  # False when NaN
            "previous-token": s["previous token"] >= cfg.prev_token_threshold,
            "duplicate-token": s["duplicate token"] >= cfg.duplicate_threshold,
        }
        labels[name] = tuple(label for label in KIND_LABELS if holds[label])
    return labels


class _KindProbe(RepeatedProbe):
    """One kind of sequence run clean (`RepeatedProbe`), with its name and where its tokens came from."""

    def __init__(self, model: HookedModel, kind: str, source: str, tokens: torch.Tensor, pm_tokens: torch.Tensor,
                 prefix: int, pm_prefix: int, cfg: InductionConfig) -> None:
        super().__init__(model, tokens, pm_tokens, prefix, pm_prefix, cfg.seq_len, cfg.prefix_seq_len)
        self.kind, self.source = kind, source


def _kind_probes(model: HookedModel, cfg: InductionConfig) -> tuple[dict[str, _KindProbe], str]:
    """{kind: its probe run clean}, in KINDS order, and a note when the text kinds cannot be made."""
    rep, prefix = probe_tokens(model, cfg.seq_len, 2, cfg.n_sequences, cfg.seed, cfg.prepend_bos)
    pm_rep, pm_prefix = probe_tokens(model, cfg.prefix_seq_len, cfg.prefix_copies, cfg.n_sequences,
                                     cfg.seed + 1, cfg.prepend_bos)
    probes = {"random tokens": _KindProbe(
        model, "random tokens", "tokens drawn uniformly from the vocabulary (special tokens left out)", rep, pm_rep,
        prefix, pm_prefix, cfg)}
    if model.tokenizer is None:
        return probes, "the text kinds need a tokenizer, and this model has none"
    text_RT, text_source = held_out_text(model)
    for i, (kind, probe) in enumerate(KINDS.items()):
        if probe in TEXT_PROBES:
            tokens, _ = text_probe_tokens(model, probe, text_RT, cfg.seq_len, 2, cfg.n_sequences, cfg.seed + 2 + i,
                                          cfg.prepend_bos)
            pm_tokens, kind_pm_prefix = text_probe_tokens(model, probe, text_RT, cfg.prefix_seq_len, cfg.prefix_copies,
                                                          cfg.n_sequences, cfg.seed + 2 + len(KINDS) + i,
                                                          cfg.prepend_bos)
            what = "tokens drawn at their frequencies in " if probe == "text-distribution" else "passages of "
            probes[kind] = _KindProbe(model, kind, what + text_source, tokens, pm_tokens, prefix, kind_pm_prefix, cfg)
    return probes, ""


@torch.no_grad()
def compute(model: HookedModel, cfg: InductionConfig) -> InductionResult:
    """Score, ablate and label every head on every kind of sequence; follow the induction score over the
    model's checkpoints."""
    require_attention(model)
    describe(model).require("z edits", "head ablation at hook_z")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = head_names(L, H)

    # 1. every kind of sequence, run clean: attention scores and copy losses
    probes, kinds_note = _kind_probes(model, cfg)
    rand = probes["random tokens"]
    scores = {**rand.scores, "copying": torch.stack([copying_score(ov_circuit(folded_weights(model), l))
                                                     for l in range(L)]).cpu().numpy()}

    # 2. each chosen head ablated alone: zero and mean on random tokens, mean on the text kinds
    chosen = ablated_heads([p.scores for p in probes.values()], cfg)
    ablation = {f"{m} {half}": np.full((L, H), np.nan) for m in ("zero", "mean") for half in ("first", "repeated")}
    kind_ablation = {kind: {half: np.full((L, H), np.nan) for half in ("mean first", "mean repeated")}
                     for kind in probes if kind != "random tokens"}
    jobs = [(kind, l, h, m) for kind in probes for l, h in chosen
            for m in (("zero", "mean") if kind == "random tokens" else ("mean",))]
    for kind, l, h, mode in tqdm(jobs, desc="ablations", unit="run", disable=None, leave=False):
        d_first, d_second, _ = probes[kind].ablate([(l, h)], mode)
        into = ablation if kind == "random tokens" else kind_ablation[kind]
        into[f"{mode} first"][l, h], into[f"{mode} repeated"][l, h] = d_first, d_second
    kind_ablation["random tokens"] = {half: ablation[half] for half in ("mean first", "mean repeated")}

    # 3. labels, kind by kind, with the same thresholds on every kind
    labels_by_kind = {kind: kind_labels(p.scores, kind_ablation[kind], cfg) for kind, p in probes.items()}
    induction_heads = [divmod(i, H) for i, name in enumerate(names)
                       if any("induction" in labels[name] for labels in labels_by_kind.values())]
    best_induction = np.max([p.scores["induction"] for p in probes.values()], axis=0)  # [L, H], over kinds
    joint = induction_heads or [divmod(int(np.argmax(best_induction)), H)]

    # 4. the induction heads ablated together, on every kind
    joint_ablation, ablated_loss = {}, None
    for mode in ("zero", "mean"):
        d_first, d_second, per_token = rand.ablate(joint, mode)
        joint_ablation[f"{mode} first"], joint_ablation[f"{mode} repeated"] = d_first, d_second
        ablated_loss = per_token if mode == "mean" else ablated_loss
    kinds = {}
    for kind, p in probes.items():
        if kind == "random tokens":
            joint_mean = {k: v for k, v in joint_ablation.items() if k.startswith("mean")}
        else:
            d_first, d_second, _ = p.ablate(joint, "mean")
            joint_mean = {"mean first": d_first, "mean repeated": d_second}
        kinds[kind] = KindResult(kind, p.source, p.scores, kind_ablation[kind], p.first, p.second, joint_mean,
                                 labels_by_kind[kind])

    # 5. the attention viewers and the checkpoints
    order = np.argsort(-best_induction.ravel())[: cfg.top_heads].tolist()
    for extra in ("previous token", "duplicate token"):  # the best head of each other kind, too
        best = int(np.argmax(np.max([p.scores[extra] for p in probes.values()], axis=0)))
        if best not in order:
            order.append(best)
    passage_patterns, passage_tokens = None, ()
    passage = next((p for kind, p in probes.items() if KINDS[kind] == "passage"), None)
    if passage is not None:
        passage_tokens = tuple(token_strings(model, passage.tokens[0]))
        passage_patterns = np.stack([passage.first_row_patterns_LHSS[i // H, i % H] for i in order])
    curves, note = checkpoint_curves(model, cfg, rand.tokens, rand.prefix,
                                     {kind: p.tokens for kind, p in probes.items() if kind != "random tokens"})
    return InductionResult(
        name=model_label(model), config=cfg, scores=scores,
        ablation=ablation, clean_first_loss=rand.first, clean_repeated_loss=rand.second,
        joint_heads=tuple(names[l * H + h] for l, h in joint), joint_ablation=joint_ablation,
        loss_by_position={"clean": rand.loss.mean(0).cpu().numpy(), "ablated": ablated_loss.mean(0).cpu().numpy()},
        tokens=tuple(token_strings(model, rand.tokens[0])),
        patterns_NSS=np.stack([rand.first_row_patterns_LHSS[i // H, i % H] for i in order]),
        pattern_heads=tuple(names[i] for i in order), prefix=rand.prefix, curves=curves, phase_note=note,
        kinds=kinds, kinds_note=kinds_note, passage_tokens=passage_tokens, passage_patterns_NSS=passage_patterns)


def _viewer(patterns_NSS: np.ndarray, heads: tuple[str, ...], tokens: tuple[str, ...], title: str) -> Widget:
    return attention_viewer(tokens, patterns_NSS[None], title, (
        "Hover a token of the second copy: an induction head attends to the token that followed the same token in "
        "the first copy (one position to the right of the earlier occurrence), a previous-token head to the token "
        "just before. Pick the head at the top."), layer_names=["the heads with the highest scores"],
        head_names=heads)


def _verdict_figure(r: InductionResult) -> go.Figure:
    """The table of every head's labels, where they hold, and the numbers behind them."""
    evidence = r.evidence

    def described(h: str) -> str:
        return ", ".join(f"{label} ({r.label_kinds_text(h, label)})" if label in KIND_LABELS else label
                         for label in r.labels[h])

    return captioned(table(
        [(h, f"{described(h) or '—'}  ·  {evidence[h]}") for h in r.heads],
        f"{r.name}: head labels, the kinds of sequence they hold on, and the numbers behind them"),
        "Each head's labels, on which kinds of sequence they hold, and the scores behind them on every kind. A head "
        "is an induction head on a kind only when its attention (induction and prefix-matching scores) and its "
        "behaviour (ablating it hurts the second copy more than the first) agree there; the thresholds are the same "
        "on every kind.")


def _score_figures(r: InductionResult) -> dict[str, go.Figure]:
    """Heatmaps of every head's scores (random tokens, then each kind) and of its ablation effects."""
    heads, n = r.heads, r.config.seq_len
    figs = {}
    figs["head scores"] = captioned(heatmap(
        np.stack([r.scores[s].ravel() for s in SCORES], axis=1), list(SCORES), heads,
        f"Head scores (random length-{n} sequence repeated once; copying from the OV circuit)", "score", "head",
        colorbar="score (attention probability; copying −1 to 1)", colorscale="RdBu", zmid=0),
        "Attention scores of every head on random tokens repeated once, and the copying score of its OV circuit. "
        "Induction heads score high on induction, prefix matching and copying together, in layer 1; the "
        "previous-token head they build on is in layer 0. The same scores on the text kinds are in the next figure.")
    figs["head scores by kind of sequence"] = captioned(heatmap_picker(
        np.stack([np.stack([k.scores[s].ravel() for s in ATTENTION_SCORES], axis=1) for k in r.kinds.values()]),
        list(r.kinds), list(ATTENTION_SCORES), heads, "Attention scores on each kind of sequence (pick the kind)",
        "score", "head", colorbar="score (attention probability)", zmin=0, zmax=1,
        hover="%{y}, %{x}: %{z:.2f}", height=max(400, 60 + 22 * len(heads))),
        "Every head's attention scores on each kind of sequence, from which its labels on that kind come. A model "
        "trained on text attends weakly to tokens it rarely saw, so its heads can score lower on random tokens over "
        "the whole vocabulary than on text.")
    abl_keys = list(r.ablation)
    figs["ablation effects"] = captioned(heatmap(
        np.stack([r.ablation[k].ravel() for k in abl_keys], axis=1), [f"{k} half" for k in abl_keys], heads,
        "Loss increase when the head is ablated (nats/token)", "ablation", "head", colorbar="Δ loss (nats/token)",
        colorscale="RdBu", zmid=0),
        "How much the loss rises when one head's output is zeroed or replaced by its mean, on the first half (which "
        "induction cannot help) and the repeated half. Induction heads hurt the repeated half only.")
    return figs


def _kind_figures(r: InductionResult) -> dict[str, go.Figure]:
    """Whether induction works on each kind of sequence (a table), and each head's induction score there."""
    heads, n = r.heads, r.config.seq_len
    figs = {}
    figs["induction by kind of sequence"] = captioned(table(
        [(kind, f"{'works: ' if k.works else ''}{k.induction_heads_text}  ·  best induction score "
                f"{k.induction_LH.max():.2f} "
                f"({heads[int(k.induction_LH.argmax())]}); loss {k.first_loss:.2f} on the first copy, "
                f"{k.repeated_loss:.2f} on the second ({k.loss_drop:+.2f}); joint mean ablation "
                f"{k.ablation['mean repeated']:+.2f} on the second copy, {k.ablation['mean first']:+.2f} on the first"
                f"  ·  {k.source}") for kind, k in r.kinds.items()],
        f"{r.name}: {r.kinds_verdict()}"),
        "Whether the induction heads work on each kind of sequence: random tokens over the whole vocabulary, random "
        "tokens at the frequencies of real text, and a repeated passage of held-out text. Works means a head is "
        "labelled induction on that kind: high induction and prefix-matching scores there, and ablating it alone "
        "raises the second copy's loss more than the first's.")
    figs["induction score by kind of sequence"] = captioned(heatmap(
        np.stack([k.induction_LH.ravel() for k in r.kinds.values()], axis=1), list(r.kinds), heads,
        f"Induction score on each kind of sequence (length {n}, repeated once)", "kind of sequence", "head",
        colorbar="induction score (attention probability)"),
        "Each head's induction score on each kind of sequence. A head that only scores on random tokens has learnt "
        "to copy where text never goes; one that scores on every kind works on text too.")
    return figs


def _loss_by_position_figure(r: InductionResult) -> go.Figure:
    """Per-token loss on the repeated random sequences, clean and with the joint heads mean-ablated."""
    positions = list(range(1, len(r.loss_by_position["clean"]) + 1))  # loss at index i predicts token i + 1
    ablated = f"{', '.join(r.joint_heads)} mean-ablated"
    return captioned(lines(
        {"clean": positions, ablated: positions},
        {"clean": r.loss_by_position["clean"], ablated: r.loss_by_position["ablated"]},
        "Per-token loss on the repeated sequences", "position of the predicted token", "loss (nats)",
        vlines=[(r.prefix + r.config.seq_len, "second copy starts")]),
        "The loss at each position, averaged over the sequences. Random tokens cost about ln(vocabulary) nats until "
        "the second copy starts; there an induction model's loss collapses, and with its induction heads ablated "
        "it does not.")


def _phase_change_figures(r: InductionResult, c: CheckpointCurves) -> dict[str, go.Figure]:
    """Over the checkpoints: each head's induction score, the best on each kind, the ICL score, the copy losses."""
    heads, H = r.heads, r.shape[1]
    marks = ([(c.tokens[c.steps.index(c.phase_change[0])], "fastest rise"),
              (c.tokens[c.steps.index(c.phase_change[1])], "")] if c.phase_change else [])
    figs = {}
    xs = {h: c.tokens for h in heads}
    figs["phase change: induction score"] = captioned(lines(
        xs, {h: c.induction_NLH[:, i // H, i % H] for i, h in enumerate(heads)},
        "Induction score per head over training", "training tokens", "induction score (attention probability)",
        vlines=marks),
        "Each head's induction score at every checkpoint. Induction heads appear abruptly, in a phase change "
        "(dashed lines: the interval of the fastest rise), not gradually.")
    figs["phase change: induction by kind of sequence"] = captioned(lines(
        {k: c.tokens for k in c.induction_by_kind}, c.induction_by_kind,
        "Highest induction score on each kind of sequence over training", "training tokens",
        "induction score (attention probability)", vlines=marks),
        "The best head's induction score on each kind of sequence over training: whether induction on text "
        "arrives together with induction on random tokens.")
    figs["phase change: in-context learning"] = captioned(lines(
        {"ICL score": c.tokens}, {"ICL score": c.icl_score},
        f"In-context-learning score (loss at token {r.config.icl_late} − token {r.config.icl_early}, {c.icl_data})",
        "training tokens", "Δ loss (nats)", vlines=marks),
        "Olsson et al.'s in-context-learning score: how much lower the loss is late in a context than early. It "
        "falls when induction heads form.")
    figs["phase change: loss on repeated sequences"] = captioned(lines(
        {"first half": c.tokens, "repeated half": c.tokens},
        {"first half": c.first_half_loss, "repeated half": c.repeated_half_loss},
        "Loss on repeated random sequences over training", "training tokens", "loss (nats/token)", vlines=marks),
        "The loss on the first and the repeated half over training. The repeated half's loss drops at the same "
        "steps as the induction score rises: the heads are what makes the model use the repeat.")
    return figs


def figures(r: InductionResult) -> dict[str, Union[go.Figure, Widget]]:
    """Verdict table, score and ablation heatmaps, attention viewers, loss by position, phase change; each
    with its caption."""
    figs: dict[str, Union[go.Figure, Widget]] = {"verdict": _verdict_figure(r), **_score_figures(r)}
    figs["attention of the top heads"] = _viewer(r.patterns_NSS, r.pattern_heads, r.tokens,
                                                 f"{r.name}: a random sequence of {r.config.seq_len} tokens, repeated")
    figs.update(_kind_figures(r))
    if r.passage_patterns_NSS is not None:
        figs["attention on a repeated text passage"] = _viewer(r.passage_patterns_NSS, r.pattern_heads,
                                                               r.passage_tokens,
                                                               f"{r.name}: a passage of held-out text, repeated")
    figs["loss by position"] = _loss_by_position_figure(r)
    if r.curves is not None:
        figs.update(_phase_change_figures(r, r.curves))
    return figs


ANALYSIS = Analysis(
    name="induction-heads",
    description="Induction, prefix-matching, previous/duplicate/first-token and copying scores, ablations, "
                "verdicts and the phase change over checkpoints.",
    config_cls=InductionConfig, compute=compute, figures=figures,
    default_models=("attn-only-2l", "attn-only-1l"),
    title="Attention and induction heads", order=20, key_figure="head scores",
    intro="An induction head completes patterns: having seen <code>A B</code>, when <code>A</code> comes again it "
          "attends to what followed it and predicts <code>B</code>. It needs two heads in series, a previous-token "
          "head in an earlier layer and the induction head reading its output through its keys (K-composition), "
          "so one-layer models cannot form one. They form abruptly during training, in a phase change, and account "
          "for much of in-context learning (Olsson et al., <i>In-context Learning and Induction Heads</i>, 2022). "
          "This page labels every head from its attention and from what ablating it does, on three kinds of "
          "repeated sequence, and follows the heads over the training checkpoints.",
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
