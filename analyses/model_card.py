"""Model card: config, parameter count, training and validation curves, and attention patterns on
a repeated random sequence and on a text sample, with each head's induction and previous-token
scores. Runs on workbench models and on TransformerBridge models.

    python -m analyses.model_card --model attn-only-2l
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from workbench.artifacts import LOG_FILE
from workbench.attention_scores import induction_score, previous_token_score
from workbench.config import check_types
from workbench.data import repeated_sequence
from workbench.plotting import attention_picker, heatmap, lines, table
from workbench.report import Analysis


@dataclass(frozen=True)
class ModelCardConfig:
    """Settings of the model card."""

    repeat_len: int = 24
    """Length of the random token sequence that is repeated once for the attention sample."""
    n_repeats: int = 16
    """Random sequences averaged over for the head scores."""
    text: str = "def greet(name):\n    return 'Hello, ' + name\n\nprint(greet('world'))\n"
    """Text sample whose attention patterns are shown."""
    seed: int = 0
    """Seed of the random sequences."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.repeat_len < 2 or self.n_repeats < 1:
            raise ValueError("ModelCardConfig.repeat_len must be ≥ 2 and n_repeats ≥ 1.")


@dataclass(frozen=True, eq=False)
class ModelCardResult:
    """What the model card shows. Arrays: L layers, H heads, S positions."""

    name: str
    config: dict[str, Any]
    n_params: int
    train_log: tuple[dict[str, Any], ...]
    head_names: tuple[str, ...]
    repeat_tokens: tuple[str, ...]
    repeat_patterns_NSS: np.ndarray
    text_tokens: tuple[str, ...]
    text_patterns_NSS: np.ndarray
    induction_LH: np.ndarray
    prev_token_LH: np.ndarray
    repeat_len: int

    def metrics(self) -> dict[str, Any]:
        L, H = self.induction_LH.shape
        ind = np.unravel_index(self.induction_LH.argmax(), (L, H))
        prev = np.unravel_index(self.prev_token_LH.argmax(), (L, H))
        out: dict[str, Any] = {"n_params": self.n_params, "n_layers": L, "n_heads": H,
                               "max_induction_score": float(self.induction_LH.max()),
                               "max_induction_head": f"L{ind[0]}H{ind[1]}",
                               "max_prev_token_score": float(self.prev_token_LH.max()),
                               "max_prev_token_head": f"L{prev[0]}H{prev[1]}",
                               "induction_LH": self.induction_LH.round(4).tolist(),
                               "prev_token_LH": self.prev_token_LH.round(4).tolist()}
        evals = [r for r in self.train_log if any(k.startswith("val_loss") for k in r)]
        if evals:
            out.update({k: v for k, v in evals[-1].items() if k.startswith("val_loss")})
            out["tokens_trained"] = evals[-1]["tokens"]
        return out

    def headlines(self) -> list[str]:
        m = self.metrics()
        layers = f"{m['n_layers']} layer{'s' if m['n_layers'] != 1 else ''}"
        lines_ = [f"{self.n_params:,} parameters, {layers} × {m['n_heads']} heads"]
        if "val_loss_text" in m:
            lines_.append(f"validation loss {m['val_loss_text']:.3f} on text after {m['tokens_trained']:,} tokens")
        lines_.append(f"strongest induction head {m['max_induction_head']} (score {m['max_induction_score']:.2f}); "
                      f"strongest previous-token head {m['max_prev_token_head']} ({m['max_prev_token_score']:.2f})")
        return lines_


def _config_dict(model: Any) -> dict[str, Any]:
    cfg = model.cfg
    if hasattr(cfg, "to_dict") and callable(cfg.to_dict):
        raw = cfg.to_dict()
    else:
        raw = vars(cfg)
    keep = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act_fn", "normalization_type", "n_ctx", "d_vocab")
    return {k: raw.get(k) for k in keep}


def _train_log(model: Any) -> tuple[dict[str, Any], ...]:
    folder = getattr(model, "folder", None)  # TransformerBridge models have no training log
    if folder is None or not (folder / LOG_FILE).exists():
        return ()
    return tuple(json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines() if line.strip())


@torch.no_grad()
def compute(model: Any, cfg: ModelCardConfig) -> ModelCardResult:
    """Run the model on repeated random sequences and a text sample; collect patterns and scores."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    device = next(model.parameters()).device
    is_pattern = lambda name: name.endswith("attn.hook_pattern")  # noqa: E731
    vocab = min(model.cfg.d_vocab, 256)
    rep = repeated_sequence(cfg.n_repeats, cfg.repeat_len, vocab, cfg.seed).to(device)
    _, cache = model.run_with_cache(rep, names_filter=is_pattern)
    pats = [cache[f"blocks.{l}.attn.hook_pattern"].float() for l in range(L)]  # each [B, H, S, S]
    induction = torch.stack([induction_score(p, cfg.repeat_len) for p in pats]).cpu().numpy()
    prev = torch.stack([previous_token_score(p) for p in pats]).cpu().numpy()
    rep_NSS = torch.cat([p[0] for p in pats]).cpu().numpy()

    if model.tokenizer is not None:  # a model saved without a tokenizer gets no text sample
        text = model.to_tokens(cfg.text)[:, : model.cfg.n_ctx].to(device)
        _, tcache = model.run_with_cache(text, names_filter=is_pattern)
        text_NSS = torch.cat([tcache[f"blocks.{l}.attn.hook_pattern"][0].float() for l in range(L)]).cpu().numpy()
        text_tokens = tuple(model.to_str_tokens(text[0].cpu()))
    else:
        text_NSS, text_tokens = np.zeros((L * H, 0, 0)), ()

    folder = getattr(model, "folder", None)
    return ModelCardResult(
        name=folder.name if folder is not None else type(model).__name__,
        config=_config_dict(model), n_params=sum(p.numel() for p in model.parameters()),
        train_log=_train_log(model), head_names=tuple(f"L{l}H{h}" for l in range(L) for h in range(H)),
        repeat_tokens=tuple(model.to_str_tokens(rep[0].cpu())), repeat_patterns_NSS=rep_NSS,
        text_tokens=text_tokens, text_patterns_NSS=text_NSS,
        induction_LH=induction, prev_token_LH=prev, repeat_len=cfg.repeat_len)


def figures(r: ModelCardResult) -> dict[str, go.Figure]:
    """Config table, training curves, head-score heatmaps and attention pickers."""
    figs = {"config": table([(k, str(v)) for k, v in {**r.config, "parameters": f"{r.n_params:,}"}.items()],
                            f"{r.name}: configuration")}
    train = [x for x in r.train_log if "loss" in x]
    evals = [x for x in r.train_log if any(k.startswith("val_loss") for k in x)]
    if train or evals:
        xs, ys = {}, {}
        if train:
            xs["train loss"], ys["train loss"] = [x["tokens"] for x in train], [x["loss"] for x in train]
        for key in sorted({k for x in evals for k in x if k.startswith("val_loss")}):
            pts = [x for x in evals if key in x and x["tokens"] > 0]
            xs[key], ys[key] = [x["tokens"] for x in pts], [x[key] for x in pts]
        figs["training curves"] = lines(xs, ys, f"{r.name}: loss during training", "training tokens",
                                        "loss (nats/token)", log_x=True)
    L, H = r.induction_LH.shape
    figs["induction scores"] = heatmap(r.induction_LH, [f"H{h}" for h in range(H)], [f"L{l}" for l in range(L)],
                                       f"Induction score (random length-{r.repeat_len} sequence repeated once)",
                                       "head", "layer", colorbar="score (attention probability)")
    figs["previous-token scores"] = heatmap(r.prev_token_LH, [f"H{h}" for h in range(H)], [f"L{l}" for l in range(L)],
                                            "Previous-token score", "head", "layer",
                                            colorbar="score (attention probability)")
    figs["attention on a repeated sequence"] = attention_picker(r.repeat_patterns_NSS, r.head_names,
                                                                r.repeat_tokens, "Attention, repeated random tokens")
    if r.text_tokens:
        figs["attention on text"] = attention_picker(r.text_patterns_NSS, r.head_names, r.text_tokens,
                                                     "Attention, text sample")
    return figs


ANALYSIS = Analysis(
    name="model-card", description="Config, size, training curves and attention patterns of a model.",
    config_cls=ModelCardConfig, compute=compute, figures=figures,
    default_models=("attn-only-1l", "attn-only-2l", "gelu-2l"),
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
