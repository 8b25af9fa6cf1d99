"""Pure plot primitives: each takes arrays and returns a `plotly.graph_objects.Figure`.

Nothing here shows a figure or writes a file; the report layer decides where figures go.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import plotly.graph_objects as go

from workbench.compute.lens import LogitLens
from workbench.compute.patching.discovery import Circuit, FaithfulnessCurve
from workbench.compute.patching.result import PatchingResult
from workbench.compute.probes import ProbeSweep
from workbench.compute.steering import SteeringResult

LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=20, t=60, b=50))


def captioned(fig: go.Figure, caption: str) -> go.Figure:
    """`fig` with a caption: one or two sentences on what it shows and what to look for. The report
    prints it under the figure (it travels in `layout.meta`, which plotly does not draw)."""
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    fig.update_layout(meta={**meta, "caption": caption})
    return fig


def caption_of(fig: go.Figure) -> str:
    """The caption set by `captioned`, or '' if there is none."""
    meta = fig.layout.meta
    return str(meta.get("caption", "")) if isinstance(meta, dict) else ""


def heatmap(z: np.ndarray, x: Sequence, y: Sequence, title: str, x_title: str = "", y_title: str = "", *,
            colorbar: str, colorscale: str = "Blues", zmid: Optional[float] = None,
            text_fmt: Optional[str] = ".2f") -> go.Figure:
    """A labelled heatmap; `colorbar` titles the colour bar with what the colour measures and its unit.
    Cell values are printed when `text_fmt` is set and the grid is small."""
    z = np.asarray(z, dtype=float)
    show_text = text_fmt is not None and z.size <= 400
    fig = go.Figure(go.Heatmap(z=z, x=list(x), y=list(y), colorscale=colorscale, zmid=zmid,
                               colorbar=dict(title=dict(text=colorbar, side="right")),
                               texttemplate=f"%{{z:{text_fmt}}}" if show_text else None))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def token_heatmap(z_RS: np.ndarray, tokens: Sequence[str], rows: Sequence[str], cell_text: Sequence[Sequence[str]],
                  hover: Sequence[Sequence[str]], title: str, *, colorbar: str, x_title: str = "position: token",
                  y_title: str = "") -> go.Figure:
    """A heatmap over token positions (x) whose cells carry their own text (e.g. a predicted token) and
    hover text; the logit lens uses it."""
    labels = [f"{i}: {t}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=np.asarray(z_RS, dtype=float), x=labels, y=list(rows), text=cell_text,
                               texttemplate="%{text}", textfont=dict(size=10), customdata=hover,
                               hovertemplate="%{y}, %{x}<br>%{customdata}<extra></extra>", colorscale="Blues",
                               zmin=0, zmax=1, colorbar=dict(title=dict(text=colorbar, side="right"))))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title,
                      height=max(260, 90 + 34 * len(rows)), **LAYOUT)
    fig.update_xaxes(tickangle=-60, tickfont=dict(size=9))
    return fig


def logit_lens_figure(lens: LogitLens, tokens: Sequence[str], top_tokens: Sequence[Sequence[str]], title: str
                      ) -> go.Figure:
    """The logit lens of one prompt as a captioned token heatmap: a row per readout, a cell per position holding
    the top prediction (`top_tokens`: R rows of S readable strings) shaded by its probability; the hover adds the
    probability of the token that really comes next. `tokens` are the prompt's (at least S of them)."""
    R, S = lens.next_prob_RS.shape
    tokens = list(tokens)[:S]
    hover = [[f"predicts: {top_tokens[r][s]!r} (p {lens.top_probs_RSK[r, s, 0]:.2f})"
              f"<br>p(next token {tokens[s + 1] if s + 1 < S else '—'!r}) = "
              f"{'—' if np.isnan(lens.next_prob_RS[r, s]) else f'{lens.next_prob_RS[r, s]:.2f}'}"
              for s in range(S)] for r in range(R)]
    z = np.nan_to_num(lens.top_probs_RSK[..., 0])
    fig = token_heatmap(z, tokens, lens.readouts, [list(row) for row in top_tokens], hover, title,
                        colorbar="probability of the top prediction", y_title="residual stream read after")
    return captioned(fig, "Each row reads the residual stream after one more layer through the final norm and "
                     "unembedding, as if the model stopped there; each cell is the next token it would predict, "
                     "shaded by its probability. The last row is the model's real prediction. Look for where a "
                     "correct prediction first appears: on the repeated half of a prompt, an induction model gets "
                     "it only after its second layer.")


def lines(x_by_name: dict[str, Sequence[float]], y_by_name: dict[str, Sequence[float]], title: str,
          x_title: str, y_title: str, log_x: bool = False, vlines: Sequence[tuple[float, str]] = ()) -> go.Figure:
    """One line per name; optional labelled vertical markers."""
    fig = go.Figure()
    for name, y in y_by_name.items():
        fig.add_trace(go.Scatter(x=list(x_by_name[name]), y=list(y), mode="lines+markers", name=name,
                                 marker=dict(size=4)))
    for x, label in vlines:
        fig.add_vline(x=x, line_dash="dash", line_color="gray", annotation_text=label)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **LAYOUT)
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def heatmap_picker(mats_NXY: np.ndarray, names: Sequence[str], x: Sequence, y: Sequence, title: str,
                   x_title: str = "", y_title: str = "", *, colorbar: str, colorscale: str = "Blues",
                   zmid: Optional[float] = None,
                   zmin: Optional[float] = None, zmax: Optional[float] = None, hover: str = "%{y} → %{x}: %{z:.3f}",
                   height: int = 650) -> go.Figure:
    """Several same-shaped heatmaps in one figure; a dropdown picks which one is shown. `colorbar` titles
    the colour bar with what the colour measures and its unit."""
    fig = go.Figure()
    for n, name in enumerate(names):
        fig.add_trace(go.Heatmap(z=mats_NXY[n], x=list(x), y=list(y), colorscale=colorscale, zmid=zmid, zmin=zmin,
                                 zmax=zmax, visible=n == 0, name=name, hovertemplate=hover + "<extra></extra>",
                                 colorbar=dict(title=dict(text=colorbar, side="right"))))
    buttons = [dict(label=name, method="update",
                    args=[{"visible": [i == n for i in range(len(names))]}, {"title": f"{title}: {name}"}])
               for n, name in enumerate(names)]
    fig.update_layout(title=f"{title}: {names[0]}", xaxis_title=x_title, yaxis_title=y_title,
                      updatemenus=[dict(buttons=buttons, direction="down", x=1.0, xanchor="right", y=1.15)],
                      height=height, **LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def attention_picker(patterns_NST: np.ndarray, head_names: Sequence[str], tokens: Sequence[str],
                     title: str) -> go.Figure:
    """Attention patterns of several heads in one figure; a dropdown picks the head."""
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    return heatmap_picker(patterns_NST, head_names, labels, labels, title, "key position", "query position",
                          colorbar="attention weight (probability)", zmin=0, zmax=1,
                          hover="query %{y}<br>key %{x}<br>weight %{z:.3f}")


def bars(values: dict[str, dict[str, float]], title: str, y_title: str) -> go.Figure:
    """Grouped bars: one series per outer key, one bar per inner key (same inner keys in each)."""
    fig = go.Figure([go.Bar(name=series, x=list(v), y=list(v.values())) for series, v in values.items()])
    fig.update_layout(title=title, yaxis_title=y_title, barmode="group", **LAYOUT)
    return fig


def histograms(values_by_name: dict[str, Sequence[float]], title: str, x_title: str, bins: int = 40) -> go.Figure:
    """Overlaid histograms, one per name."""
    fig = go.Figure([go.Histogram(x=list(v), name=n, nbinsx=bins, opacity=0.6) for n, v in values_by_name.items()])
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="count", barmode="overlay", **LAYOUT)
    return fig


def table(rows: Sequence[tuple[str, str]], title: str) -> go.Figure:
    """A two-column key/value table."""
    keys, values = zip(*rows) if rows else ((), ())
    fig = go.Figure(go.Table(header=dict(values=["", ""]), cells=dict(values=[list(keys), list(values)], align="left")))
    fig.update_layout(title=title, height=60 + 28 * len(rows), **LAYOUT)
    return fig


def patching_figure(result: PatchingResult) -> go.Figure:
    """A patching result as a heatmap (a bar chart for one axis; a layer picker for three axes),
    coloured by the metric after each patch; an estimate's check against exact patching beside it
    as a scatter with the line estimate = exact, and its correlation and worst error in the title."""
    unit = "normalised metric (clean 1, corrupt 0)" if result.normalized else result.metric
    title = f"{result.method}: {result.site} by {result.by} ({result.direction}, {result.task})"
    values, labels, axes = result.values, result.labels, result.axes
    if len(axes) == 3:  # (layer, position, head): one heatmap per layer
        main = heatmap_picker(values.transpose(0, 2, 1), labels[0], labels[1], labels[2], title, axes[1], axes[2],
                              colorbar=unit, colorscale="RdBu", zmid=0.0 if result.normalized else None)
        main_traces = list(main.data)
    elif len(axes) == 2:
        main_traces = [go.Heatmap(z=values, x=list(labels[1]), y=list(labels[0]), colorscale="RdBu",
                                  zmid=(0.0 if result.normalized else None),
                                  colorbar=dict(title=dict(text=unit, side="right")),
                                  hovertemplate=f"{axes[0]} %{{y}}<br>{axes[1]} %{{x}}<br>%{{z:.3f}}<extra></extra>")]
        main = None
    else:
        main_traces = [go.Bar(x=[" ".join(lab) for lab in labels[0]] if axes else ["all"], y=values.reshape(-1),
                              hovertemplate="%{x}: %{y:.3f}<extra></extra>")]
        main = None
    check = result.check
    if check is None:
        fig = main or go.Figure(main_traces)
        if main is None:
            fig.update_layout(title=title, xaxis_title=axes[-1] if axes else "", yaxis_title=axes[0] if len(axes) == 2
                              else unit, **LAYOUT)
            if len(axes) == 2:
                fig.update_yaxes(autorange="reversed")
        return captioned(fig, _patching_caption(result))
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, column_widths=[0.58, 0.42], horizontal_spacing=0.2,
                        subplot_titles=(title, "estimate against exact patching"))
    for trace in main_traces:
        if trace.type == "heatmap":  # the colour bar between the two panels, not over the scatter
            trace.colorbar.update(x=0.47, thickness=12, len=0.8, y=0.4, title=dict(side="top"))
        fig.add_trace(trace, row=1, col=1)
    lo = float(min(check.exact.min(), check.estimate.min()))
    hi = float(max(check.exact.max(), check.estimate.max()))
    fig.add_trace(go.Scatter(x=check.exact, y=check.estimate, mode="markers", name="checked patches",
                             text=[" ".join(lab) for lab in check.labels],
                             hovertemplate="%{text}<br>exact %{x:.3f}<br>estimate %{y:.3f}<extra></extra>"),
                  row=1, col=2)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="estimate = exact",
                             line=dict(dash="dash", color="gray")), row=1, col=2)
    fig.update_xaxes(title_text="exact", row=1, col=2)
    fig.update_yaxes(title_text="estimate", row=1, col=2)
    if len(axes) >= 2:
        fig.update_yaxes(autorange="reversed", row=1, col=1)
    if main is not None:
        fig.update_layout(updatemenus=main.layout.updatemenus)
    fig.update_layout(showlegend=False, height=520, **LAYOUT)
    return captioned(fig, _patching_caption(result))


def _patching_caption(result: PatchingResult) -> str:
    what = ("how much of the clean behaviour one clean piece restores in the corrupt run" if result.direction ==
            "denoise" else "how much of the clean behaviour is left when one piece is corrupted")
    text = (f"Each cell is the {result.metric} after one patch ({what}); clean {result.clean:.3g}, corrupt "
            f"{result.corrupt:.3g}.")
    if result.check is not None:
        text += f" The linear estimate, {result.check.summary()}."
    return text


def steering_figure(result: SteeringResult) -> go.Figure:
    """A steering sweep (`steering_sweep`): the target metric's change (left) and the next-token loss
    increase on ordinary text (right) against α, for the steering vector and for the random vectors of
    the same norm (their mean, with a band of one standard deviation and each seed faint)."""
    from plotly.subplots import make_subplots

    a = result.alphas.tolist()
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=(f"change in {result.metric}", "loss cost on ordinary text"))
    panels = [(result.effect, result.random_effect, result.random_effect_mean, result.random_effect_spread),
              (result.ce_cost, result.random_ce_cost, result.random_ce_mean, result.random_ce_spread)]
    for col, (steered, each, mean, spread) in enumerate(panels, start=1):
        first = col == 1
        upper, lower = (mean + spread).tolist(), (mean - spread).tolist()
        fig.add_trace(go.Scatter(x=a + a[::-1], y=upper + lower[::-1], fill="toself", fillcolor="rgba(128,128,128,0.2)",
                                 mode="none", line=dict(width=0), hoverinfo="skip", name="random ± 1 s.d.",
                                 showlegend=first, legendgroup="band"), row=1, col=col)
        for seed, row in zip(result.seeds, each):
            fig.add_trace(go.Scatter(x=a, y=row.tolist(), mode="lines", line=dict(color="gray", width=0.5),
                                     opacity=0.5, name=f"random seed {seed}", showlegend=False,
                                     legendgroup="seeds"), row=1, col=col)
        fig.add_trace(go.Scatter(x=a, y=mean.tolist(), mode="lines+markers", name="random direction, same norm",
                                 line=dict(color="gray", dash="dash"), showlegend=first, legendgroup="random"),
                      row=1, col=col)
        fig.add_trace(go.Scatter(x=a, y=steered.tolist(), mode="lines+markers", name="steering vector",
                                 line=dict(color="#1f77b4", width=3), showlegend=first, legendgroup="steer"),
                      row=1, col=col)
        fig.add_hline(y=0, line_color="black", line_width=0.5, row=1, col=col)
        fig.update_xaxes(title_text="α (the vector is added α times)", row=1, col=col)
    fig.update_yaxes(title_text=f"{result.metric} − unsteered ({result.baseline:.3g})", row=1, col=1)
    fig.update_yaxes(title_text="next-token loss increase (nats/token)", row=1, col=2)
    fig.update_layout(title=f"Steering at {result.hook}", height=440, **LAYOUT)
    return captioned(fig, f"{result.summary()} Left: how far steering moves the target metric ({result.positions}); "
                     "right: what it costs on ordinary text (the vector added at " + result.cost_positions + f", "
                     f"{result.text}; unsteered loss {result.base_loss:.3g}). The grey curves are random directions "
                     "of the vector's norm: an effect is the vector's only where the blue curve leaves them.")


def probe_sweep_figure(result: ProbeSweep) -> go.Figure:
    """A probe sweep (`fit_probes`) as two heatmaps over sites × positions: the held-out score (left)
    and the selectivity, score minus the control task's (right); the hover gives the interval, the
    control task and the shuffled-label baseline of each probe."""
    from plotly.subplots import make_subplots

    metric = "accuracy" if result.metric == "accuracy" else "R²"
    sites, positions = list(result.sites), list(result.positions)
    custom = np.stack([result.low_SQ, result.high_SQ, result.control_SQ, result.shuffled_SQ, result.selectivity_SQ],
                      -1)
    hover = (f"%{{y}}, position %{{x}}<br>{metric} %{{z:.3f}}<br>interval [%{{customdata[0]:.3f}}, "
             "%{customdata[1]:.3f}]<br>control task %{customdata[2]:.3f}<br>shuffled labels %{customdata[3]:.3f}"
             "<br>selectivity %{customdata[4]:.3f}<extra></extra>")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.26,
                        subplot_titles=(f"held-out {metric}", f"selectivity ({metric} − control task)"))
    low = float(np.nanmin(result.chance_Q)) if result.metric == "accuracy" else 0.0
    fig.add_trace(go.Heatmap(z=result.score_SQ, x=positions, y=sites, customdata=custom, hovertemplate=hover,
                             colorscale="Blues", zmin=low, zmax=1.0,
                             colorbar=dict(x=0.385, thickness=12, title=dict(text=metric))),
                  row=1, col=1)
    fig.add_trace(go.Heatmap(z=result.selectivity_SQ, x=positions, y=sites, customdata=custom, hovertemplate=hover,
                             colorscale="RdBu", zmid=0.0, colorbar=dict(title=dict(text="selectivity"))), row=1, col=2)
    for col in (1, 2):
        fig.update_xaxes(title_text="position", row=1, col=col)
        fig.update_yaxes(autorange="reversed", row=1, col=col)
    fig.update_yaxes(title_text="site", row=1, col=1)
    fig.update_layout(title=f"Linear probes ({result.config.kind}): {result.n_train} training and {result.n_test} "
                      f"held-out prompts", height=max(360, 120 + 26 * len(sites)), **LAYOUT)
    split = "groups (e.g. subjects)" if result.grouped else "prompts"
    chance = (f" Chance (the most common label) is {float(np.nanmax(result.chance_Q)):.0%} at most."
              if result.metric == "accuracy" else "")
    return captioned(fig, f"A linear probe at each site and position, scored on held-out {split}.{chance} The "
                     "control task gives every type (a group or a token) a random label from the same distribution: a "
                     "probe that scores well on it memorises types, so a high score is the representation's only "
                     "where the selectivity (right) is high too.")


def faithfulness_figure(curves: dict[str, FaithfulnessCurve], title: str = "faithfulness") -> go.Figure:
    """The metric recovered (clean 1, corrupt 0) against the number of edges kept, one line per
    ranking, each circuit run by exact edge patching."""
    fig = go.Figure()
    for name, curve in curves.items():
        fig.add_trace(go.Scatter(x=curve.n_edges, y=curve.recovered, mode="lines+markers", name=name,
                                 hovertemplate="%{x} edges: %{y:.3f}<extra>" + name + "</extra>"))
    total = next(iter(curves.values())).total_edges if curves else 0
    fig.update_layout(title=title, xaxis_title=f"edges kept (of {total})", yaxis_title="metric recovered (clean 1)",
                      xaxis_type="log", **LAYOUT)
    return captioned(fig, "Each point is a circuit of the top edges of a ranking, run with every other edge carrying "
                          "the corrupt prompt's write: how much of the clean behaviour that many edges carry.")


def circuit_figure(circuit: Circuit, max_edges: int = 60) -> go.Figure:
    """A circuit drawn on the model's layers: the embedding at the bottom, each layer's heads and MLP
    above it, the logits on top; its `max_edges` strongest edges as lines coloured by the input
    they enter (q, k, v, MLP, logits) and as wide as their |score|."""
    g = circuit.graph
    H = max(g.n_heads, 1)
    pos: dict[str, tuple[float, float]] = {"embed": ((H - 1) / 2, 0.0)}
    for node in g.nodes[1:]:
        if node.startswith("MLP"):
            pos[node] = ((H - 1) / 2, 2 * int(node[3:]) + 2)
        else:
            layer, head = node[1:].split("H")
            pos[node] = (int(head), 2 * int(layer) + 1)
    top_y = 2 * g.n_layers + 1
    pos["logits"] = ((H - 1) / 2, top_y)
    colours = {"q": "#1f77b4", "k": "#d62728", "v": "#2ca02c", "mlp": "#9467bd", "logits": "#7f7f7f"}
    edges = circuit.edges[:max_edges]
    scale = max((abs(circuit.scores[g.index(e)]) for e in edges), default=1.0) or 1.0
    fig = go.Figure()
    for edge in edges:
        node, reader = edge.split("->")
        kind = reader.rsplit(".", 1)[1] if "." in reader else ("logits" if reader == "logits" else "mlp")
        target = reader.rsplit(".", 1)[0] if "." in reader else reader
        if "KV" in target:  # a key/value head: drawn at the middle of the query heads that share it
            layer, group = target[1:].split("KV")
            per = g.n_heads // max(g.n_kv_heads, 1)
            end = (int(group) * per + (per - 1) / 2, 2 * int(layer) + 1)
        else:
            end = pos[target]
        score = float(circuit.scores[g.index(edge)])
        fig.add_trace(go.Scatter(x=[pos[node][0], end[0]], y=[pos[node][1], end[1]], mode="lines",
                                 line=dict(color=colours[kind], width=1 + 6 * abs(score) / scale), showlegend=False,
                                 hovertemplate=f"{edge}: {score:.3f}<extra></extra>"))
    used = {e.split("->")[0] for e in edges} | {"logits"}
    for e in edges:
        target = e.split("->")[1].rsplit(".", 1)[0]
        if target in pos:
            used.add(target)
    names = [n for n in pos if n in used]
    fig.add_trace(go.Scatter(x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text",
                             text=names, textposition="top center", marker=dict(size=12, color="black"),
                             showlegend=False, hoverinfo="text"))
    for kind, colour in colours.items():  # the legend: which input an edge enters
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color=colour, width=3), name=kind))
    fig.update_layout(title=f"{circuit.method} circuit: {circuit.n_kept} edges recover {circuit.recovered:.2f}",
                      xaxis=dict(title="head", showgrid=False, zeroline=False),
                      yaxis=dict(title="", tickvals=[0, *range(1, top_y)] + [top_y],
                                 ticktext=["embed", *[f"{'attn' if y % 2 else 'MLP'} {(y - 1) // 2}"
                                                      for y in range(1, top_y)], "logits"]),
                      height=150 + 60 * top_y, **LAYOUT)
    return captioned(fig, f"The circuit's {len(edges)} strongest edges (of {circuit.n_kept}); an edge enters a "
                          "head's query, key or value input, an MLP's input or the logits, and is as wide as its "
                          "score.")
