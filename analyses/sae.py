"""Sparse autoencoders on a model's activations: train several architectures from one stream of
activations, evaluate them (reconstruction, sparsity, dead latents, CE loss recovered, KL), plot the
L0–FVU frontier and the latent densities, and write feature dashboards for one of them.

    workbench run sae                                         # gelu-2l, blocks.0.hook_mlp_out, < 2 min
    workbench run sae --model attn-only-2l --hook blocks.1.hook_attn_out --saes topk:8 topk:32 relu:2
    workbench sae train --model gelu-2l --hook blocks.1.hook_resid_post --arch topk --k 32   # one SAE, saved

Every SAE trains on the same batches, from one forward pass of the model per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import plotly.graph_objects as go
import torch

from workbench.adapter.provenance import model_label
from workbench.cache.activations import TensorSource, check_hooks, model_activations, stream_activations
from workbench.cache.rows import text_batch
from workbench.config import check_types
from workbench.errors import InputError, check_field
from workbench.model.hooked import HookedModel
from workbench.report.dashboards import render_dashboards
from workbench.report.pipeline import Analysis
from workbench.report.plotting import bars, captioned, histograms, lines, table
from workbench.sae.features import collect_feature_data
from workbench.sae.interventions import MIN_ABLATION_GAP, downstream_metrics
from workbench.sae.metrics import ReconstructionStats, mmcs
from workbench.sae.modules import ARCH_ALIASES, ARCHITECTURES, SAEConfig, make_sae
from workbench.sae.synthetic import SyntheticFeatures
from workbench.sae.training import SAETrainConfig, train_saes
from workbench.strict_json import finite


@dataclass(frozen=True)
class SAEAnalysisConfig:
    """Settings of the SAE study."""

    hook: str = "blocks.0.hook_mlp_out"
    """The hook whose activations the SAEs read."""
    expansion: int = 8
    """d_sae = expansion × d_in."""
    saes: tuple[str, ...] = ("topk:8", "topk:16", "topk:32", "relu:1", "relu:4", "batchtopk:16", "jumprelu:1")
    """SAEs to train, 'architecture:value': k for topk/batchtopk, the sparsity coefficient for relu/jumprelu."""
    dashboard: str = "topk:16"
    """Which of them gets feature dashboards."""
    dashboard_features: int = 64
    """Latents with a dashboard page (evenly spaced ids)."""
    n_tokens: int = 1_000_000
    """Training tokens for each SAE (on a CPU, at most what `cpu_flop_budget` allows)."""
    cpu_flop_budget: float = 1e13
    """On a CPU, n_tokens is lowered, with a note, so that training every SAE costs at most about this
    many FLOPs (counted as 12 × d_in × d_sae per token per SAE; 1e13 is about 2.5 minutes on 2 cores).
    The shipped models stay under it at 1,000,000 tokens; GPT-2 small's 768-wide residual stream gets
    about 25,000. 0: no cap. Not applied on a GPU."""
    batch_size: int = 2048
    """Tokens per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    train_rows: int = 350
    """Rows of the standard library's source the activations are streamed from."""
    eval_rows: int = 50
    """Held-out rows for the evaluation and the dashboards."""
    seq_len: int = 128
    """Tokens per row (capped at the model's n_ctx)."""
    ground_truth: bool = True
    """Also score SAEs against 128 known features in 64 dimensions (about 5 active per sample):
    TopK at the true L0 with 0.5×, 1× and 2× dictionaries, and ReLU + L1 at 1×."""
    ground_truth_steps: int = 1500
    """Training steps (batch 1024) for the ground-truth SAEs."""
    seed: int = 0
    """Seed of initialisation and shuffling."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "SAEAnalysisConfig"
        check_field(len(self.saes) > 0, own, "saes", self.saes, "at least one 'architecture:value'")
        for spec in self.saes:
            parse_spec(spec)
        check_field(self.dashboard in self.saes, own, "dashboard", self.dashboard, f"one of saes {self.saes}")
        for name in ("expansion", "dashboard_features", "n_tokens", "batch_size", "train_rows", "eval_rows"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value > 0, own, name, value, "a positive integer")
        check_field(math.isfinite(self.cpu_flop_budget) and self.cpu_flop_budget >= 0, own, "cpu_flop_budget",
                    self.cpu_flop_budget, "a finite number ≥ 0 (0: no cap)")


def parse_spec(spec: str) -> tuple[str, float]:
    """'topk:16' -> ('topk', 16.0), with a clear error for anything else."""
    arch, _, value = spec.partition(":")
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in ARCHITECTURES or not value:
        raise InputError(f"SAE spec {spec!r} should be 'architecture:value' with architecture one of "
                         f"{sorted(ARCHITECTURES)}, e.g. 'topk:16' or 'relu:2'.")
    try:
        return arch, float(value)
    except ValueError:
        raise InputError(f"SAE spec {spec!r}: {value!r} is not a number.") from None


@dataclass(frozen=True, eq=False)
class SAEResult:
    model_name: str
    config: SAEAnalysisConfig
    d_in: int
    d_sae: int
    metrics_by_sae: dict[str, dict[str, float]]
    logs: dict[str, list[dict[str, Any]]]
    log10_density: dict[str, np.ndarray]
    pages: dict[str, str]
    ground_truth: dict[str, dict[str, float]]
    """SAE name -> MMCS, fraction recovered above 0.9 cosine, L0, FVU and dead fraction."""
    n_tokens: int
    """Training tokens each SAE saw (config.n_tokens, or less under cpu_flop_budget)."""
    budget_note: Optional[str] = None
    """Why n_tokens is below config.n_tokens, if it is."""

    def metrics(self) -> dict[str, Any]:
        notes = [f"{s}: ce_loss_recovered_{base} is null: {base}-ablating the hook changes the loss by less than "
                 f"{MIN_ABLATION_GAP} nats/token, so the ratio would be noise"
                 for s, m in self.metrics_by_sae.items() for base in ("zero", "mean")
                 if m[f"ce_loss_recovered_{base}"] is None]
        notes += [self.budget_note] if self.budget_note else []
        return {"hook": self.config.hook, "d_in": self.d_in, "d_sae": self.d_sae, "n_tokens": self.n_tokens,
                "saes": {s: {k: (finite(v) if isinstance(v, float) else v) for k, v in m.items()}
                         for s, m in self.metrics_by_sae.items()},
                "ground_truth": {s: {k: finite(v) for k, v in g.items()} for s, g in self.ground_truth.items()},
                "notes": notes}

    def headlines(self) -> list[str]:
        m = self.metrics_by_sae
        best = min(m, key=lambda s: m[s]["fvu"])
        out = [f"{len(m)} SAEs of {self.d_sae} latents on {self.config.hook} (d_in {self.d_in}), "
               f"{self.n_tokens:,} tokens each" + (f" ({self.budget_note})" if self.budget_note else "")]
        for s in m:
            rec = m[s]["ce_loss_recovered_zero"]
            gap = m[s]["ce_zero_ablation"] - m[s]["ce_clean"]
            recovered = (f"CE loss recovered {rec:.1%} (vs zero ablation)" if rec is not None else
                         f"CE loss recovered not given (zero-ablating the hook changes the loss by only {gap:+.4f} "
                         "nats, too little to divide by)")
            out.append(f"{s}: L0 {m[s]['l0']:.1f}, FVU {m[s]['fvu']:.3f}, dead {m[s]['dead_fraction']:.1%}, "
                       f"{recovered}, KL {m[s]['kl_div']:.3f}")
        out.append(f"lowest FVU: {best}; dashboards for {self.config.dashboard}")
        if self.ground_truth:
            out.append("known features (128 in 64 dimensions), MMCS: " + ", ".join(
                f"{name} {g['mmcs']:.3f}" for name, g in self.ground_truth.items()))
        return out

    def files(self) -> dict[str, str]:
        return {f"dashboards/{name}": text for name, text in self.pages.items()}


@torch.no_grad()
def _evaluate(model: HookedModel, sae: Any, hook: str, rows: torch.Tensor) -> tuple[dict[str, float], np.ndarray]:
    stats = ReconstructionStats(sae.d_sae)
    for start in range(0, len(rows), 16):
        x = model_activations(model, rows[start:start + 16], [hook])[hook].to(sae.W_dec.device)
        f = sae.encode(x)
        stats.add(x, sae.decode(f), f)
    out = stats.summary()
    out.update(downstream_metrics(model, sae, rows[:16], hook))
    return out, np.log10(stats.density().cpu().numpy() + 1e-7)


def score_on_known_features(cfg: SAEAnalysisConfig) -> dict[str, dict[str, float]]:
    """Train the ground-truth SAEs together on one stream of synthetic data and score them."""
    data = SyntheticFeatures(n_features=128, d=64, mean_active=5, seed=cfg.seed)
    x, _ = data.sample(100_000)
    specs = {"topk 0.5×": ("topk", 64), "topk 1×": ("topk", 128), "topk 2×": ("topk", 256), "relu 1×": ("relu", 128)}
    saes = {name: make_sae(SAEConfig(d_in=64, d_sae=d_sae, architecture=arch, k=5, l1_coefficient=3.0,
                                     hook_name="x"), seed=cfg.seed) for name, (arch, d_sae) in specs.items()}
    train_cfg = SAETrainConfig(sae=saes["topk 1×"].cfg, n_tokens=cfg.ground_truth_steps * 1024, batch_size=1024,
                               lr=1e-3, n_checkpoints=0, seed=cfg.seed)
    train_saes(saes, TensorSource(x, 1024, seed=cfg.seed), train_cfg)
    out = {}
    held_out, _ = data.sample(20_000, seed=2)
    for name, sae in saes.items():
        with torch.no_grad():
            f = sae.encode(held_out)
            stats = ReconstructionStats(sae.d_sae)
            stats.add(held_out, sae.decode(f), f)
        s = stats.summary()
        score, recovered = mmcs(data.directions, sae.W_dec)
        out[name] = {"mmcs": score, "recovered_above_0.9": recovered, "l0": s["l0"], "fvu": s["fvu"],
                     "dead_fraction": s["dead_fraction"]}
    return out


def compute(model: HookedModel, cfg: SAEAnalysisConfig) -> SAEResult:
    """Train every SAE of `cfg.saes` on one stream, evaluate them, and build the dashboards."""
    check_hooks(model, [cfg.hook])
    if model.tokenizer is None:
        raise InputError("The SAE study reads text; this model has no tokenizer.")
    seq = min(cfg.seq_len, int(model.cfg.n_ctx))
    rows = text_batch(model, cfg.train_rows + cfg.eval_rows, seq)
    if len(rows) < cfg.train_rows + cfg.eval_rows:
        raise InputError(f"Only {len(rows)} rows of text were found; lower train_rows/eval_rows.")
    train_rows, eval_rows = rows[:cfg.train_rows], rows[cfg.train_rows:]
    d_in = model_activations(model, rows[:1], [cfg.hook])[cfg.hook].shape[-1]
    device = next(model.parameters()).device
    saes = {}
    for spec in cfg.saes:
        arch, value = parse_spec(spec)
        extra = {"k": int(value)} if arch in ("topk", "batchtopk") else {"l1_coefficient": value}
        sae_cfg = SAEConfig(d_in=d_in, d_sae=cfg.expansion * d_in, architecture=arch, hook_name=cfg.hook,
                            model_name=model_label(model),
                            **extra)
        saes[spec] = make_sae(sae_cfg, seed=cfg.seed).to(device)
    n_tokens, budget_note = token_budget(cfg, d_in, device)
    train_cfg = SAETrainConfig(sae=next(iter(saes.values())).cfg, n_tokens=n_tokens, batch_size=cfg.batch_size,
                               lr=cfg.lr, n_checkpoints=0, seed=cfg.seed)
    logs = train_saes(saes, stream_activations(model, train_rows, [cfg.hook], batch_size=cfg.batch_size,
                                               seed=cfg.seed), train_cfg)
    metrics, density = {}, {}
    for spec, sae in saes.items():
        sae.eval()
        metrics[spec], density[spec] = _evaluate(model, sae, cfg.hook, eval_rows)
    dash = saes[cfg.dashboard]
    features = np.linspace(0, dash.d_sae - 1, min(cfg.dashboard_features, dash.d_sae)).round().astype(int).tolist()
    data = collect_feature_data(model, dash, eval_rows, cfg.hook, features=features)
    pages = render_dashboards(data, f"{cfg.dashboard} SAE on {cfg.hook}",
                              selection=f"{len(features)} evenly spaced latent ids from 0 to {dash.d_sae - 1}")
    name = model_label(model)
    truth = score_on_known_features(cfg) if cfg.ground_truth else {}
    return SAEResult(name, cfg, d_in, dash.d_sae, metrics, logs, density, pages, truth, n_tokens, budget_note)


def token_budget(cfg: SAEAnalysisConfig, d_in: int, device: torch.device) -> tuple[int, Optional[str]]:
    """(training tokens per SAE, a note when `cpu_flop_budget` lowered them): whole batches, at least 8."""
    per_token = 12 * d_in * cfg.expansion * d_in * len(cfg.saes)
    if device.type != "cpu" or not cfg.cpu_flop_budget or cfg.n_tokens * per_token <= cfg.cpu_flop_budget:
        return cfg.n_tokens, None
    n = max(8, int(cfg.cpu_flop_budget // per_token) // cfg.batch_size) * cfg.batch_size
    return n, (f"n_tokens lowered from {cfg.n_tokens:,} to {n:,} to keep {len(cfg.saes)} SAEs of "
               f"{cfg.expansion * d_in:,} latents within cpu_flop_budget ({cfg.cpu_flop_budget:.0e} FLOPs) on a CPU; "
               "far too few for good features: raise it, or use a GPU, where there is no cap")


def figures(r: SAEResult) -> dict[str, go.Figure]:
    """Evaluation table, training curves, the L0–FVU frontier, latent densities and known-feature recovery; each
    with its caption."""
    m = r.metrics_by_sae
    keys = ("l0", "fvu", "explained_variance", "mse", "cosine", "l2_ratio", "dead_fraction", "dense_fraction",
            "ce_loss_recovered_zero", "ce_loss_recovered_mean", "kl_div")
    figs = {"metrics": captioned(table(
        [(s, ", ".join(f"{k} {m[s][k]:.4g}" if m[s][k] is not None else f"{k} n/a" for k in keys)) for s in m],
        f"{r.model_name} · {r.config.hook}: evaluation on held-out text"),
        "Each SAE on held-out text: L0 (latents active per token), FVU (the share of variance it fails to "
        "reconstruct), dead and dense latents, and, with the SAE spliced into the model, the share of the loss it "
        "recovers and the KL divergence from the clean model. n/a: undefined (see the notes).")}
    for key, title, unit in (("fvu", "FVU", "FVU (share of variance)"), ("l0", "L0", "L0 (latents per token)")):
        curve = lines({s: [x["tokens"] for x in log] for s, log in r.logs.items()},
                      {s: [x[key] for x in log] for s, log in r.logs.items()},
                      f"{title} during training", "training tokens (log scale)", unit, log_x=True)
        figs[f"training {title}"] = captioned(curve, (
            f"{title} of each SAE during training. TopK SAEs hold L0 at k from the start; L1 and JumpReLU SAEs find "
            "their L0 as the sparsity penalty warms up."))
    by_arch: dict[str, list[str]] = {}
    for s in m:
        by_arch.setdefault(parse_spec(s)[0], []).append(s)
    frontier = lines(
        {a: [m[s]["l0"] for s in sorted(ss, key=lambda s: m[s]["l0"])] for a, ss in by_arch.items()},
        {a: [m[s]["fvu"] for s in sorted(ss, key=lambda s: m[s]["l0"])] for a, ss in by_arch.items()},
        "Sparsity against reconstruction (lower left is better)", "L0 (latents per token, log scale)",
        "FVU (share of variance)", log_x=True)
    figs["L0–FVU frontier"] = captioned(frontier, (
        "The trade-off every SAE makes: fewer active latents (left) against a worse reconstruction (up). One line "
        "per architecture; the architecture whose line lies lower and further left reconstructs better at the same "
        "sparsity."))
    figs["latent density"] = captioned(histograms(
        r.log10_density, "Latent firing density (log10; −7 = never fired)", "log10 of the fraction of tokens"),
        "How often each latent fires. Healthy dictionaries have most latents between 1e-4 and 1e-1; a pile at −7 "
        "is dead latents, one near 0 is dense latents that fire on almost everything.")
    if r.ground_truth:
        g = r.ground_truth
        known = bars({"MMCS": {n: v["mmcs"] for n, v in g.items()},
                      "recovered above 0.9": {n: v["recovered_above_0.9"] for n, v in g.items()}},
                     "Recovery of 128 known features in 64 dimensions (about 5 active per sample)",
                     "score (cosine, or share of features)")
        figs["known features"] = captioned(known, (
            "On synthetic data whose true features are known: the mean max cosine similarity between each true "
            "feature and its closest latent, and the share recovered above 0.9. A dictionary half the size of the "
            "feature set cannot hold them all."))
    return figs


ANALYSIS = Analysis(
    name="sae",
    description="Train SAEs of several architectures on one hook, evaluate them, plot the L0–FVU frontier, "
                "and write feature dashboards.",
    config_cls=SAEAnalysisConfig, compute=compute, figures=figures, default_models=("gelu-2l",),
    title="Sparse autoencoders", order=50,
    intro="A sparse autoencoder (SAE) rewrites a layer's activations as a sparse sum of many more directions than the "
          "layer has dimensions, undoing superposition into features a person can read (Bricken et al., <i>Towards "
          "Monosemanticity</i>, 2023; Gao et al., <i>Scaling and evaluating sparse autoencoders</i>, 2024). This "
          "page trains SAEs of four architectures on one hook of the model from one stream of activations, compares "
          "how sparse and how faithful they are, checks them on synthetic data with known features, and links "
          "feature dashboards: each latent's top activating contexts and the logits it raises.",
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
