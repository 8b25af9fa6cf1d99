"""Model card: config, parameter count, training and validation curves, each head's induction and
previous-token scores, an attention viewer on a few prompts (and one of your own, `--prompt`), and
the logit lens on the same prompts. Runs on workbench models and on TransformerBridge models.

    python -m analyses.model_card --model attn-only-2l --prompt "The cat sat on the mat. The cat sat"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import plotly.graph_objects as go
import torch

from workbench.adapter.provenance import model_label, training_log
from workbench.adapter.tokens import token_strings
from workbench.compute.attention_scores import induction_score, previous_token_score
from workbench.compute.lens import LensMismatchError, LogitLens, logit_lens
from workbench.config import check_types
from workbench.data.text import repeated_sequence
from workbench.errors import check_field
from workbench.model.hooked import HookedModel
from workbench.report.pipeline import Analysis
from workbench.report.plotting import captioned, heatmap, lines, logit_lens_figure, table
from workbench.report.widgets import Widget, attention_viewer

DEFAULT_PROMPTS = (
    "def greet(name):\n    return 'Hello, ' + name\n\nprint(greet('world'))\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
)


@dataclass(frozen=True)
class ModelCardConfig:
    """Settings of the model card."""

    repeat_len: int = 24
    """Length of the random token sequence that is repeated once for the head scores and a viewer."""
    n_repeats: int = 16
    """Random sequences averaged over for the head scores."""
    prompt: str = ""
    """Your own prompt for the attention viewer and the logit lens, shown first (at most n_ctx tokens)."""
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    """The default prompts for the attention viewer and the logit lens."""
    lens_positions: int = 48
    """The logit lens shows at most this many positions of each prompt (the first ones)."""
    seed: int = 0
    """Seed of the random sequences."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "ModelCardConfig"
        check_field(self.repeat_len >= 2, own, "repeat_len", self.repeat_len, "≥ 2")
        check_field(self.n_repeats >= 1, own, "n_repeats", self.n_repeats, "≥ 1")
        check_field(self.lens_positions >= 2, own, "lens_positions", self.lens_positions, "≥ 2")


@dataclass(frozen=True, eq=False)
class PromptView:
    """One prompt as the model sees it: its tokens, every head's pattern, and its logit lens."""

    label: str
    tokens: tuple[str, ...]
    patterns_LHSS: np.ndarray
    lens: Optional[LogitLens]
    lens_tokens: tuple[tuple[str, ...], ...]
    """[R][S'] the lens's top-1 prediction at each readout and shown position, as readable text."""


@dataclass(frozen=True, eq=False)
class ModelCardResult:
    """What the model card shows. Arrays: L layers, H heads, S positions."""

    name: str
    config: dict[str, Any]
    n_params: int
    train_log: tuple[dict[str, Any], ...]
    induction_LH: np.ndarray
    prev_token_LH: np.ndarray
    repeat_len: int
    views: tuple[PromptView, ...]
    lens_note: str
    """Why no logit lens is shown, when none is ('' otherwise)."""

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
        for v in self.views:
            if v.lens is not None:
                out[f"lens_final_next_token_prob: {v.label}"] = float(np.nanmean(v.lens.next_prob_RS[-1]))
        evals = [r for r in self.train_log if any(k.startswith("val_loss") for k in r)]
        if evals:
            out.update({k: v for k, v in evals[-1].items() if k.startswith("val_loss")})
            out["tokens_trained"] = evals[-1]["tokens"]
        return out

    def headlines(self) -> list[str]:
        m = self.metrics()
        layers = f"{m['n_layers']} layer{'s' if m['n_layers'] != 1 else ''}"
        mlp = self.config.get("d_mlp")
        kind = "attention only" if mlp in (None, 0) else f"MLPs of width {mlp}"
        lines_ = [f"{self.n_params:,} parameters, {layers} × {m['n_heads']} heads, {kind}"]
        if "val_loss_text" in m:
            lines_.append(f"validation loss {m['val_loss_text']:.3f} on text after {m['tokens_trained']:,} tokens")
        lines_.append(f"strongest induction head {m['max_induction_head']} (score {m['max_induction_score']:.2f}); "
                      f"strongest previous-token head {m['max_prev_token_head']} ({m['max_prev_token_score']:.2f})")
        if self.lens_note:
            lines_.append(self.lens_note)
        return lines_


def _config_dict(model: HookedModel) -> dict[str, Any]:
    cfg = model.cfg
    if hasattr(cfg, "to_dict") and callable(cfg.to_dict):
        raw = cfg.to_dict()
    else:
        raw = vars(cfg)
    keep = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act_fn", "normalization_type", "n_ctx", "d_vocab")
    return {k: raw.get(k) for k in keep}


def _tokens(model: HookedModel, ids: torch.Tensor) -> tuple[str, ...]:
    return tuple(token_strings(model, ids))


def _view(model: HookedModel, label: str, tokens_1S: torch.Tensor, cfg: ModelCardConfig, with_lens: bool
          ) -> tuple[PromptView, str]:
    L = model.cfg.n_layers
    _, cache = model.run_with_cache(tokens_1S, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0].float() for l in range(L)]).cpu().numpy()
    lens, lens_tokens, note = None, (), ""
    if with_lens:
        try:
            lens = logit_lens(model, tokens_1S[:, : cfg.lens_positions])
            lens_tokens = tuple(tuple(token_strings(model, row)) for row in lens.top_ids_RSK[..., 0])
        except LensMismatchError as err:
            note = f"no logit lens: {err}"
    return PromptView(label, _tokens(model, tokens_1S[0].cpu()), patterns, lens, lens_tokens), note


@torch.no_grad()
def compute(model: HookedModel, cfg: ModelCardConfig) -> ModelCardResult:
    """Head scores on repeated random sequences; patterns and the logit lens on each prompt."""
    L = model.cfg.n_layers
    device = next(model.parameters()).device
    vocab = min(model.cfg.d_vocab, 256)
    rep = repeated_sequence(cfg.n_repeats, cfg.repeat_len, vocab, cfg.seed).to(device)
    _, cache = model.run_with_cache(rep, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    pats = [cache[f"blocks.{l}.attn.hook_pattern"].float() for l in range(L)]  # each [B, H, S, S]
    induction = torch.stack([induction_score(p, cfg.repeat_len) for p in pats]).cpu().numpy()
    prev = torch.stack([previous_token_score(p) for p in pats]).cpu().numpy()

    prompts = [("your prompt", cfg.prompt)] if cfg.prompt else []
    prompts += [(f"prompt {i + 1}", p) for i, p in enumerate(cfg.prompts)]
    views, notes = [], []
    if model.tokenizer is not None:  # a model saved without a tokenizer gets no text prompts
        for label, text in prompts:
            tokens = model.to_tokens(text)[:, : model.cfg.n_ctx].to(device)
            view, note = _view(model, label, tokens, cfg, with_lens=L > 1)
            views.append(view)
            notes.append(note)
    view, _ = _view(model, f"a random sequence of {cfg.repeat_len} tokens, repeated", rep[:1], cfg, with_lens=False)
    views.append(view)

    return ModelCardResult(
        name=model_label(model),
        config=_config_dict(model), n_params=sum(p.numel() for p in model.parameters()),
        train_log=tuple(training_log(model)[0]), induction_LH=induction, prev_token_LH=prev, repeat_len=cfg.repeat_len,
        views=tuple(views), lens_note=next((n for n in notes if n), ""))


def _lens_figure(name: str, v: PromptView) -> go.Figure:
    return logit_lens_figure(v.lens, v.tokens, v.lens_tokens,
                             f"{name}: logit lens on {v.label} (cell: the top prediction for the next token)")


def figures(r: ModelCardResult) -> dict[str, Union[go.Figure, Widget]]:
    """Config table, training curves, head-score heatmaps, attention viewers and logit lenses."""
    figs: dict[str, Union[go.Figure, Widget]] = {"config": captioned(
        table([(k, str(v)) for k, v in {**r.config, "parameters": f"{r.n_params:,}"}.items()],
              f"{r.name}: configuration"),
        "The architecture in TransformerLens's names: layers, residual width, heads and their width, MLP width "
        "(None: attention only), context length and vocabulary size.")}
    train = [x for x in r.train_log if "loss" in x]
    evals = [x for x in r.train_log if any(k.startswith("val_loss") for k in x)]
    if train or evals:
        xs, ys = {}, {}
        if train:
            xs["train loss"], ys["train loss"] = [x["tokens"] for x in train], [x["loss"] for x in train]
        for key in sorted({k for x in evals for k in x if k.startswith("val_loss")}):
            pts = [x for x in evals if key in x and x["tokens"] > 0]
            xs[key], ys[key] = [x["tokens"] for x in pts], [x[key] for x in pts]
        figs["training curves"] = captioned(
            lines(xs, ys, f"{r.name}: loss during training", "training tokens (log scale)", "loss (nats/token)",
                  log_x=True),
            "Training loss and validation loss on held-out text and on fresh synthetic rows. A sudden drop in the "
            "synthetic loss late in training is the induction-head phase change.")
    L, H = r.induction_LH.shape
    figs["induction scores"] = captioned(heatmap(
        r.induction_LH, [f"H{h}" for h in range(H)], [f"L{l}" for l in range(L)],
        f"Induction score (random length-{r.repeat_len} sequence repeated once)", "head", "layer",
        colorbar="score (attention probability)"),
        "How much each head attends, on the repeated half, to the token right after the earlier copy of the current "
        "token. Near 1: an induction head. They need a head in an earlier layer to build on, so a 1-layer model "
        "has none.")
    figs["previous-token scores"] = captioned(heatmap(
        r.prev_token_LH, [f"H{h}" for h in range(H)], [f"L{l}" for l in range(L)], "Previous-token score", "head",
        "layer", colorbar="score (attention probability)"),
        "How much each head attends to the token just before the current one. A previous-token head in layer 0 is "
        "the first half of the induction circuit.")
    for v in r.views:
        S = len(v.tokens)
        figs[f"attention: {v.label}"] = attention_viewer(
            v.tokens, v.patterns_LHSS, f"{r.name}: {v.label} ({S} tokens)",
            "The prompt as the model reads it, token by token. Hover a token (or click to pin it) to shade the "
            "earlier tokens by how much the chosen head attends to them from there; the strip lists every head's "
            "strongest key. On a repeated sequence, an induction head attends to the token after the earlier copy.")
    for v in r.views:
        if v.lens is not None:
            figs[f"logit lens: {v.label}"] = _lens_figure(r.name, v)
    return figs


ANALYSIS = Analysis(
    name="model-card", description="Config, size, training curves, head scores, an attention viewer and the logit "
                                   "lens of a model.",
    config_cls=ModelCardConfig, compute=compute, figures=figures,
    default_models=("attn-only-1l", "attn-only-2l", "gelu-2l"),
    title="The models", order=10, key_figure="",
    intro="What each model is and how it was trained, then what its heads do. A transformer's residual stream is "
          "a sum that every attention head and MLP reads from and writes to (Elhage et al., <i>A Mathematical "
          "Framework for Transformer Circuits</i>, 2021). Attention heads move information between positions: the "
          "attention viewer shows, for any token of a prompt, where each head looks from it. The logit lens "
          "(nostalgebraist, 2020) reads the residual stream after each layer as if the model stopped there, showing "
          "when its prediction forms.",
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
