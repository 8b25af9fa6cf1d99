# Over 500 lines: what is left is the study's own (config, transcoder cache, prompts, figure captions).
"""Circuit tracing: replace each MLP by a transcoder, build attribution graphs for a few prompts, prune
them, score them, test them with interventions on the real model, and show them in an interactive
viewer (Ameisen et al., "Circuit Tracing", 2025).

    workbench run circuit-tracing                         # facts and gelu-2l, shipped transcoders, < 3 min
    workbench run circuit-tracing --model gelu-2l --prompts "abcdefgh abcdefg"
    workbench run circuit-tracing --model hf:/path/to/gpt2 --transcoders runs/transcoders-gpt2
    workbench transcoder train --model gelu-2l --d-tc 512 --k 16 --skip    # transcoders of your own

Prompts by default: on a model trained on the `facts` knowledge base, facts it recalls ("<person>'s
birthplace is"), whose graphs are compared with causal tracing; on any other model, induction
prompts (random tokens, repeated), where the answer should come from the token after the earlier
occurrence, through attention.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench.adapter.provenance import model_label, model_name_of, run_folder
from workbench.artifacts import TRANSCODERS_MANIFEST
from workbench.cache.rows import held_out_text, readable_ids, special_ids
from workbench.compute.attribution_graph import (
    AttributionGraph,
    GraphConfig,
    build_graph,
    check_supported,
    fact_finding,
    graph_files,
    graph_scores,
    induction_finding,
    intervene,
    prune,
    viewer_data,
    viewer_examples,
)
from workbench.config import check_types
from workbench.errors import CheckpointError, ConfigError, check_field
from workbench.model.hooked import HookedModel
from workbench.report.dashboards import render_dashboards
from workbench.report.pipeline import Analysis
from workbench.report.plotting import bars, captioned, heatmap, table
from workbench.report.widgets import SECTION_FILES, Widget, graph_viewer
from workbench.sae.features import collect_feature_data
from workbench.sae.transcoder_vs_sae import compare_with_sae
from workbench.sae.transcoders import (
    Transcoders,
    evaluate_transcoders,
    load_transcoders,
    mlp_layers,
    train_transcoders,
)
from workbench.train.lifecycle import TrainingInterrupted

SHIPPED = "transcoders"
"""Where a shipped model keeps its transcoders: models/<name>/transcoders/."""


@dataclass(frozen=True)
class CircuitTracingConfig:
    """Settings of the circuit-tracing study."""

    transcoders: str = ""
    """A folder written by `workbench transcoder train`; empty: the model's shipped transcoders, or ones
    trained now (and cached) with the settings below."""
    prompts: tuple[str, ...] = ()
    """Prompts to trace, as text; each gets the model's BOS first (where it has one), as the default prompts
    have it, so a default prompt's text gives its graph. Empty: facts the model recalls (a `facts` model) or
    induction prompts."""
    n_prompts: int = 3
    """Default prompts traced."""
    node_threshold: float = 0.8
    """Pruning: keep the features and errors holding this share of the influence on the logits."""
    edge_threshold: float = 0.98
    """Pruning: keep the edges holding this share of the influence among the kept nodes."""
    node_definitions: str = "workbench"
    """'workbench' (raw logits, token plus position embedding, every error node, sources not counted in
    the shares) or 'circuit-tracer' (its choices: `GraphConfig.circuit_tracer_compatible()`), so that
    the graphs, pruning and scores can be set beside circuit-tracer's or Neuronpedia's."""
    ablate: int = 3
    """Interventions: ablate each of the graph's this many most influential features, one at a time."""
    d_tc: int = 0
    """Features per layer when training transcoders here; 0, the default, means 8 × d_model."""
    k: int = 16
    """Features per token and layer (TopK with AuxK) when training here."""
    n_tokens: int = 1_000_000
    """Training tokens when training here."""
    compare_sae: bool = True
    """Also train a TopK SAE of the same width and k on the middle layer's MLP output, and compare."""
    sae_tokens: int = 1_000_000
    """Its training tokens (as many as the shipped transcoders saw)."""
    eval_rows: int = 48
    """Held-out rows for the transcoder and SAE metrics and the feature dashboards."""
    viewer_nodes: int = 100
    """Features and errors drawn in each viewer (the most influential; tokens and logits always)."""
    dashboard_features: int = 30
    """Features of each graph (the most influential) given a dashboard page and examples in the viewer."""
    seed: int = 0
    """Seed of the default prompts and of any training."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "CircuitTracingConfig"
        for name in ("node_threshold", "edge_threshold"):
            value = getattr(self, name)
            check_field(0 <= value <= 1, own, name, value, "in [0, 1] (a share of the influence on the logits)")
        for name in ("n_prompts", "eval_rows", "viewer_nodes", "k", "n_tokens", "sae_tokens", "dashboard_features"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        check_field(self.ablate >= 0, own, "ablate", self.ablate, "an integer ≥ 0")
        check_field(self.node_definitions in ("workbench", "circuit-tracer"), own, "node_definitions",
                    self.node_definitions, "'workbench' or 'circuit-tracer'")
        check_field(self.d_tc >= 0, own, "d_tc", self.d_tc, "an integer ≥ 0 (0: 8 × d_model)")


def graph_config(cfg: CircuitTracingConfig) -> GraphConfig:
    """The graphs' node definitions (see `GraphConfig`)."""
    return GraphConfig.circuit_tracer_compatible() if cfg.node_definitions == "circuit-tracer" else GraphConfig()


@dataclass(frozen=True, eq=False)
class TracedPrompt:
    """One prompt's graph and what was measured on it."""

    kind: str
    """'fact', 'induction' or 'given'."""
    prompt: str
    graph: AttributionGraph
    kept_nodes: int
    kept_edges: int
    scores: dict[str, float]
    """replacement and completeness scores, of the whole graph and of the pruned one."""
    interventions: list[dict[str, Any]]
    viewer: dict[str, Any]
    finding: dict[str, Any]
    """What this prompt's graph says about its own question (see `headlines`)."""


@dataclass(frozen=True, eq=False)
class CircuitTracingResult:
    model_name: str
    config: CircuitTracingConfig
    source: str
    """Where the transcoders came from."""
    kind: str
    width: int
    quality: dict[str, Any]
    sae: dict[str, Any]
    prompts: list[TracedPrompt]
    pages: dict[str, str]

    def metrics(self) -> dict[str, Any]:  # made strict JSON (no NaN) where the report writes metrics.json
        return {"transcoders": {"source": self.source, "kind": self.kind, "width": self.width, **self.quality},
                "sae_comparison": self.sae, "node_definitions": self.config.node_definitions,
                "graphs": [{"kind": p.kind, "prompt": p.prompt, "nodes": p.graph.n_nodes,
                            "features": p.graph.n_features, "kept_nodes": p.kept_nodes, "kept_edges": p.kept_edges,
                            **p.scores, "identity_max_relative_error": p.graph.meta["identity_max_relative_error"],
                            "logit_max_error": p.graph.meta["logit_max_error"],
                            "interventions": p.interventions, "finding": p.finding}
                           for p in self.prompts]}

    def headlines(self) -> list[str]:
        q = self.quality
        out = [f"{self.kind} transcoders, {self.width} features per layer ({self.source}): FVU of the MLP outputs "
               + ", ".join(f"L{x['layer']} {x['fvu']:.3f}" for x in q["layers"])
               + f"; every MLP replaced recovers {_pct(q['ce_loss_recovered_zero'])} of the loss "
               "(vs zero-ablating them)"]
        if self.sae:
            s = self.sae
            out.append(f"layer {s['layer']}: transcoder FVU {s['transcoder']['fvu']:.3f} at L0 "
                       f"{s['transcoder']['l0']:.1f} (CE recovered {_pct(s['transcoder']['ce_loss_recovered'])}) "
                       "vs an SAE "
                       f"of the same width on the MLP output: FVU {s['sae']['fvu']:.3f} at L0 {s['sae']['l0']:.1f} "
                       f"(CE recovered {_pct(s['sae']['ce_loss_recovered'])})")
        for p in self.prompts:
            line = (f"{p.prompt!r}: {p.graph.n_features} active features, pruned to {p.kept_nodes} nodes and "
                    f"{p.kept_edges} edges; replacement score {p.scores['replacement_score']:.2f}, completeness "
                    f"{p.scores['completeness_score']:.2f}")
            f = p.finding
            if p.kind == "fact" and f.get("agree") is not None:
                line += (f"; at the last token: {f['graph_last_token_share']:.0%} of the graph's influence (peak layer "
                         f"{f['graph_peak_layer']}) and {f['trace_last_token_share']:.0%} of causal tracing's MLP "
                         f"effect (peak layer {f['trace_peak_layer']}): "
                         f"{'they agree' if f['agree'] else 'they disagree'}"
                         f"; before it, the graph points to the {f['graph_peak_group']!r}, tracing to the "
                         f"{f['trace_peak_group']!r} (correlation over layer × position {f['correlation']:.2f})")
            if p.kind == "induction":
                line += (f"; the token after the earlier occurrence ranks #{f['earlier_rank']} of {f['n_positions']} "
                         f"positions in influence on the answer ({f['earlier_share']:.0%} of the tokens' influence)")
            out.append(line)
        return out

    def files(self) -> dict[str, Union[str, bytes]]:
        out: dict[str, Union[str, bytes]] = {f"dashboards/{name}": text for name, text in self.pages.items()}
        for i, p in enumerate(self.prompts):
            out.update({f"graphs/{self.model_name}/{i}/{n}": d for n, d in graph_files(p.graph).items()})
        return out


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1%}"


# -- transcoders -----------------------------------------------------------------------------------------
def get_transcoders(model: HookedModel, cfg: CircuitTracingConfig) -> tuple[Transcoders, str]:
    """(transcoders, where they came from): the given folder, the shipped ones, a cached training run,
    or a new one (saved to the cache for next time)."""
    mlp_layers(model)  # a clear error for an attention-only model
    device = next(model.parameters()).device
    if cfg.transcoders:
        tc = load_transcoders(cfg.transcoders, device)
        tc.check_model(model)
        return tc, cfg.transcoders
    folder, _ = run_folder(model)
    if folder is not None and (folder / SHIPPED / TRANSCODERS_MANIFEST).exists():
        return _its_own(load_transcoders(folder / SHIPPED, device), model), f"shipped in {folder.name}/{SHIPPED}"
    cached = cache_folder(model, cfg)
    if (cached / TRANSCODERS_MANIFEST).exists():
        return _its_own(load_transcoders(cached, device), model), f"trained earlier, cached in {cached}"
    unfinished = cached.exists()
    return _train_into_cache(model, cfg, cached), (f"trained now ({cfg.n_tokens:,} tokens"
                                                   f"{', continuing an interrupted run' if unfinished else ''}), "
                                                   f"cached in {cached}")


def _its_own(tc: Transcoders, model: HookedModel) -> Transcoders:
    """Shipped or cached transcoders, named after `model` and checked against it: they belong to it by
    where they are (its own folder, or a cache keyed by its weights), whatever name they were saved
    under (the folder may have been renamed since)."""
    tc = replace(tc, model_name=model_name_of(model))
    tc.check_model(model)
    return tc


def _train_into_cache(model: HookedModel, cfg: CircuitTracingConfig, cached: Path) -> Transcoders:
    """Train the study's transcoders into the cache folder `cached`. A run an earlier study left there
    unfinished (Ctrl-C, a kill) is continued; one that cannot be (damaged, or from other settings) is
    removed and trained again. Ctrl-C here stops as it does everywhere else (KeyboardInterrupt, exit 130)
    after saving a checkpoint that the next run continues from."""
    d_tc = cfg.d_tc or 8 * int(model.cfg.d_model)
    unfinished = cached.exists()
    print(f"{'Continuing the unfinished transcoder training' if unfinished else 'Training transcoders'} for this "
          f"model in the cache {cached} ({cfg.n_tokens:,} tokens; later runs with the same settings reuse them)",
          file=sys.stderr)

    def train(resume: bool) -> Transcoders:
        return train_transcoders(model, d_tc, cached, "topk", cfg.k, skip=True, n_tokens=cfg.n_tokens, seed=cfg.seed,
                                 n_checkpoints=0, resume=resume)[0]

    try:
        try:
            return train(resume=unfinished)
        except (CheckpointError, ConfigError) as err:  # the cached run cannot be resumed (damaged, or stale)
            if not unfinished:
                raise
            print(f"The unfinished run in {cached} cannot be continued ({err}); training afresh.", file=sys.stderr)
            shutil.rmtree(cached)  # the study's own cache folder, nothing else
            return train(resume=False)
    except TrainingInterrupted as stop:
        print(f"\nTranscoder training interrupted at step {stop.step}; run the study again with the same settings "
              f"to continue it from the cache {cached}.", file=sys.stderr)
        raise KeyboardInterrupt(str(stop)) from None


def cache_folder(model: HookedModel, cfg: CircuitTracingConfig) -> Path:
    """Where the study keeps the transcoders it trains for `model` with `cfg`'s settings (keyed by the
    model's weights and those settings, so it never serves another model's)."""
    from workbench.data.text import cache_dir

    d_tc = cfg.d_tc or 8 * int(model.cfg.d_model)
    key = hashlib.sha256(repr((_fingerprint(model), d_tc, cfg.k, cfg.n_tokens, cfg.seed)).encode()).hexdigest()[:16]
    return cache_dir() / "transcoders" / key


def _fingerprint(model: HookedModel) -> str:
    """A short hash of the model's weights (so a cache never serves another model's transcoders)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if p.is_floating_point():
            h.update(name.encode())
            h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return h.hexdigest()


# -- prompts ---------------------------------------------------------------------------------------------
def default_prompts(model: HookedModel, cfg: CircuitTracingConfig) -> list[tuple[str, Any, dict[str, Any]]]:
    """[(kind, prompt text or token ids, what to check)]: facts the model recalls, else induction prompts."""
    from workbench.compute.causal_tracing import FactPrompt, encode_fact, top1_hits
    from workbench.data.facts import KnowledgeBase

    data = ((getattr(model, "meta", None) or {}).get("train") or {}).get("data") or {}
    if data.get("text") == "facts" and model.tokenizer is not None:
        facts = [FactPrompt(f.prompt, f.subject, f.target) for f in KnowledgeBase().prompts("train")[:200]]
        encs = [encode_fact(model, f, i) for i, f in enumerate(facts)]
        hits = top1_hits(model, encs)
        known = [i for i, ok in enumerate(hits) if ok]
        rng = np.random.default_rng(cfg.seed)
        chosen = sorted(rng.choice(known, size=min(cfg.n_prompts, len(known)), replace=False).tolist())
        return [("fact", encs[i].tokens[0].cpu(), {"fact": facts[i], "encoded": encs[i]}) for i in chosen]
    bos, _ = special_ids(model)
    allowed = readable_ids(model)
    out = []
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.n_prompts):
        seq = allowed[torch.randperm(len(allowed), generator=gen)[:8]]
        prefix = [bos] if bos is not None else []
        toks = torch.tensor(prefix + seq.tolist() + seq[:-1].tolist())
        out.append(("induction", toks, {"answer": int(seq[-1]), "earlier": len(prefix) + len(seq) - 1}))
    return out


# -- compute ---------------------------------------------------------------------------------------------
def compute(model: HookedModel, cfg: CircuitTracingConfig) -> CircuitTracingResult:
    """Transcoders (given, shipped or trained), their quality against an SAE, and one pruned, scored and
    intervened-on attribution graph per prompt, with feature dashboards for the viewer."""
    check_supported(model)  # before any training: a model whose attention cannot be frozen is refused now
    tc, source = get_transcoders(model, cfg)
    name = model_label(model)
    rows, _ = held_out_text(model, cfg.eval_rows, min(int(model.cfg.n_ctx), 128))
    rows = rows.to(next(model.parameters()).device)
    quality = evaluate_transcoders(model, tc, rows)
    try:
        sae = compare_with_sae(model, tc, quality, rows, cfg.sae_tokens, cfg.seed) if cfg.compare_sae else {}
    except TrainingInterrupted as stop:  # Ctrl-C: exit as everywhere else; nothing of this SAE is kept
        print("\nThe SAE comparison was interrupted (it is trained anew each run; the transcoders stay cached).",
              file=sys.stderr)
        raise KeyboardInterrupt(str(stop)) from None
    if cfg.prompts:
        specs = [("given", p, {}) for p in cfg.prompts]
    else:
        specs = default_prompts(model, cfg)
    traced: list[TracedPrompt] = []
    graphs = []
    for kind, prompt, info in tqdm(specs, desc="attribution graphs", unit="prompt", disable=None, leave=False):
        g = build_graph(model, tc, prompt, graph_config(cfg), progress=False)
        graphs.append((kind, prompt, info, g))
    pages, examples, hrefs = _dashboards(model, tc, [g for *_, g in graphs], rows, cfg)
    for kind, _prompt, info, g in graphs:
        pr = prune(g, cfg.node_threshold, cfg.edge_threshold)
        scores = {**graph_scores(g), **{f"pruned_{k}": v for k, v in graph_scores(g, pr).items()}}
        top = [int(i) for i in pr.node_influence[:g.n_features].argsort(descending=True)[:cfg.ablate]]
        inter = [{"node": n, "label": g.node(n)["label"], **intervene(model, tc, g, [n], 0.0)} for n in top]
        finding = (fact_finding(model, g, info["fact"], info["encoded"]) if kind == "fact" else
                   induction_finding(g, info["answer"], info["earlier"]) if kind == "induction" else {})
        text = "".join(g.token_strs)
        traced.append(TracedPrompt(kind, text, g, int(pr.node_mask.sum()), int(pr.edge_mask.sum()), scores, inter,
                                   viewer_data(g, cfg.viewer_nodes, examples=examples, hrefs=hrefs), finding))
    return CircuitTracingResult(name, cfg, source, tc.kind, tc.width(0), quality, sae, traced, pages)


def _dashboards(model: HookedModel, tc: Transcoders, graphs: list[AttributionGraph], rows: torch.Tensor,
                cfg: CircuitTracingConfig) -> tuple[dict[str, str], dict, dict]:
    """Dashboards (per-layer transcoders) for each graph's `dashboard_features` most influential features:
    pages, each feature's top examples, and links from the viewer to its page."""
    if tc.per_layer is None:
        return {}, {}, {}
    wanted: dict[int, set[int]] = {}
    for g in graphs:
        pr = prune(g, 1.0, 1.0)
        for n in pr.node_cut[:g.n_features].argsort()[:cfg.dashboard_features].tolist():
            l, _, f = (int(v) for v in g.features[n])
            wanted.setdefault(l, set()).add(f)
    pages, examples, hrefs = {}, {}, {}
    for l, feats in sorted(wanted.items()):
        ids = sorted(feats)
        data = collect_feature_data(model, tc.per_layer[l], rows, features=ids, progress=False)
        for name, text in render_dashboards(data, f"Transcoder features, layer {l}",
                                            selection="the features drawn in this page's attribution graphs").items():
            pages[f"layer_{l}/{name}"] = text
        for j, f in enumerate(ids):
            hrefs[(l, f)] = f"{SECTION_FILES}/dashboards/layer_{l}/feature_{f:05d}.html"
            examples[(l, f)] = viewer_examples(data, j)
    return pages, examples, hrefs


# -- figures ---------------------------------------------------------------------------------------------
def figures(r: CircuitTracingResult) -> dict[str, Union[go.Figure, Widget]]:
    """Transcoder quality (and the SAE beside it), then per prompt: the graph viewer, its scores, the
    interventions against the graph's predictions, and its finding."""
    figs: dict[str, Union[go.Figure, Widget]] = {"transcoders": _quality_table(r)}
    if r.sae:
        figs["transcoder vs SAE"] = _sae_bars(r.sae)
    for i, p in enumerate(r.prompts):
        tag = f"graph {i + 1}"
        figs[tag] = _viewer(r, p)
        if p.interventions:
            figs[f"{tag}: interventions"] = _interventions(p)
        if p.kind == "fact" and p.finding:
            figs[f"{tag}: graph vs causal tracing"] = _graph_vs_tracing(p)
        if p.kind == "induction" and p.finding:
            figs[f"{tag}: token influence"] = _token_influence(p)
    return figs


def _quality_table(r: CircuitTracingResult) -> go.Figure:
    """How well the transcoders imitate each MLP, and the loss with every MLP replaced."""
    q = r.quality
    rows = [(f"layer {x['layer']}", f"FVU {x['fvu']:.3f}, L0 {x['l0']:.1f}, silent {x['dead_fraction']:.1%}, CE loss "
                                     f"recovered replacing this MLP alone {_pct(x['ce_loss_recovered_alone'])}")
            for x in q["layers"]]
    rows.append(("every MLP replaced", f"CE {q['ce']['replaced']:.3f} vs clean {q['ce']['clean']:.3f}: recovered "
                                       f"{_pct(q['ce_loss_recovered_zero'])} vs zero-ablation, "
                                       f"{_pct(q['ce_loss_recovered_mean'])} vs mean-ablation"))
    rows.append(("with error terms", f"CE changes by {q['with_errors_max_loss_change']:.1e} (exact by construction)"))
    return captioned(table(
        rows, f"{r.model_name}: {r.kind} transcoders, {r.width} features per layer ({r.source})"),
        "How well the transcoders imitate each MLP on held-out text: the share of the MLP output's variance they "
        "miss (FVU), features active per token (L0), features that never fired on these held-out tokens (silent; "
        "a short sample, so more than the trainer's dead count), and the next-token loss with MLPs replaced "
        "(without error terms, position 0 left as it is) relative to ablating them. With the error terms added "
        "back the model is exact.")


def _sae_bars(s: dict[str, Any]) -> go.Figure:
    """The middle layer's transcoder beside an SAE of the same width and k (`compare_with_sae`)."""
    return captioned(bars(
        {"transcoder": {"FVU": s["transcoder"]["fvu"],
                        "CE loss recovered": s["transcoder"]["ce_loss_recovered"] or 0,
                        "dead": s["transcoder"]["dead_fraction"]},
         "SAE": {"FVU": s["sae"]["fvu"], "CE loss recovered": s["sae"]["ce_loss_recovered"] or 0,
                 "dead": s["sae"]["dead_fraction"]}},
        f"Layer {s['layer']}: transcoder vs SAE, {s['width']} features, k = {s['k']}", "share"),
        "The price of imitating the MLP rather than reconstructing its output: both dictionaries have the same "
        "width and sparsity and are scored on the same MLP output. An SAE sees the output it reconstructs; a "
        "transcoder must predict it from the MLP's input, so its FVU is usually higher. Its features, in "
        "return, connect input to output, which is what makes attribution graphs possible.")


def _viewer(r: CircuitTracingResult, p: TracedPrompt) -> Widget:
    """The prompt's graph in the interactive viewer, with its pruning and scores in the caption."""
    return graph_viewer(p.viewer, f"{p.prompt!r} ({p.kind})", (
        f"The attribution graph of this prompt: {p.graph.n_features} active features, {p.graph.n_errors} error "
        f"nodes, {p.graph.n_pos} tokens and {p.graph.n_logits} logits; drawn: the {r.config.viewer_nodes} most "
        "influential features and errors. Rows are layers (tokens at the bottom, logits on top), columns are "
        "positions; edge width is the direct effect, blue positive, red negative. Click a node for its top "
        "activating examples, dashboard and strongest edges; the sliders re-prune (node threshold: share of "
        "the influence on the logits kept; edge threshold ranks edges by influence in the whole graph). "
        f"Pruned at {r.config.node_threshold}/{r.config.edge_threshold}: {p.kept_nodes} nodes, {p.kept_edges} "
        f"edges. Replacement score {p.scores['replacement_score']:.2f} "
        f"(pruned {p.scores['pruned_replacement_score']:.2f}), "
        f"completeness {p.scores['completeness_score']:.2f} (pruned {p.scores['pruned_completeness_score']:.2f})."))


def _interventions(p: TracedPrompt) -> go.Figure:
    """Single-feature ablations: the real model's change of the top logit against the graph's predictions."""
    strs = p.graph.meta.get("logit_strs", [])
    top = 0
    return captioned(bars(
        {"real model": {x["label"]: x["actual"][top] for x in p.interventions},
         "graph, direct edges": {x["label"]: x["predicted_direct"][top] for x in p.interventions},
         "graph, through features": {x["label"]: x["predicted_graph"][top] for x in p.interventions}},
        f"Ablating single features: change of the top logit {strs[top] if strs else ''!r}",
        "change of the logit"), (
        "Each of the graph's most influential features is ablated in the real model (its decoder write "
        "removed from the MLP outputs), and the change of the top logit is compared with the graph's "
        "prediction from its direct edge and from all paths through later features (linearised). The "
        "real model also moves its attention patterns and normalisation scales, which the graph holds "
        "fixed; where the bars disagree, that is why."))


def _graph_vs_tracing(p: TracedPrompt) -> go.Figure:
    """A fact's graph influence by layer and position group, above causal tracing's on the same prompt."""
    f = p.finding
    groups = f["groups"]
    z = np.concatenate([np.array(f["graph"]) / max(np.abs(f["graph"]).max(), 1e-12),
                        np.array(f["trace"]) / max(np.abs(f["trace"]).max(), 1e-12)], 1)
    return captioned(heatmap(
        z.T, [f"L{l}" for l in range(p.graph.n_layers)],
        [f"graph: {g}" for g in groups] + [f"tracing: {g}" for g in groups],
        f"Where the answer {f['target']!r} is computed: graph influence vs causal tracing",
        "layer", "", colorbar="share of its maximum"), (
        "Top rows: the graph's influence on the answer logit through features and error nodes, by layer and "
        "position group (mean per position). Bottom rows: causal tracing (ROME) on the same prompt, the "
        "probability restored by restoring each MLP output. At the last token: "
        f"{f['graph_last_token_share']:.0%} of the graph's influence, peak layer {f['graph_peak_layer']}; "
        f"{f['trace_last_token_share']:.0%} of the tracing effect, peak layer {f['trace_peak_layer']}. "
        f"Before it, the graph points to the {f['graph_peak_group']!r}, tracing to the "
        f"{f['trace_peak_group']!r}; correlation over the grid {f['correlation']:.2f}."))


def _token_influence(p: TracedPrompt) -> go.Figure:
    """An induction prompt's token influence on the answer: the token after the earlier occurrence should lead."""
    f = p.finding
    return captioned(bars(
        {"influence": {f"{j}:{p.graph.token_strs[j]}": v for j, v in enumerate(f["token_influence"])}},
        "Influence of each token on the answer logit", "influence"), (
        f"Each input token's influence on the answer, through every path of the graph. The token after the "
        f"earlier occurrence (position {f['earlier_position']}) ranks #{f['earlier_rank']}: an induction "
        "head copies it to the last position through attention, the only way it can get there."))


ANALYSIS = Analysis(
    name="circuit-tracing",
    description="Transcoders replace the MLPs; attribution graphs of a few prompts, pruned, scored, checked by "
                "interventions, in an interactive viewer.",
    config_cls=CircuitTracingConfig, compute=compute, figures=figures, default_models=("facts", "gelu-2l"),
    title="Circuit tracing", order=65,
    intro="Circuit tracing replaces each MLP by a <i>transcoder</i>, a sparse, wide MLP trained to imitate it, "
          "and freezes the attention patterns and normalisation scales of one prompt. Everything left is linear, "
          "so every active feature's direct effect on every later feature and on the logits can be read off: the "
          "prompt's <i>attribution graph</i> (Dunefsky et al., <i>Transcoders find interpretable LLM feature "
          "circuits</i>, 2024; Ameisen et al., <i>Circuit Tracing</i>, 2025). This page measures how well the "
          "transcoders imitate the MLPs, draws each prompt's graph, prunes it to the nodes that carry most of the "
          "influence on the logits, tests it by ablating features in the real model, and compares it with causal "
          "tracing.",
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
