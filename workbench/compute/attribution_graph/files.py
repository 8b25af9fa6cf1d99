"""A graph's files (graph.safetensors + graph.json: `graph_files`, `save_graph`, and `load_graph`, which
checks every field before it is used) and the payload of the report's graph viewer (`viewer_data`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save

from workbench.artifacts import GRAPH_FILE, GRAPH_META_FILE, strict_json, write_output_folder
from workbench.compute.attribution_graph.graph import AttributionGraph
from workbench.compute.attribution_graph.intervene import check_graph_model
from workbench.compute.attribution_graph.prune import prune
from workbench.errors import CheckpointError
from workbench.model.hooked import HookedModel
from workbench.sae.features import FeatureData

GRAPH_FORMAT = 2
"""2: the adjacency may be stored sparse (adjacency_index + adjacency_values); 1: always dense."""


def graph_files(graph: AttributionGraph) -> dict[str, Union[str, bytes]]:
    """{graph.safetensors: the tensors, graph.json: prompt, tokens and metadata}: what `save_graph`
    writes and what the report puts beside each graph's viewer. The adjacency is stored sparse (an
    int32 flat index and a float32 value per edge) when that is smaller."""
    flat = graph.adjacency.flatten()
    where = flat.nonzero().flatten()
    if len(where) * 2 < len(flat) and len(flat) < 2 ** 31:  # sparse is smaller: an int32 index and a value per edge
        adjacency = {"adjacency_index": where.to(torch.int32), "adjacency_values": flat[where].contiguous()}
    else:
        adjacency = {"adjacency": graph.adjacency.contiguous()}
    tensors = save({"features": graph.features.contiguous(), "activations": graph.activations.float().contiguous(),
                    "logit_tokens": graph.logit_tokens.contiguous(),
                    "logit_probs": graph.logit_probs.float().contiguous(),
                    **adjacency, "bias": graph.bias.contiguous(), "values": graph.values.contiguous()})
    meta = json.dumps(strict_json({"kind": "workbench.AttributionGraph", "format_version": GRAPH_FORMAT,
                                   "model_name": graph.model_name, "tokens": graph.tokens,
                                   "token_strs": graph.token_strs,
                                   "n_layers": graph.n_layers, "transcoders": graph.transcoders, "meta": graph.meta}),
                      indent=1, allow_nan=False)
    return {GRAPH_FILE: tensors, GRAPH_META_FILE: meta}


def save_graph(graph: AttributionGraph, folder: Union[str, Path]) -> Path:
    """graph.safetensors + graph.json, written into a new folder atomically (an existing folder the
    workbench did not write is refused)."""
    def build(tmp: Path) -> None:
        for name, data in graph_files(graph).items():
            (tmp / name).write_bytes(data) if isinstance(data, bytes) else (tmp / name).write_text(data)

    return write_output_folder(Path(folder), "attribution graph", build)


def load_graph(folder: Union[str, Path], model: Optional[HookedModel] = None) -> AttributionGraph:
    """A graph written by `save_graph`; with `model`, checked to belong to it."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / GRAPH_META_FILE).read_text())
        t = load_file(str(folder / GRAPH_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not an attribution graph: it needs {GRAPH_META_FILE} and "
                              f"{GRAPH_FILE}.") from None
    except Exception as err:
        raise CheckpointError(f"The attribution graph in {folder} is damaged ({type(err).__name__}: {err}).") from err
    graph = _graph_from_files(folder, meta, t)
    if model is not None:
        check_graph_model(graph, model)
    return graph


def _graph_from_files(folder: Path, meta: Any, t: dict[str, torch.Tensor]) -> AttributionGraph:
    """The graph held by graph.json (`meta`) and graph.safetensors (`t`), each field checked for its type,
    shape and range first: a damaged file is refused here, never loaded to fail (or mislead) later."""
    check = _GraphFileCheck(folder, t)
    check.header(meta)
    check.complete(meta)
    check.json_fields(meta)
    n_layers, tokens, extra = meta["n_layers"], meta["tokens"], meta.get("meta", {})
    features = check.tensor("features", False, (None, 3))
    nf = int(features.shape[0])
    activations = check.tensor("activations", True, (nf,))
    logit_tokens = check.tensor("logit_tokens", False, (None,))
    n_logits = int(logit_tokens.shape[0])
    logit_probs = check.tensor("logit_probs", True, (n_logits,))
    S = len(tokens)
    N = nf + n_layers * S + S + n_logits
    bias, values = check.tensor("bias", True, (N,)), check.tensor("values", True, (N,))
    check.ranges(features, logit_tokens, n_layers, S)
    check.logit_meta(extra, n_logits)
    adjacency = check.adjacency(N)
    return AttributionGraph(meta["model_name"], list(tokens), list(meta["token_strs"]), n_layers, features, activations,
                            logit_tokens, logit_probs, adjacency, bias, values, meta.get("transcoders", ""), extra)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _GraphFileCheck:
    """What a graph's two files must pass before any field is used, in the order `_graph_from_files`
    asks; every failure is a CheckpointError naming the file."""

    def __init__(self, folder: Path, t: dict[str, torch.Tensor]):
        self.folder, self.t = folder, t
        self.json_path, self.tensor_path = folder / GRAPH_META_FILE, folder / GRAPH_FILE

    @staticmethod
    def damaged(path: Path, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the file is damaged. Build the graph again.")

    def header(self, meta: Any) -> None:
        """graph.json is a graph file, of a format this workbench reads."""
        if not isinstance(meta, dict) or meta.get("kind") != "workbench.AttributionGraph":
            raise CheckpointError(f"{self.json_path} is not an attribution graph file (it should hold a JSON object "
                                  "with kind 'workbench.AttributionGraph').")
        version = meta.get("format_version", 1)
        if not _is_int(version) or version < 1:
            raise self.damaged(self.json_path, f"format_version should be a positive integer, got {version!r}")
        if version > GRAPH_FORMAT:
            raise CheckpointError(f"{self.json_path} is graph format {version}, newer than this workbench reads "
                                  f"({GRAPH_FORMAT}); upgrade the workbench to load it.")

    def complete(self, meta: dict[str, Any]) -> None:
        """Every tensor and every field of graph.json is there."""
        t, sparse = self.t, ("adjacency_index", "adjacency_values")
        needed = ["features", "activations", "logit_tokens", "logit_probs", "bias", "values"]
        missing = [k for k in needed if k not in t] + ([] if "adjacency" in t or all(k in t for k in sparse)
                                                       else ["adjacency (or adjacency_index and adjacency_values)"])
        missing += [k for k in ("model_name", "tokens", "token_strs", "n_layers") if k not in meta]
        if missing:
            raise CheckpointError(f"The attribution graph in {self.folder} lacks {', '.join(missing)}; the files are "
                                  "damaged or incomplete. Build the graph again.")

    def json_fields(self, meta: dict[str, Any]) -> None:
        """graph.json's fields have their types: names are text, tokens ids, one string per token."""
        n_layers, tokens, token_strs = meta["n_layers"], meta["tokens"], meta["token_strs"]
        for key, ok, want in (
                ("model_name", isinstance(meta["model_name"], str), "text"),
                ("transcoders", isinstance(meta.get("transcoders", ""), str), "text"),
                ("n_layers", _is_int(n_layers) and n_layers >= 1, "a positive integer"),
                ("tokens", isinstance(tokens, list) and len(tokens) > 0 and all(_is_int(x) and x >= 0 for x in tokens),
                 "a non-empty list of token ids (integers ≥ 0)"),
                ("token_strs", isinstance(token_strs, list) and all(isinstance(x, str) for x in token_strs)
                 and len(token_strs) == (len(tokens) if isinstance(tokens, list) else -1),
                 "a list of strings, one per token"),
                ("meta", isinstance(meta.get("meta", {}), dict), "a JSON object")):
            if not ok:
                value = meta.get(key)
                got = f"a list of {len(value)}" if isinstance(value, list) else f"{value!r:.80}"
                raise self.damaged(self.json_path, f"{key} should be {want}, got {got}")

    def tensor(self, name: str, floating: bool, shape: tuple[Optional[int], ...]) -> torch.Tensor:
        """graph.safetensors' `name`, of its kind (float or integer; integers as int64) and `shape` (None:
        any length), and finite."""
        x = self.t[name]
        kind_ok = x.is_floating_point() if floating else not x.is_floating_point() and not x.is_complex() \
            and x.dtype != torch.bool
        if not kind_ok or x.ndim != len(shape) or any(w is not None and n != w for n, w in zip(x.shape, shape)):
            want = "×".join("n" if w is None else str(w) for w in shape)
            raise self.damaged(self.tensor_path, f"{name} should be a {'float' if floating else 'integer'} tensor "
                                                 f"of shape [{want}], got {x.dtype} {list(x.shape)}")
        if floating and not bool(torch.isfinite(x).all()):
            raise self.damaged(self.tensor_path, f"{name} holds NaN or inf values")
        return x.long() if not floating else x

    def ranges(self, features: torch.Tensor, logit_tokens: torch.Tensor, n_layers: int, S: int) -> None:
        """Features lie inside the graph's layers and positions; ids are never negative."""
        if len(features) and (int(features[:, 0].min()) < 0 or int(features[:, 0].max()) >= n_layers
                              or int(features[:, 1].min()) < 0 or int(features[:, 1].max()) >= S
                              or int(features[:, 2].min()) < 0):
            raise self.damaged(self.tensor_path, f"features lists (layer, position, id) outside the graph's "
                                                 f"{n_layers} layers and {S} positions, or a negative feature id")
        if len(logit_tokens) and int(logit_tokens.min()) < 0:
            raise self.damaged(self.tensor_path, "logit_tokens holds a negative token id")

    def logit_meta(self, extra: dict[str, Any], n_logits: int) -> None:
        """meta.logit_strs and meta.logits_clean, where present, hold one entry per logit node."""
        for key, check, want in (("logit_strs", lambda v: isinstance(v, str), "strings"),
                                 ("logits_clean", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and math.isfinite(v), "finite numbers")):
            if key in extra and not (isinstance(extra[key], list) and len(extra[key]) == n_logits
                                     and all(check(v) for v in extra[key])):
                raise self.damaged(self.json_path, f"meta.{key} should be a list of {n_logits} {want}, one per "
                                                   "logit node")

    def adjacency(self, N: int) -> torch.Tensor:
        """The [N, N] adjacency, stored dense or as an edge list (flat indices and values)."""
        if "adjacency" in self.t:
            return self.tensor("adjacency", True, (N, N))
        index = self.tensor("adjacency_index", False, (None,))
        edge_values = self.tensor("adjacency_values", True, (None,))
        if index.shape != edge_values.shape or (len(index) and (int(index.min()) < 0 or int(index.max()) >= N * N)):
            raise self.damaged(self.tensor_path, f"the edge list does not fit the {N} × {N} adjacency "
                                                 f"({tuple(index.shape)} indices, {tuple(edge_values.shape)} values)")
        return torch.zeros(N * N).index_put_((index,), edge_values.float()).view(N, N)


def viewer_data(graph: AttributionGraph, max_nodes: int = 400, max_edges: int = 4000,
                examples: Optional[dict[tuple[int, int], list[tuple[str, float]]]] = None,
                hrefs: Optional[dict[tuple[int, int], str]] = None) -> dict[str, Any]:
    """The payload of `workbench.report.widgets.graph_viewer`: the `max_nodes` most influential features and
    errors (tokens and logits always) and the strongest `max_edges` edges among them, each with its
    cut so the viewer's sliders re-prune. `examples` and `hrefs` are keyed by (layer, feature id)."""
    pr = prune(graph, 1.0, 1.0)
    N, first_token = graph.n_nodes, graph.n_features + graph.n_errors
    ranked = [int(i) for i in pr.node_cut[:first_token].argsort()[:max_nodes]]
    shown = sorted(ranked + list(range(first_token, N)))
    index = {n: i for i, n in enumerate(shown)}
    nodes = []
    for n in shown:
        info = graph.node(n)
        key = (info["layer"], info["feature"])
        nodes.append({"id": index[n], "kind": info["kind"], "layer": info["layer"], "pos": info["pos"],
                      "label": info["label"], "activation": _finite(float(graph.activations[n]) if n < graph.n_features
                                                                    else float(graph.values[n])),
                      "influence": _finite(float(pr.node_influence[n])),
                      "node_cut": _finite(float(pr.node_cut[n])) if n < first_token else 0.0,
                      "href": (hrefs or {}).get(key) if info["kind"] == "feature" else None,
                      "examples": [[s, _finite(v)] for s, v in (examples or {}).get(key, [])][:5]
                      if info["kind"] == "feature" else []})
    sel = torch.tensor(shown)
    sub = graph.adjacency[sel][:, sel]
    cut = pr.edge_cut[sel][:, sel]
    t_idx, s_idx = sub.nonzero(as_tuple=True)
    order = cut[t_idx, s_idx].argsort()[:max_edges]
    edges = [[int(s_idx[k]), int(t_idx[k]), _finite(float(sub[t_idx[k], s_idx[k]])),
              _finite(float(cut[t_idx[k], s_idx[k]]))]
             for k in order]
    return {"tokens": graph.token_strs, "n_layers": graph.n_layers, "nodes": nodes, "edges": edges,
            "node_threshold": 0.8, "edge_threshold": 0.98}


def viewer_examples(data: FeatureData, j: int, n: int = 5) -> list[tuple[str, float]]:
    """The `n` top activating contexts of `data`'s j-th feature as plain text (the token itself in
    [brackets]) with their activations: `viewer_data`'s `examples` of one feature."""
    S = data.token_rows.shape[1]
    out = []
    for v, where in zip(data.top_values[j][:n], data.top_where[j][:n]):
        if where < 0:
            break
        row, pos = divmod(int(where), S)
        toks = data.token_strings[row]
        out.append(("".join(toks[max(1, pos - 12):pos]) + "[" + toks[pos] + "]" + "".join(toks[pos + 1:pos + 3]),
                    float(v)))
    return out


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0
