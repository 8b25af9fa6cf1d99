"""QK/OV circuits: every head's full QK, positional QK and full OV circuit as FactoredMatrix objects
with their statistics, Q/K/V-composition scores against a random baseline, direct logit
attribution, and path patching of the induction circuit.

    python -m analyses.circuits --model attn-only-2l
    workbench run circuits --model hf:/path/to/a/saved/model --seq-len 20

It explains what the induction-heads analysis finds: the induction head's keys read the
previous-token head's output (K-composition), its OV circuit copies, and patching the
previous-token head's output into the induction head's keys alone breaks induction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from workbench.adapter import describe
from workbench.adapter.provenance import model_label
from workbench.cache.collect import (
    half_losses,
    head_names,
    layer_hooks,
    parse_head,
    per_token_loss,
    require_attention,
    run_collect,
)
from workbench.cache.rows import probe_tokens, text_batch
from workbench.compute.attention_scores import induction_score, previous_token_score
from workbench.compute.logit_attribution import direct_logit_attribution
from workbench.compute.path_patching import path_patch_many
from workbench.compute.qk_ov import (
    FoldedWeights,
    composition_scores,
    copying_score,
    diagonal_fraction,
    direct_path,
    effective_rank,
    folded_weights,
    ov_circuit,
    pos_qk_circuit,
    qk_circuit,
    random_composition_baseline,
    sample_rows,
)
from workbench.config import check_types
from workbench.errors import InputError, check_field
from workbench.model.hooked import HookedModel
from workbench.report.pipeline import Analysis
from workbench.report.plotting import bars, captioned, heatmap, heatmap_picker, table
from workbench.strict_json import finite, json_array

MODES = ("K", "Q", "V")
COMPONENTS = ("q", "k", "v")


@dataclass(frozen=True)
class CircuitsConfig:
    """Settings of the circuits analysis."""

    induction_head: str = "auto"
    """The head whose circuit is patched, e.g. 'L1H1'; 'auto': the head with the highest induction score."""
    prev_token_head: str = "auto"
    """The sender for path patching, e.g. 'L0H1'; 'auto': the highest previous-token score in an
    earlier layer than the induction head."""
    seq_len: int = 40
    """Length of the random sequence, repeated once, for head finding, attribution and patching."""
    n_sequences: int = 16
    """Random sequences (batch) averaged over."""
    max_rows: int = 1024
    """Circuits with more rows than this (a large vocabulary) are measured on a random sample of
    this many rows, a chunk at a time, never materialised whole. Each sampled row is scored against
    every column, so at a 50k vocabulary this is most of the analysis's time; 1,024 rows put the
    standard error of a diagonal fraction under 0.016."""
    plot_tokens: int = 100
    """Tokens (and positions) shown in the circuit heatmaps."""
    n_random: int = 64
    """Random head pairs averaged for each composition baseline."""
    max_senders: int = 16
    """Earlier heads path-patched into the induction head: all of them when there are at most this
    many, else this many with the highest K-composition into it (the previous-token head always
    among them). Each costs three forward passes, so a 144-head model needs a bound on 2 CPU cores."""
    text_rows: int = 16
    """Rows of the standard library's source for direct logit attribution on text."""
    text_len: int = 64
    """Tokens per text row (capped at the model's n_ctx)."""
    seed: int = 0
    """Seed of the random sequences and of any row sample."""

    def __post_init__(self) -> None:
        check_types(self)
        own = "CircuitsConfig"
        for name in ("seq_len", "plot_tokens", "text_len"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= 2, own, name, value, "an integer ≥ 2")
        for name in ("n_sequences", "max_rows", "n_random", "text_rows", "max_senders"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= 1, own, name, value, "a positive integer")
        for name in ("induction_head", "prev_token_head"):
            value = getattr(self, name)
            check_field(isinstance(value, str) and value.strip() != "", own, name, value,
                        "'auto' or a head like 'L1H1'")


@dataclass(frozen=True, eq=False)
class CircuitsResult:
    """What the circuits analysis found. [L, H] arrays unless named otherwise."""

    name: str
    config: CircuitsConfig
    d_model: int
    stats: dict[str, dict[str, np.ndarray]]
    """Circuit ('OV', 'QK', 'QK positional') -> statistic -> [L, H]."""
    direct_path_stats: dict[str, float]
    composition: dict[str, np.ndarray]
    """'K', 'Q', 'V' -> [L, H, L, H] (NaN unless the second head is in a later layer)."""
    baselines: dict[str, float]
    induction_head: str
    induction_score: float
    """The induction head's induction score on the repeated sequences."""
    prev_token_head: Optional[str]
    path_patching: dict[str, np.ndarray]
    """'q', 'k', 'v' -> [heads in earlier layers]: repeated-half loss with that head's output from
    other tokens patched into that input of the induction head."""
    sender_heads: tuple[str, ...]
    clean_loss: float
    dla: dict[str, dict[str, float]]
    """'text' / 'repeated half' -> component -> mean contribution to the correct logit."""
    ov_NTT: np.ndarray
    qk_NTT: np.ndarray
    pos_pattern_NPP: Optional[np.ndarray]
    plot_tokens: tuple[str, ...]
    plot_note: str
    notes: tuple[str, ...]

    @property
    def heads(self) -> list[str]:
        return head_names(*self.stats["OV"]["copying"].shape)

    def at(self, head: str) -> tuple[int, int]:
        return divmod(self.heads.index(head), self.stats["OV"]["copying"].shape[1])

    def composition_of(self, sender: str, receiver: str, mode: str) -> float:
        return float(self.composition[mode][(*self.at(sender), *self.at(receiver))])

    def top_sender(self, receiver: str, mode: str) -> Optional[str]:
        """The earlier head with the largest `mode` composition into `receiver`."""
        col = self.composition[mode][(slice(None), slice(None), *self.at(receiver))].ravel()
        return None if np.isnan(col).all() else self.heads[int(np.nanargmax(col))]

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"induction_head": self.induction_head, "induction_score": finite(self.induction_score),
                               "prev_token_head": self.prev_token_head,
                               "baselines": {m: finite(v) for m, v in self.baselines.items()},
                               "direct_path": {k: finite(v) for k, v in self.direct_path_stats.items()},
                               "notes": list(self.notes)}
        for circuit, stats in self.stats.items():
            for stat, arr in stats.items():
                out[f"{circuit}_{stat}_LH".replace(" ", "_")] = json_array(arr)
        ind = self.induction_head
        out["induction_head_ov_copying"] = finite(self.stats["OV"]["copying"][self.at(ind)])
        if self.prev_token_head is not None:
            for mode in MODES:
                score = self.composition_of(self.prev_token_head, ind, mode)
                out[f"{mode}_composition_prev_to_induction"] = finite(score)
                out[f"{mode}_composition_ratio_to_baseline"] = finite(score / self.baselines[mode])
            out["top_K_composition_sender"] = self.top_sender(ind, "K")
            out["clean_repeated_loss"] = finite(self.clean_loss)
            i = self.sender_heads.index(self.prev_token_head)
            out.update({f"path_patch_{c}_repeated_loss": finite(self.path_patching[c][i]) for c in COMPONENTS})
        out["path_patching_senders"] = list(self.sender_heads)
        for mode in MODES:
            out[f"{mode}_composition"] = json_array(self.composition[mode])
        out["composition_note"] = "[L, H, L, H]: null where the second head is not in a later layer than the first"
        out["dla"] = {k: {c: finite(round(v, 4)) for c, v in d.items()} for k, d in self.dla.items()}
        return out

    def headlines(self) -> list[str]:
        ind, prev = self.induction_head, self.prev_token_head
        auto = self.config.induction_head.strip().lower() == "auto"
        out = [f"{'the head with the highest induction score' if auto else 'chosen induction head'}: {ind} "
               f"({self.induction_score:.2f})"]
        if prev is not None:
            k, b = self.composition_of(prev, ind, "K"), self.baselines["K"]
            top = self.top_sender(ind, "K")
            lead = "its largest K-composition" if top == prev else f"not its largest K-composition (that is {top})"
            q, v = self.composition_of(prev, ind, "Q"), self.composition_of(prev, ind, "V")
            out.append(f"{prev} → {ind} K-composition {k:.3f} = {k / b:.2f}× the random baseline {b:.3f}, "
                       f"{lead}; Q {q:.3f}, V {v:.3f}")
            i = self.sender_heads.index(prev)
            out.append(f"path patching {prev}'s output (from other tokens) into {ind}: repeated-half loss "
                       f"{self.clean_loss:.2f} → keys {self.path_patching['k'][i]:.2f}, queries "
                       f"{self.path_patching['q'][i]:.2f}, values {self.path_patching['v'][i]:.2f} nats/token")
        out.append(f"{ind}'s OV circuit: copying score {self.stats['OV']['copying'][self.at(ind)]:.2f}, "
                   f"diagonal argmax in {self.stats['OV']['diagonal'][self.at(ind)]:.0%} of rows")
        rep = self.dla.get("repeated half", {})
        if rep:
            top = sorted(rep.items(), key=lambda kv: -kv[1])[:3]
            out.append("largest direct logit attribution on the repeated half: "
                       + ", ".join(f"{c} {v:+.2f}" for c, v in top))
        out += list(self.notes)
        return out


def pick_heads(model: HookedModel, cfg: CircuitsConfig, rep: torch.Tensor, prefix: int
               ) -> tuple[tuple[int, int], float, Optional[tuple[int, int]], list[str]]:
    """(induction head, its induction score, previous-token head or None, notes) from the config,
    or found by score."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    notes = []
    _, acts = run_collect(model, rep, layer_hooks(model, "attn.hook_pattern"))
    pats = [acts[f"blocks.{l}.attn.hook_pattern"].float() for l in range(L)]
    ind_LH = torch.stack([induction_score(p, cfg.seq_len, prefix) for p in pats])
    if cfg.induction_head.strip().lower() == "auto":
        induction = divmod(int(ind_LH.argmax()), H)
    else:
        induction = parse_head(model, cfg.induction_head)
    score = float(ind_LH[induction])
    if cfg.prev_token_head.strip().lower() == "auto":
        if induction[0] == 0:
            notes.append(f"no previous-token head to patch: L{induction[0]}H{induction[1]} is in layer 0, "
                         "so nothing earlier can compose with it")
            return induction, score, None, notes
        prev_LH = torch.stack([previous_token_score(p) for p in pats[: induction[0]]])
        return induction, score, divmod(int(prev_LH.argmax()), H), notes
    prev = parse_head(model, cfg.prev_token_head)
    if prev[0] >= induction[0]:
        raise InputError(f"prev_token_head {cfg.prev_token_head} must be in an earlier layer than the induction "
                         f"head L{induction[0]}H{induction[1]}.")
    return induction, score, prev, notes


def _plot_token_ids(model: HookedModel, n: int) -> tuple[torch.Tensor, tuple[str, ...], str]:
    """Up to n printable tokens evenly spaced by id, their labels, and how they were chosen."""
    V = model.cfg.d_vocab
    ids = torch.arange(V)
    labels = model.to_str_tokens(ids) if model.tokenizer is not None else [str(i) for i in range(V)]
    printable = [i for i in range(V) if labels[i].strip() and labels[i].isprintable()] or list(range(V))
    chosen = [printable[int(j)] for j in np.linspace(0, len(printable) - 1, min(n, len(printable)))]
    chosen = sorted(set(chosen))
    note = (f"{len(chosen)} of {V} tokens: {'all ' if len(chosen) == len(printable) else ''}printable tokens"
            f"{'' if len(chosen) == len(printable) else ', evenly spaced by id'}")
    return torch.tensor(chosen), tuple(repr(labels[i])[1:-1] for i in chosen), note


def circuit_stats(w: FoldedWeights, cfg: CircuitsConfig) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """Copying score, diagonal fraction and effective rank of every head's circuits."""
    L, _ = w.shape
    V, notes = w.W_E.shape[0], []
    rows, note = sample_rows(V, cfg.max_rows, cfg.seed)
    if note:
        notes.append(f"vocabulary of {V:,} is too large to scan whole: diagonal fractions {note}")
    stats: dict[str, dict[str, list]] = {"OV": {}, "QK": {}}
    for name, make in (("OV", ov_circuit), ("QK", qk_circuit)):
        for stat in ("copying", "diagonal", "effective rank"):
            stats[name][stat] = []
        for l in range(L):  # one layer's [H, V, K] factors at a time (150 MB each at GPT-2 small)
            c = make(w, l)
            stats[name]["copying"].append(copying_score(c))
            stats[name]["diagonal"].append(diagonal_fraction(c, rows))
            stats[name]["effective rank"].append(effective_rank(c))
    if w.W_pos is not None:
        P = w.W_pos.shape[0]
        pos_rows, pos_note = sample_rows(P, cfg.max_rows, cfg.seed)
        if pos_note:
            notes.append(f"positional QK: {pos_note}")
        per = [pos_qk_circuit(w, l) for l in range(L)]
        stats["QK positional"] = {
            "copying": [copying_score(c) for c in per],
            "diagonal": [diagonal_fraction(c, pos_rows, causal=True) for c in per],
            "previous position": [diagonal_fraction(c, pos_rows[pos_rows > 0], causal=True, offset=1) for c in per],
            "effective rank": [effective_rank(c) for c in per]}
    else:
        notes.append("no learned positional embedding (W_pos), so no positional QK circuit")
    return {c: {s: torch.stack(v).cpu().numpy() for s, v in d.items()} for c, d in stats.items()}, notes


@torch.no_grad()
def compute(model: HookedModel, cfg: CircuitsConfig) -> CircuitsResult:
    """Circuits, statistics, composition, attribution and path patching for every head."""
    require_attention(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = head_names(L, H)
    rep, prefix = probe_tokens(model, cfg.seq_len, 2, cfg.n_sequences, cfg.seed, prepend_bos=True)
    induction, ind_score, prev, notes = pick_heads(model, cfg, rep, prefix)
    w = folded_weights(model)
    stats, stat_notes = circuit_stats(w, cfg)
    notes += stat_notes + list(w.notes)
    d = w.W_E.shape[1]
    dp = direct_path(w)
    rows, _ = sample_rows(w.W_E.shape[0], cfg.max_rows, cfg.seed)
    direct = {"copying": float(copying_score(dp)), "diagonal": float(diagonal_fraction(dp, rows)),
              "effective rank": float(effective_rank(dp))}
    composition = {m: composition_scores(w, m).cpu().numpy() for m in MODES}
    baselines = {m: random_composition_baseline(d, w.W_Q.shape[-1], m, cfg.n_random, cfg.seed) for m in MODES}

    # path patching: every earlier head's output, from other random tokens, into each input of the induction head
    other, _ = probe_tokens(model, cfg.seq_len, 2, cfg.n_sequences, cfg.seed + 1, prepend_bos=True)

    def repeated_loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.tensor(half_losses(per_token_loss(logits, rep), prefix, cfg.seq_len)[1])

    clean_loss = float(repeated_loss(model(rep)))
    senders = [(l, h) for l in range(induction[0]) for h in range(H)]
    if len(senders) > cfg.max_senders:
        k_in = composition["K"][:, :, induction[0], induction[1]]
        ranked = sorted(senders, key=lambda s: -k_in[s])
        keep = ([prev] if prev is not None else []) + [s for s in ranked if s != prev]
        senders = sorted(keep[: cfg.max_senders])
        notes.append(f"path patching: {len(senders)} of the {induction[0] * H} earlier heads, those with the highest "
                     f"K-composition into {names[induction[0] * H + induction[1]]} (max_senders)")
    if describe(model).grouped:
        notes.append("path patching into keys or values patches the key/value head that the induction head shares "
                     "with the other query heads of its group")
    patching = path_patch_many(model, rep, other, senders, induction, COMPONENTS, repeated_loss,
                               progress=lambda jobs: tqdm(jobs, desc="path patching", unit="run", disable=None,
                                                          leave=False))

    attribution = direct_logit_attribution(model, rep)
    second_half = torch.zeros_like(attribution.bias_BP, dtype=torch.bool)
    second_half[:, prefix + cfg.seq_len: prefix + 2 * cfg.seq_len - 1] = True
    dla = {"repeated half": attribution.mean(second_half)}
    if model.tokenizer is not None:
        text = text_batch(model, cfg.text_rows, min(cfg.text_len, int(model.cfg.n_ctx)))
        dla = {"text": direct_logit_attribution(model, text).mean(), **dla}
    else:
        notes.append("no tokenizer, so no direct logit attribution on text")

    ids, labels, plot_note = _plot_token_ids(model, cfg.plot_tokens)
    ids = ids.to(w.W_E.device)

    def sub(left: torch.Tensor, right: torch.Tensor, out_DN: torch.Tensor) -> np.ndarray:
        """[L*H, n, n] the circuit between the chosen tokens, from factors sliced to them first."""
        return torch.cat([(w.W_E[ids] @ left[l]) @ (right[l] @ out_DN) for l in range(L)]).cpu().numpy()

    pos_pattern = None
    if w.W_pos is not None:
        P = min(cfg.plot_tokens, w.W_pos.shape[0])
        scores = torch.cat([(w.W_pos[:P] @ w.W_Q[l]) @ (w.W_K[l].transpose(-1, -2) @ w.W_pos[:P].T)
                            for l in range(L)]) / w.W_Q.shape[-1] ** 0.5
        mask = torch.ones(P, P, dtype=torch.bool, device=scores.device).triu(1)
        pos_pattern = scores.masked_fill(mask, float("-inf")).softmax(-1).cpu().numpy()
    return CircuitsResult(
        name=model_label(model), config=cfg, d_model=d, stats=stats,
        direct_path_stats=direct, composition=composition, baselines=baselines,
        induction_head=names[induction[0] * H + induction[1]], induction_score=ind_score,
        prev_token_head=names[prev[0] * H + prev[1]] if prev is not None else None,
        path_patching=patching, sender_heads=tuple(names[l * H + h] for l, h in senders), clean_loss=clean_loss,
        dla=dla, ov_NTT=sub(w.W_V, w.W_O, w.W_U[:, ids]),
        qk_NTT=sub(w.W_Q, w.W_K.transpose(-1, -2), w.W_E[ids].T), pos_pattern_NPP=pos_pattern,
        plot_tokens=labels,
        plot_note=plot_note, notes=tuple(notes))


def figures(r: CircuitsResult) -> dict[str, go.Figure]:
    """Circuit heatmaps (head picker), positional pattern, statistics, composition, attribution, patching; each
    with its caption."""
    heads = r.heads
    L, H = r.stats["OV"]["copying"].shape
    figs: dict[str, go.Figure] = {}
    rows = [(f"{c}: {s}", s, arr) for c, d in r.stats.items() for s, arr in d.items()]
    ranks = [row for row in rows if row[1] == "effective rank"]
    fractions = [row for row in rows if row[1] != "effective rank"]
    stats = heatmap(np.stack([a.ravel() for _, _, a in fractions], axis=1), [n for n, _, _ in fractions], heads,
                    "Copying score (eigenvalues) and diagonal fraction (row argmax) per circuit", "statistic", "head",
                    colorbar="score (−1 to 1)", colorscale="RdBu", zmid=0)
    figs["circuit statistics"] = captioned(stats, (
        "Per head and circuit: the copying score, sum(λ)/sum(|λ|) of its eigenvalues (+1: attending to a token "
        "raises that token's own logit), and the share of rows whose largest entry is on the diagonal. Induction and "
        "copying heads have OV copying scores near +1."))
    rank = heatmap(np.stack([a.ravel() for _, _, a in ranks], axis=1), [n for n, _, _ in ranks], heads,
                   "Effective rank (exp entropy of singular values)", "circuit", "head",
                   colorbar="effective rank (dimensions)")
    figs["effective rank"] = captioned(rank, (
        "How many dimensions each circuit really uses (the exponential of the entropy of its singular values), at "
        "most d_head. A low rank means the head does one simple thing."))
    ov = heatmap_picker(r.ov_NTT, heads, r.plot_tokens, r.plot_tokens,
                        f"Full OV circuit W_E W_V W_O W_U ({r.plot_note})", "logit of token", "attended token",
                        colorbar="logit contribution", colorscale="RdBu", zmid=0)
    figs["OV circuits"] = captioned(ov, (
        "What attending to a token (row) does to each output logit (column), through this head alone. A bright "
        "diagonal is a copying head: attending to a token raises the logit of that same token. Pick the head from "
        "the menu."))
    qk = heatmap_picker(r.qk_NTT, heads, r.plot_tokens, r.plot_tokens,
                        f"Full QK circuit W_E W_Q W_K^T W_E^T ({r.plot_note})", "key token", "query token",
                        colorbar="attention score (pre-softmax)", colorscale="RdBu", zmid=0)
    figs["QK circuits"] = captioned(qk, (
        "How much a query token (row) wants to attend to each key token (column), from the token embeddings alone. "
        "Structure here is attention that depends on which tokens meet, not on where they are."))
    if r.pos_pattern_NPP is not None:
        P = r.pos_pattern_NPP.shape[-1]
        pos = heatmap_picker(
            r.pos_pattern_NPP, heads, list(range(P)), list(range(P)),
            f"Attention from position alone: softmax of W_pos W_Q W_K^T W_pos^T / √d_head (first {P} positions)",
            "key position", "query position", colorbar="attention weight (probability)", zmin=0, zmax=1)
        figs["positional QK pattern"] = captioned(pos, (
            "Where a head attends from the positional embeddings alone. A bright band just below the diagonal is a "
            "previous-token head, which needs no token information at all."))
    if L > 1:
        early, late = heads[: (L - 1) * H], heads[H:]
        reads = {"Q": "queries", "K": "keys", "V": "values"}
        for mode in MODES:
            grid = r.composition[mode][: L - 1, :, 1:, :].reshape((L - 1) * H, (L - 1) * H)
            comp = heatmap(
                grid, late, early, f"{mode}-composition (white = random baseline {r.baselines[mode]:.3f} ≈ "
                f"1/√d_model = {1 / np.sqrt(r.d_model):.3f}; red above it)", "later head (reads)",
                "earlier head (writes)", colorbar="composition score (0 to 1)", colorscale="RdBu_r",
                zmid=r.baselines[mode], text_fmt=".3f")
            figs[f"{mode}-composition"] = captioned(comp, (
                f"How strongly each later head reads, through its {reads[mode]}, what each earlier head writes: "
                "‖W_A W_B‖ / (‖W_A‖ ‖W_B‖). White is what two random heads of the same shapes give; red is above "
                "chance. An induction head K-composes with a previous-token head."))
    dla = bars(r.dla, "Direct contribution to the correct next-token logit (mean)", "logit")
    figs["direct logit attribution"] = captioned(dla, (
        "How much each component writes, directly, to the logit of the correct next token, on the repeated half of "
        "random sequences and on text. On the repeated half the induction heads dominate."))
    if r.sender_heads:
        grid = np.stack([r.path_patching[c] for c in COMPONENTS], axis=1) - r.clean_loss
        patch = heatmap(grid, [f"into {r.induction_head}'s {c}" for c in COMPONENTS], list(r.sender_heads),
                        f"Path patching: repeated-half loss increase (clean {r.clean_loss:.2f} nats) when one head's "
                        "output comes from other tokens", "receiver input", "sender head",
                        colorbar="Δ loss (nats/token)", colorscale="Reds")
        figs["path patching"] = captioned(patch, (
            "The loss when one input (query, key or value) of the induction head sees an earlier head's output from "
            "other random tokens, all else unchanged. A large rise through the keys and little through the queries "
            "and values is the K-composition of an induction circuit."))
    if r.notes:
        figs["notes"] = captioned(table([(str(i + 1), n) for i, n in enumerate(r.notes)], "Notes"),
                                  "What was sampled or left out, and why.")
    return figs


ANALYSIS = Analysis(
    name="circuits",
    description="Full QK/OV and positional circuits, composition scores against a random baseline, direct "
                "logit attribution and path patching of the induction circuit.",
    config_cls=CircuitsConfig, compute=compute, figures=figures,
    default_models=("attn-only-2l", "attn-only-1l", "gelu-2l"),
    title="QK and OV circuits", order=30,
    intro="Each attention head is two low-rank circuits (Elhage et al., <i>A Mathematical Framework for Transformer "
          "Circuits</i>, 2021). The QK circuit W_E W_Q W_Kᵀ W_Eᵀ decides where a head attends; the OV circuit W_E "
          "W_V W_O W_U decides what attending there does to the output. Read as matrices over tokens (multiplied out "
          "only in small corners, otherwise kept factored), they show copying heads and positional heads; composition "
          "scores show which heads read which heads' output, and path patching tests it causally.",
)

if __name__ == "__main__":
    from analyses._cli import main

    main(ANALYSIS.name)
