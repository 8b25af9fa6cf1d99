"""Fact recall: where a model stores facts and how it gets them out. Causal tracing of the residual
stream, MLPs and attention; linear probes for the attribute against a randomly initialised control;
attention knockout from the last token to the subject; direct logit attribution to the target.

    workbench run fact-recall                                  # the shipped facts model, its own facts
    workbench run fact-recall --model hf:/path/to/model --facts-file my_facts.json

A facts file is a JSON list of {"prompt", "subject", "target"} (the target a single token, e.g.
" Paris"); without one, a model trained on `DataConfig(text="facts")` uses its knowledge base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench.adapter import random_control
from workbench.adapter.provenance import model_label
from workbench.cache.collect import layer_hooks
from workbench.cache.probing import probe_activations, split_prompts
from workbench.compute.causal_tracing import (
    GROUPS,
    FactPrompt,
    attention_knockout,
    causal_trace,
    encode_fact,
    position_groups,
    top1_hits,
)
from workbench.compute.logit_attribution import direct_logit_attribution
from workbench.compute.probes import ProbeConfig, ProbeSweep, fit_probes
from workbench.config import check_types
from workbench.data.facts import KnowledgeBase
from workbench.errors import InputError, check_field
from workbench.model.hooked import HookedModel
from workbench.report.pipeline import Analysis
from workbench.report.plotting import bars, captioned, heatmap, lines
from workbench.strict_json import finite, json_array, ratio


@dataclass(frozen=True)
class FactRecallConfig:
    """Settings of the fact-recall study."""

    facts_file: str = ""
    """JSON list of {"prompt", "subject", "target"}; empty: the model's own knowledge base."""
    n_facts: int = 60
    """Facts traced (of those the model gets right, top-1)."""
    noise: float = 3.0
    """Subject corruption: Gaussian noise of this many embedding standard deviations."""
    noise_samples: int = 3
    """Noise draws averaged per fact."""
    window: int = 3
    """Layers restored together for MLP and attention traces (and blocked together in knockout)."""
    probe_subject_fraction: float = 0.3
    """Share of subjects held out to evaluate the probes on."""
    seed: int = 0
    """Seed of the noise, the fact sample and the probe split."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "FactRecallConfig"
        check_field(self.noise > 0, own, "noise", self.noise, "positive (in embedding standard deviations)")
        for name in ("n_facts", "noise_samples", "window"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        check_field(0 < self.probe_subject_fraction < 1, own, "probe_subject_fraction",
                    self.probe_subject_fraction, "in (0, 1)")


def load_facts(path: str) -> list[FactPrompt]:
    """Facts from a JSON list; errors name the offending row."""
    try:
        rows = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"No facts file {path!r}.") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path} has no facts: it should be a non-empty JSON list of "
                         '{"prompt", "subject", "target"} objects.')
    out = []
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", "subject", "target") if not isinstance(row, dict) or k not in row]
        if missing:
            raise InputError(f"{path}, row {i}: missing {missing}; each row needs prompt, subject and target.")
        out.append(FactPrompt(str(row["prompt"]), str(row["subject"]), str(row["target"])))
    return out


def _knowledge_base(model: HookedModel) -> Optional[KnowledgeBase]:
    data = (getattr(model, "meta", {}).get("train") or {}).get("data") or {}
    return KnowledgeBase() if data.get("text") == "facts" else None


MIN_EFFECT = 0.01
"""A change of p(target) (or a p(target)) below this, one percentage point, is too small to divide
by: shares of it are reported as null and left out of the headlines."""


@dataclass(frozen=True, eq=False)
class FactRecallResult:
    name: str
    config: FactRecallConfig
    n_layers: int
    recall: dict[str, float]
    traces: dict[str, dict[str, np.ndarray]]
    """component -> position group -> mean indirect effect [L]."""
    p_clean: float
    p_corrupt: float
    probes: dict[str, dict[str, np.ndarray]]
    """'model' / 'control task' / 'control' -> position -> held-out accuracy [L]: the model's probes, the
    same probes on Hewitt and Liang's control task (a random attribute per subject), and probes on a
    randomly initialised model of the same shape."""
    knockout: dict[str, np.ndarray]
    """'subject' / 'other' -> relative drop in p(target) per window start [L]."""
    dla: dict[str, float]
    n_traced: int
    n_known: int
    """Facts (of the first set) the model recalls top-1; the traced facts are drawn from these, or,
    when there are none, from all the facts (and the headlines say so)."""
    probe_interval: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """'low' / 'high' -> position -> the bootstrap 95% interval of the model's probe accuracy [L]."""

    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupt

    def share_of_total(self) -> Optional[float]:
        """The last token's residual effect at the last layer as a share of the total effect, or None
        when the total effect is below MIN_EFFECT."""
        return ratio(self.traces["resid"]["last token"][-1], self.total_effect(), MIN_EFFECT)

    def knockout_defined(self) -> bool:
        """Relative knockout drops divide by p(target): only meaningful when that is not noise."""
        return self.p_clean >= MIN_EFFECT

    def metrics(self) -> dict[str, Any]:
        notes = []
        if self.share_of_total() is None:
            notes.append(f"share_of_total_effect is null: the corruption changes p(target) by "
                         f"{self.total_effect():+.4f}, below {MIN_EFFECT}")
        if not self.knockout_defined():
            notes.append(f"knockout is null: p(target) is {self.p_clean:.4f} clean, below {MIN_EFFECT}, so a "
                         "relative drop is noise")
        if self.n_known == 0:
            notes.append("the model recalls none of the facts top-1; the traced facts are ones it does not know")
        return {"recall": {k: finite(v) for k, v in self.recall.items()}, "n_traced": self.n_traced,
                "n_known": self.n_known, "p_clean": finite(self.p_clean), "p_corrupt": finite(self.p_corrupt),
                "share_of_total_effect": finite(self.share_of_total()) if self.share_of_total() is not None else None,
                "traces": {c: {g: (None if v is None else json_array(v)) for g, v in d.items()}
                           for c, d in self.traces.items()},
                "probes": {k: {p: json_array(v) for p, v in d.items()} for k, d in self.probes.items()},
                "probe_interval": {k: {p: json_array(v) for p, v in d.items()} for k, d in self.probe_interval.items()},
                "knockout": ({k: json_array(v) for k, v in self.knockout.items()} if self.knockout_defined()
                             else {k: None for k in self.knockout}),
                "dla": {k: finite(v) for k, v in self.dla.items()}, "mlp_peak": self.mlp_peak(), "notes": notes}

    def mlp_peak(self) -> dict[str, Any]:
        best = max(((g, int(np.argmax(v)), float(np.max(v))) for g, v in self.traces["mlp"].items() if v is not None),
                   key=lambda t: t[2])
        return {"position": best[0], "layer": best[1], "effect": best[2]}

    def headlines(self) -> list[str]:
        which = (f"{self.n_traced} facts the model gets right" if self.n_known else
                 f"{self.n_traced} facts although the model recalls none of them (top-1), so these effects are "
                 "of facts it does not know")
        out = [", ".join(f"recall {k} {v:.1%}" for k, v in self.recall.items()) +
               f"; traced {which}: p(target) {self.p_clean:.2f} clean, {self.p_corrupt:.2f} with the subject corrupted"]
        r = self.traces["resid"]
        late = r["last token"]
        early = r["last subject token"]
        share = self.share_of_total()
        of_total = (f" ({share:.0%} of the total effect)" if share is not None else
                    f" (the corruption changes p(target) by only {self.total_effect():+.3f}, too little to give "
                    "a share of)")
        if early is not None:
            out.append(f"residual stream: at the last subject token the effect peaks at layer {int(np.argmax(early))} "
                       f"({early.max():.2f}); at the last token it reaches {late[-1]:.2f} by the last layer{of_total}")
        peak = self.mlp_peak()
        out.append(f"MLP effect peaks at layer {peak['layer']}, {peak['position']} ({peak['effect']:.2f})")
        probe, ctrl, task = self.probes["model"], self.probes["control"], self.probes["control task"]
        for pos in probe:
            best = int(np.argmax(probe[pos]))
            acc, base, ct = probe[pos][best], ctrl[pos][best], task[pos][best]
            ci = (f" [{self.probe_interval['low'][pos][best]:.0%}, {self.probe_interval['high'][pos][best]:.0%}]"
                  if self.probe_interval else "")
            out.append(f"probe at the {pos}: best layer {best}, held-out accuracy {acc:.0%}{ci} (control task "
                       f"{ct:.0%}, selectivity {acc - ct:+.0%}; random-init model {base:.0%})")
        ko = self.knockout["subject"]
        if self.knockout_defined():
            out.append(f"blocking last-token attention to the subject hurts most from layer {int(np.argmax(ko))} "
                       f"(p(target) −{ko.max():.0%}); to other tokens at most −{self.knockout['other'].max():.0%}")
        else:
            out.append(f"attention knockout: p(target) is {self.p_clean:.4f} clean, too small for a relative drop")
        return out


def _probe_sweep(model: HookedModel, encs: list, labels: list[str], subjects: list[str], cfg: FactRecallConfig
                 ) -> ProbeSweep:
    """Logistic probes for the attribute at each layer's residual stream, at the last subject token and
    the last token, scored on held-out subjects (train and test subjects never overlap), with
    Hewitt and Liang's control task (a random attribute per subject) beside each."""
    acts = probe_activations(model, [e.tokens[0] for e in encs], layer_hooks(model, "hook_resid_post"),
                             {"last subject token": [e.subject[1] - 1 for e in encs], "last token": -1},
                             batch_size=128)
    split = split_prompts(acts, cfg.probe_subject_fraction, groups=subjects, seed=cfg.seed)
    return fit_probes(acts, labels, split, ProbeConfig(seed=cfg.seed))


@torch.no_grad()
def compute(model: HookedModel, cfg: FactRecallConfig) -> FactRecallResult:
    kb = _knowledge_base(model)
    if cfg.facts_file:
        facts, held, names = load_facts(cfg.facts_file), [], ("given facts", "")
    elif kb is not None:
        facts, held = ([FactPrompt(f.prompt, f.subject, f.target) for f in kb.prompts(split)]
                       for split in ("train", "heldout"))
        names = ("train", "held-out phrasing")
    else:
        raise InputError("This model has no knowledge base of its own; pass --facts-file with a JSON list of "
                         '{"prompt", "subject", "target"}.')
    encs = [encode_fact(model, f, i) for i, f in enumerate(facts)]
    correct = top1_hits(model, encs)
    recall = {names[0]: float(np.mean(correct))}
    if held:
        recall[names[1]] = float(np.mean(top1_hits(model, [encode_fact(model, f, i) for i, f in enumerate(held)])))
    n_known = sum(correct)
    known = [i for i, ok in enumerate(correct) if ok] or list(range(len(facts)))
    rng = np.random.default_rng(cfg.seed)
    traced = sorted(rng.choice(known, size=min(cfg.n_facts, len(known)), replace=False).tolist())
    L = model.cfg.n_layers
    sums = {c: {g: np.zeros(L) for g in GROUPS} for c in ("resid", "mlp", "attn")}
    counts = {g: 0 for g in GROUPS}
    ko_sum = {"subject": np.zeros(L), "other": np.zeros(L)}
    p_clean = p_corrupt = 0.0
    dla_sum: dict[str, float] = {}
    for i in tqdm(traced, desc="tracing facts", unit="fact", disable=None, leave=False):
        enc = encs[i]
        t = causal_trace(model, enc, cfg.noise, window=cfg.window, n_samples=cfg.noise_samples, seed=cfg.seed + i)
        p_clean += t["p_clean"]
        p_corrupt += t["p_corrupt"]
        groups = position_groups(enc)
        for g in GROUPS:
            if groups.get(g):
                counts[g] += 1
                for c in sums:
                    sums[c][g] += t[c][:, groups[g]].mean(1)
        subject = list(range(*enc.subject))
        other = [p for p in range(1, enc.tokens.shape[1] - 1) if p not in subject]
        for key, positions in (("subject", subject), ("other", other)):
            pc, p = attention_knockout(model, enc, positions, cfg.window)
            ko_sum[key] += (pc - p) / max(pc, 1e-9)
        with_target = torch.cat([enc.tokens, torch.tensor([[enc.target]], device=enc.tokens.device)], 1)
        attribution = direct_logit_attribution(model, with_target)
        for label, v in zip(attribution.labels, attribution.contributions_CBP[:, 0, -1].tolist()):
            dla_sum[label] = dla_sum.get(label, 0.0) + v
    n = len(traced)
    traces = {c: {g: (sums[c][g] / counts[g] if counts[g] else None) for g in GROUPS} for c in sums}
    # probes: every fact, attribute label per relation value; control: a random model of the same shape
    labels = [f.target for f in facts]
    subjects = [f.subject for f in facts]
    sweep = _probe_sweep(model, encs, labels, subjects, cfg)
    control = _probe_sweep(random_control(model, cfg.seed), encs, labels, subjects, cfg)

    def by_position(a_LQ: np.ndarray) -> dict[str, np.ndarray]:
        return {pos: a_LQ[:, q] for q, pos in enumerate(sweep.positions)}

    probes = {"model": by_position(sweep.score_SQ), "control task": by_position(sweep.control_SQ),
              "control": by_position(control.score_SQ)}
    interval = {"low": by_position(sweep.low_SQ), "high": by_position(sweep.high_SQ)}
    return FactRecallResult(model_label(model), cfg, L, recall, traces,
                            p_clean / n, p_corrupt / n, probes, {k: v / n for k, v in ko_sum.items()},
                            {k: v / n for k, v in dla_sum.items()}, n, n_known, interval)


def figures(r: FactRecallResult) -> dict[str, go.Figure]:
    """Causal traces (residual stream, MLP, attention), probes, knockout and attribution; each with its caption."""
    L = r.n_layers
    figs = {}
    groups = [g for g in GROUPS if r.traces["resid"][g] is not None]
    looks = {"resid": "In ROME's GPT-2 XL the effect moves from the last subject token to the last token in the middle "
                      "layers; where it sits here says where this model carries the fact.",
             "mlp": "ROME found the decisive MLPs at the last subject token, early to middle layers; compare the rows.",
             "attn": "Attention carries the fact from the subject to the last token; look for where that happens."}
    for comp, title in (("resid", "residual stream"), ("mlp", f"MLP (window {r.config.window})"),
                        ("attn", f"attention (window {r.config.window})")):
        z = np.stack([r.traces[comp][g] for g in groups])
        trace = heatmap(
            z, [f"L{l}" for l in range(L)], groups,
            f"Indirect effect of restoring the {title} (p(target): {r.p_clean:.2f} clean, {r.p_corrupt:.2f} corrupted)",
            "layer", "position", colorbar="Δp(target), probability",
            colorscale="Purples" if comp == "resid" else ("Greens" if comp == "mlp" else "Reds"))
        figs[f"causal trace: {title}"] = captioned(trace, (
            f"The subject's embeddings are corrupted with noise; then the clean {title} at one layer and position "
            f"is restored, and the cell shows how much of p(target) comes back. {looks[comp]}"))
    xs = {f"{k}: {pos}": list(range(L)) for k in r.probes for pos in r.probes[k]}
    ys = {f"{k}: {pos}": r.probes[k][pos] for k in r.probes for pos in r.probes[k]}
    figs["linear probes"] = captioned(lines(
        xs, ys, "Probe accuracy for the attribute on held-out subjects (control task: a random attribute per "
        "subject; control: a randomly initialised model of the same shape)", "layer",
        "accuracy (share of held-out subjects)"),
        "A linear probe reads the attribute from the residual stream at each layer, for people it never saw in "
        "training. Accuracy well above the control task and the random-model control means the fact is linearly "
        "present there.")
    figs["attention knockout"] = captioned(lines(
        {k: list(range(L)) for k in r.knockout}, r.knockout,
        f"Relative drop in p(target) when the last token cannot attend to them (layers l…l+{r.config.window - 1})",
        "first blocked layer", "relative drop in p(target)"),
        "Block the last token's attention to the subject (or, as a control, to the other tokens) in a window of "
        "layers. A large drop marks the layers where attention moves the fact to where it is said.")
    figs["direct logit attribution"] = captioned(bars(
        {"to the target": r.dla}, "Direct contribution to the target's logit at the last token (mean over traced "
        "facts)", "logit"),
        "How much each head and MLP writes, directly, to the correct attribute's logit at the last token.")
    return figs


ANALYSIS = Analysis(
    name="fact-recall",
    description="Causal tracing, linear probes, attention knockout and direct logit attribution of fact recall.",
    config_cls=FactRecallConfig, compute=compute, figures=figures, default_models=("facts",),
    title="Fact recall", order=60,
    intro="Where does a model keep a fact such as a person's home town, and how does it get it out? Causal tracing "
          "(Meng et al., <i>Locating and Editing Factual Associations in GPT</i>, 2022) corrupts the subject and "
          "restores one activation at a time to find the sites that carry the fact; attention knockout (Geva et al., "
          "<i>Dissecting Recall of Factual Associations</i>, 2023) finds where it is moved to the last token; linear "
          "probes show where it can be read. The <code>facts</code> model was trained on a synthetic knowledge base of "
          "made-up people, so every fact and its phrasing are known.",
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
