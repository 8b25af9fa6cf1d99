"""Edges between a model's components: the component graph, edge attribution patching (EAP, Syed et
al. 2023), EAP with integrated gradients (EAP-IG, Hanna et al. 2024) and exact edge patching.

    graph = component_graph(model)                       # nodes, readers and every edge between them
    s = edge_attribution(model, task)                    # EdgeScores: EAP, one forward pair + one backward
    s = edge_attribution(model, task, "eap-ig", steps=8) # gradients averaged from corrupt to clean
    s = edge_attribution(model, task, "exact")           # every edge patched on its own (slow reference)
    patch_edges(model, task, [["L0H1->L1H2.k"]])         # [R] the metric with those edges patched
    run_with_edges(model, task, [circuit_edges])         # [R] the metric of circuits (only their edges clean)

Shape letters as in workbench.model.transformer, plus R rows (patches or circuits run side by side),
U upstream nodes, N readers and E edges.

**The graph.** Upstream nodes write to the residual stream: `embed` (everything in
blocks.0.hook_resid_pre), every attention head `L{l}H{h}` (its z W_O, `adapter.head_outputs`) and
every MLP `MLP{l}` (hook_mlp_out). Readers read it: every head's query input `L{l}H{h}.q`, key input
`L{l}H{h}.k` and value input `L{l}H{h}.v`, every MLP's input `MLP{l}`, and the unembedding, `logits`
(the final residual stream). Under grouped-query attention a key or value input belongs to a
key/value head shared by several query heads, so those readers are `L{l}KV{g}.k` and `L{l}KV{g}.v`,
one per key/value head. An edge `u->d` joins each node to each reader after it: heads of layer l
read the writes of layers before l; an MLP also reads its own layer's heads, except in parallel
blocks (GPT-NeoX, GPT-J, Phi: `describe(model).parallel`), where attention and MLP both read
resid_pre; the logits read everything. Attention biases and other constant terms are no node: they
are the same in every run.

**Exact edge patching.** A reader's input is recomputed from its own copy of the residual stream,
the stream as it is in this run with, for each patched edge (u, d), u's write in this run replaced
by u's write in the other run (at weight w in [0, 1], the write moves the fraction w of the way):

    in_d = resid_d + sum over patched u of  w (a_u[source run] - a_u[this run])

Head inputs are recomputed through the block's ln1 and the head's W_Q, W_K or W_V and written at
hook_q/k/v (as `workbench.compute.path_patching` does); an MLP's input through the norm before it
and written at the MLP's input hook (`blocks.{l}.mlp.hook_pre` on a workbench Transformer, as
norm(x) W_in + b_in; `blocks.{l}.mlp.hook_in` on a bridge, as norm(x)); the logits' at the final
residual stream (`blocks.{L-1}.hook_resid_post`). A key or value reader under grouped-query
attention rebuilds the shared key/value head, for every query head that reads it. A head's write
under Gemma 2's post-attention norm is taken with the norm's per-token scale of its own run. A row
that patches every edge out of `embed` at one weight moves the embedding in the stream instead
(blocks.0.hook_resid_pre; the same run, cheaper). Two conventions, `direction`:

    "denoise"   the run is on the corrupt prompt; patched edges carry the clean run's writes
    "noise"     the run is on the clean prompt; patched edges carry the corrupt run's writes

`patch_edges` patches the edges it is given. `run_with_edges` runs circuits: a circuit is a set of
edges through which clean information may flow; the run is on the corrupt prompt, the clean
embedding enters only through the circuit's edges out of `embed`, every node computes from what it
reads, and each reader reads, from each upstream node u, u's write in this run if (u, d) is in the
circuit, else u's write on the corrupt prompt. That is "noise" with every edge outside the circuit
patched (the convention of ACDC, auto-circuit and Hanna et al.'s evaluate_graph): the whole graph
gives the clean run, the empty circuit the corrupt one, and a node cut off from `embed` writes what
it wrote on the corrupt prompt. (Patching a circuit's edges with fixed clean writes under "denoise"
is not a circuit: one edge into the logits would carry the clean answer with nothing behind it.)

Before any number is returned, each public function runs the self-check (`_self_check`), rows of
one pass whose answer is known: with every edge patched but those into the logits, every head and
MLP must write exactly what it wrote on the source run; with only the edges into the logits, or
only those out of the embedding, or every edge patched, the metric and the logits must be the
source run's (to 1e-4 relative, 3e-2 in half precision). Where they are not (an edit that does not
take effect, a residual stream that is not the sum of the writes), it raises `DoesNotApplyError`
naming the architecture. With no edge patched nothing is edited: the run is the base run.

**EAP.** The first-order estimate of patching one edge, for every edge from one clean and one
corrupt forward pass and one backward pass. Scores are normalised by m(clean) - m(corrupt), so
that, under either direction, a positive score is a fraction of the behaviour the edge carries:

    denoise   score(u->d) = (a_u[clean] - a_u[corrupt]) . dm/d(in_d) at the corrupt run
              estimates m(corrupt, edge patched clean) - m(corrupt)
    noise     score(u->d) = (a_u[clean] - a_u[corrupt]) . dm/d(in_d) at the clean run
              estimates m(clean) - m(clean, edge patched corrupt)

summed over positions and averaged over prompts. One backward pass gives every reader's gradient:
at hook_q/k/v, the MLP's input hook and the final residual stream, each taken back to the reader's
input through the same functions exact patching rebuilds inputs with (a head's W_Q, W_K or W_V,
then the block's ln1 as a vector-Jacobian product at the residual stream, batched over the layer's
readers with `is_grads_batched`); the scores are then one matrix product per layer of the nodes'
write differences [U, B*S*D] with the readers' gradients [B*S*D, N].

**EAP-IG.** The same product with the gradient averaged at `steps` points along a path from the
corrupt run to the clean one (midpoints, alpha = (k + 1/2) / steps). `ig="inputs"` (the paper's):
the embedding moves from corrupt to clean and everything after it is computed; the path and the
scores are the same under both directions. `ig="activations"`: for edges out of one group of nodes
(the embedding, one layer's heads, one MLP), only that group's writes move, from the base run's
toward the other run's; all steps and groups run as rows of one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch

from workbench import adapter
from workbench.adapter import Architecture, DoesNotApplyError
from workbench.cache.collect import run_collect
from workbench.cache.tasks import PatchingTask
from workbench.compute.patching.metrics import Metric, normalize, resolve_metric
from workbench.compute.patching.result import ApproximationCheck, sample_for_check
from workbench.errors import InputError, unknown_name_message
from workbench.model.hooked import HookedModel
from workbench.model.transformer import Transformer
from workbench.strict_json import finite, json_array

Direction = Literal["denoise", "noise"]
Method = Literal["eap", "eap-ig", "exact"]
IGPath = Literal["inputs", "activations"]
EdgeSets = Union[np.ndarray, torch.Tensor, Sequence[Sequence[str]]]
"""Edge sets: a [R, E] (or [E]) array of booleans or weights in [0, 1] over `graph.edges`, or R
collections of edge names."""

_MEMORY = 2 ** 29  # bytes of per-row patching state a batch may hold (rows are split to stay under it)


# -- the graph -------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ComponentGraph:
    """A model's components and the edges between them (see the module docstring)."""

    architecture: str
    """The architecture's label, e.g. 'workbench' or 'llama (LlamaForCausalLM)'."""
    n_layers: int
    n_heads: int
    n_kv_heads: int
    has_mlp: bool
    parallel: bool
    """Attention and MLP of a layer both read resid_pre."""
    nodes: tuple[str, ...]
    """U upstream nodes: 'embed', then per layer its heads 'L{l}H{h}' and its 'MLP{l}'."""
    readers: tuple[str, ...]
    """N readers: per layer 'L{l}H{h}.q' for each head, the key then value inputs, 'MLP{l}'; then 'logits'."""
    reads_from: np.ndarray
    """[N] how many nodes each reader reads: reader n reads nodes[:reads_from[n]]."""
    edges: tuple[str, ...]
    """E edges 'node->reader', reader by reader in forward order, nodes in order within a reader."""
    edge_node: np.ndarray
    """[E] index of each edge's node in `nodes`."""
    edge_reader: np.ndarray
    """[E] index of each edge's reader in `readers`."""
    reader_nodes: tuple[tuple[int, ...], ...]
    """[N] the nodes each reader feeds: its head, the query heads sharing a key/value head, its MLP;
    none for the logits."""

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def head_readers(self, layer: int) -> slice:
        """The readers of `layer`'s attention: H query inputs, G key inputs, G value inputs."""
        per = self.n_heads + 2 * self.n_kv_heads + int(self.has_mlp)
        return slice(layer * per, layer * per + self.n_heads + 2 * self.n_kv_heads)

    def mlp_reader(self, layer: int) -> int:
        """The index of `layer`'s MLP input among the readers."""
        return self.head_readers(layer).stop

    @property
    def logits_reader(self) -> int:
        return len(self.readers) - 1

    def layer_nodes(self, layer: int) -> slice:
        """`layer`'s heads among the nodes."""
        start = 1 + layer * (self.n_heads + int(self.has_mlp))
        return slice(start, start + self.n_heads)

    def mlp_node(self, layer: int) -> int:
        return self.layer_nodes(layer).stop

    def index(self, edge: str) -> int:
        """The position of an edge name in `edges`; an error naming the nearest names if there is none."""
        found = self._positions.get(edge)
        if found is None:
            raise InputError(unknown_name_message("edge", edge, self.edges, listed_by="component_graph(model).edges"))
        return found

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.edges)}

    def mask(self, edges: Union[Sequence[str], set]) -> np.ndarray:
        """[E] bool: True at the named edges."""
        out = np.zeros(self.n_edges, dtype=bool)
        for e in edges:
            out[self.index(e)] = True
        return out

    def dense(self, values_E: torch.Tensor) -> torch.Tensor:
        """[..., U, N] values on edges laid out as a node x reader matrix (zero where there is no edge)."""
        out = values_E.new_zeros(*values_E.shape[:-1], len(self.nodes), len(self.readers))
        out[..., torch.as_tensor(self.edge_node, device=values_E.device),
            torch.as_tensor(self.edge_reader, device=values_E.device)] = values_E
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the nodes, readers and edges."""
        return {"architecture": self.architecture, "nodes": list(self.nodes), "readers": list(self.readers),
                "edges": list(self.edges)}


def component_graph(model: HookedModel) -> ComponentGraph:
    """The model's component graph, from `describe(model)` (see the module docstring)."""
    arch = adapter.describe(model)
    return _graph(arch)


def _graph(arch: Architecture) -> ComponentGraph:
    L, H, G, mlp = arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.has_mlp
    nodes = ["embed"]
    readers: list[str] = []
    reads: list[int] = []
    owners: list[tuple[int, ...]] = []
    kv = (lambda l, g, c: f"L{l}KV{g}.{c}") if G < H else (lambda l, g, c: f"L{l}H{g}.{c}")
    for l in range(L):
        before = len(nodes)
        readers += [f"L{l}H{h}.q" for h in range(H)] + [kv(l, g, "k") for g in range(G)] + \
                   [kv(l, g, "v") for g in range(G)]
        reads += [before] * (H + 2 * G)
        shared = [tuple(before + g * (H // G) + i for i in range(H // G)) for g in range(G)]
        owners += [(before + h,) for h in range(H)] + shared + shared
        nodes += [f"L{l}H{h}" for h in range(H)]
        if mlp:
            readers.append(f"MLP{l}")
            reads.append(before if arch.parallel else len(nodes))
            owners.append((len(nodes),))
            nodes.append(f"MLP{l}")
    readers.append("logits")
    reads.append(len(nodes))
    owners.append(())
    edge_node = np.concatenate([np.arange(n) for n in reads])
    edge_reader = np.concatenate([np.full(n, i) for i, n in enumerate(reads)])
    edges = tuple(f"{nodes[u]}->{readers[d]}" for u, d in zip(edge_node, edge_reader))
    return ComponentGraph(arch.label, L, H, G, mlp, arch.parallel, tuple(nodes), tuple(readers), np.array(reads),
                          edges, edge_node, edge_reader, tuple(owners))


# -- what a run writes -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Run:
    """One plain run: its logits and every node's write, fp32 and detached."""

    tokens: torch.Tensor
    """[B, S]"""
    logits: torch.Tensor
    """[B, S, V]"""
    writes: torch.Tensor
    """[U, B, S, D] in the order of graph.nodes."""


def _write_hooks(model: HookedModel, graph: ComponentGraph, layer: int) -> list[str]:
    """The hooks one layer's writes are read from."""
    names = adapter.head_output_hooks(model, layer)
    return names + ([f"blocks.{layer}.hook_mlp_out"] if graph.has_mlp else [])


@torch.no_grad()
def _plain_run(model: HookedModel, graph: ComponentGraph, tokens: torch.Tensor, hw: adapter.HeadWeights) -> _Run:
    names = ["blocks.0.hook_resid_pre", *(n for l in range(graph.n_layers) for n in _write_hooks(model, graph, l))]
    logits, acts = run_collect(model, tokens, names)
    writes = [acts["blocks.0.hook_resid_pre"].float()[None]]
    for l in range(graph.n_layers):
        writes.append(adapter.head_outputs(model, l, acts, hw))
        if graph.has_mlp:
            writes.append(acts[f"blocks.{l}.hook_mlp_out"].float()[None])
    return _Run(tokens, logits.float(), torch.cat(writes))


# -- the patched forward pass ----------------------------------------------------------------------------
def _mlp_site(model: HookedModel, layer: int) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """(hook name, function from the MLP's residual input [..., D] to that hook's value): where an
    MLP's input is written. A workbench Transformer's MLP input hook is mlp.hook_pre (norm(x) W_in +
    b_in, with or without a LayerNorm); a bridge's is mlp.hook_in, the normalised input (through
    ln2, or ln1 where one norm feeds both attention and MLP, as in GPT-J and Phi)."""
    block = model.blocks[layer]
    if isinstance(model, Transformer):
        mlp, norm = block.mlp, block.ln2
        return f"blocks.{layer}.mlp.hook_pre", lambda x: norm(x) @ mlp.W_in + mlp.b_in
    norm = block._modules.get("ln2") or block.ln1
    return f"blocks.{layer}.mlp.hook_in", norm


@dataclass
class _Tap:
    """Where one group of readers' gradients is read after the backward pass. `kind`:

        input   the readers' inputs were built ([R*B, S, n, D]): the gradient is read there
        qkv     the heads read the residual stream unpatched: the gradients at hook_q/k/v, taken
                back through each head's W and (batched over the readers) the block's ln1
        site    the MLP read it unpatched: the gradient at its input hook, back through the site
        stream  the logits read it unpatched: the gradient of the final residual stream itself
    """

    readers: slice
    kind: Literal["input", "qkv", "site", "stream"]
    tensors: list[torch.Tensor]
    resid: Optional[torch.Tensor] = None
    layer: int = 0
    site: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


class _PatchedForward:
    """The hook state of one forward pass over R rows of B prompts with edges patched at weights
    W [R, U, N] (see the module docstring): it keeps the current run's writes as they happen, builds
    the inputs of readers with a patched edge and writes them at the readers' hooks; readers with
    none read the model's own values. With `grad` it keeps, for every reader, what its gradient is
    read from (`_Tap`), so that one backward pass gives dm/d(input) for all of them."""

    def __init__(self, model: HookedModel, graph: ComponentGraph, hw: adapter.HeadWeights, weights_RUN: torch.Tensor,
                 source_UBSD: torch.Tensor, grad: bool):
        self.model, self.graph, self.hw, self.grad = model, graph, hw, grad
        self.R = weights_RUN.shape[0]
        self.source = source_UBSD
        # A row that patches the embedding at one weight for every reader moves the embedding itself
        # (EAP-IG's path, a circuit with all of embed's edges): once in the stream, not per reader.
        embed_RN = weights_RUN[:, 0]
        uniform_R = (embed_RN == embed_RN[:, :1]).all(dim=1)
        self.embed_weight = torch.where(uniform_R, embed_RN[:, 0], torch.zeros_like(embed_RN[:, 0]))  # [R]
        self.W = weights_RUN.clone()
        self.W[uniform_R, 0] = 0.0
        self.active = self.W.abs().amax(dim=(0, 2)) > 0  # [U] nodes with any patched edge
        self.acts: dict[str, torch.Tensor] = {}  # hook values the current writes are computed from
        self.current: dict[int, torch.Tensor] = {}  # node -> [R*B, S, D] write in this run
        self.qkv: dict[int, tuple[torch.Tensor, ...]] = {}
        self.taps: list[_Tap] = []
        self.dtype = next(model.parameters()).dtype

    # the current run's writes
    def _write(self, node: int) -> torch.Tensor:
        if node not in self.current:
            g = self.graph
            layer = (node - 1) // (g.n_heads + int(g.has_mlp))
            if g.has_mlp and node == g.mlp_node(layer):
                self.current[node] = self.acts[f"blocks.{layer}.hook_mlp_out"].float()
            else:
                heads = adapter.head_outputs(self.model, layer, self.acts, self.hw)
                for i, h in enumerate(range(g.layer_nodes(layer).start, g.layer_nodes(layer).stop)):
                    self.current[h] = heads[i]
        return self.current[node]

    def _delta(self, readers: slice) -> Optional[torch.Tensor]:
        """[R, B, S, n, D] the patch of these readers' inputs, or None where none of them is patched:
        sum over nodes u of W[r, u, n] (source write - this run's write), as two matrix products."""
        prefix = int(self.graph.reads_from[readers.start])
        W_RUn = self.W[:, :prefix, readers]
        nodes = torch.nonzero(self.active[:prefix] & (W_RUn.abs().amax(dim=(0, 2)) > 0))[:, 0].tolist()
        if not nodes:
            return None
        R, (B, S, D) = self.R, self.source.shape[1:]
        W_RnU = W_RUn[:, nodes].transpose(1, 2)
        source_UX = self.source[nodes].reshape(len(nodes), -1)  # X = B*S*D
        current_RUX = torch.stack([self._write(u).reshape(R, -1) for u in nodes], dim=1)
        delta_RnX = torch.matmul(W_RnU, source_UX) - torch.bmm(W_RnU, current_RUX)
        return delta_RnX.view(R, -1, B, S, D).permute(0, 2, 3, 1, 4)

    def _input(self, resid: torch.Tensor, readers: slice) -> Optional[torch.Tensor]:
        """[R*B, S, n, D] the inputs of readers with a patched edge, or None where they have none."""
        delta = self._delta(readers)
        if delta is None:
            return None
        R, B = delta.shape[:2]
        x = (resid.float().reshape(R, B, *resid.shape[1:])[:, :, :, None, :] + delta).reshape(R * B, *delta.shape[2:])
        if self.grad:
            self.taps.append(_Tap(readers, "input", [x]))
        return x

    # the hooks
    def hooks(self) -> list[tuple[str, Callable]]:
        g, out = self.graph, []
        out.append(("blocks.0.hook_resid_pre", self._embed))
        for l in range(g.n_layers):
            if l > 0:
                out.append((f"blocks.{l}.hook_resid_pre", lambda a, hook, l=l: self._heads(a, l)))
            for i, c in enumerate("qkv"):
                out.append((f"blocks.{l}.attn.hook_{c}", lambda a, hook, l=l, i=i: self._qkv(a, l, i)))
            for name in _write_hooks(self.model, g, l):
                out.append((name, lambda a, hook, name=name: self._keep(a, name)))
            if g.has_mlp:
                if not g.parallel:
                    out.append((f"blocks.{l}.hook_resid_mid", lambda a, hook, l=l: self._keep(a, f"mid{l}")))
                site, fn = _mlp_site(self.model, l)
                out.append((site, lambda a, hook, l=l, fn=fn: self._mlp(a, l, fn)))
        out.append((f"blocks.{g.n_layers - 1}.hook_resid_post", self._logits))
        return out

    def _keep(self, act: torch.Tensor, name: str) -> torch.Tensor:
        self.acts[name] = act
        return act

    def _embed(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        if bool((self.embed_weight != 0).any()):
            B = self.source.shape[1]
            w = self.embed_weight.repeat_interleave(B)[:, None, None]
            act = (act.float() + w * (self.source[0].repeat(self.R, 1, 1) - act.float())).to(act.dtype)
        if self.grad and not act.requires_grad:  # a model with frozen weights: the gradient starts here
            act = act.detach().requires_grad_()
        self.current[0] = act.float()
        return self._heads(act, 0)

    def _heads(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        self.acts[f"pre{layer}"] = resid
        readers = self.graph.head_readers(layer)
        x = self._input(resid, readers)
        if x is not None:
            self.qkv[layer] = self._project(self.model.blocks[layer].ln1(x.to(self.dtype)).float(), layer)
        elif self.grad:
            self.taps.append(_Tap(readers, "qkv", [], resid, layer))
        return resid

    def _project(self, xn_BSnD: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) from the normalised inputs of the layer's H query, G key and G value readers."""
        H, G, hw = self.graph.n_heads, self.graph.n_kv_heads, self.hw
        q = torch.einsum("bsnd,ndk->bsnk", xn_BSnD[:, :, :H], hw.W_Q[layer]) + hw.b_Q[layer]
        k = torch.einsum("bsnd,ndk->bsnk", xn_BSnD[:, :, H:H + G], hw.W_K_grouped[layer]) + hw.b_K_grouped[layer]
        v = torch.einsum("bsnd,ndk->bsnk", xn_BSnD[:, :, H + G:], hw.W_V_grouped[layer]) + hw.b_V_grouped[layer]
        return q, k, v

    def _qkv(self, act: torch.Tensor, layer: int, which: int) -> torch.Tensor:
        if layer in self.qkv:
            return self.qkv[layer][which].to(act.dtype)
        if self.grad:  # a copy read by this input alone (GPT-J's and Phi's MLPs share ln1's output, say)
            act = act.clone()
            tap = self.taps[-1]
            assert tap.kind == "qkv" and tap.layer == layer  # hook_q/k/v fire after their layer's resid_pre
            tap.tensors.append(act)
        return act

    def _mlp(self, act: torch.Tensor, layer: int, fn: Callable) -> torch.Tensor:
        resid = self.acts[f"pre{layer}" if self.graph.parallel else f"mid{layer}"]
        r = self.graph.mlp_reader(layer)
        x = self._input(resid, slice(r, r + 1))
        if x is not None:
            return fn(x[:, :, 0].to(self.dtype)).to(act.dtype)
        if self.grad:
            act = act.clone()
            self.taps.append(_Tap(slice(r, r + 1), "site", [act], resid, layer, fn))
        return act

    def _logits(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        r = self.graph.logits_reader
        x = self._input(act, slice(r, r + 1))
        if x is not None:
            return x[:, :, 0].to(act.dtype)
        if self.grad:
            act = act.clone()
            self.taps.append(_Tap(slice(r, r + 1), "stream", [act]))
        return act

    # the gradients
    def reader_grads(self, total: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
        """[(readers, dm/d(input) [R*B, S, n, D])] for every reader, from one backward pass of `total`."""
        flat = [t for tap in self.taps for t in tap.tensors]
        grads = iter(torch.autograd.grad(total, flat, allow_unused=True))
        out = []
        for tap in self.taps:
            got = [next(grads) for _ in tap.tensors]
            got = [torch.zeros_like(t) if g is None else g for t, g in zip(tap.tensors, got)]
            out.append((tap.readers, self._to_inputs(tap, got)))
        return out

    def _to_inputs(self, tap: _Tap, got: list[torch.Tensor]) -> torch.Tensor:
        """The gradients at a tap taken back to the readers' inputs, [R*B, S, n, D]."""
        if tap.kind == "input":
            return got[0]
        if tap.kind == "stream":
            return got[0].float()[:, :, None]
        x = tap.resid.detach().float().requires_grad_()
        with torch.enable_grad():
            if tap.kind == "site":
                y = tap.site(x.to(self.dtype)).float()
                return torch.autograd.grad(y, x, got[0].float())[0][:, :, None]
            # each head's gradient taken back through its own W to the normalised stream, then
            # through ln1 at the one residual stream, batched over the readers
            hw, l = self.hw, tap.layer
            g_q, g_k, g_v = (g.float() for g in got)
            cot_nBSD = torch.cat([torch.einsum("bshk,hdk->hbsd", g_q, hw.W_Q[l]),
                                  torch.einsum("bshk,hdk->hbsd", g_k, hw.W_K_grouped[l]),
                                  torch.einsum("bshk,hdk->hbsd", g_v, hw.W_V_grouped[l])])
            y = self.model.blocks[l].ln1(x.to(self.dtype)).float()
            g_nBSD = torch.autograd.grad(y, x, cot_nBSD, is_grads_batched=True)[0]
        return g_nBSD.permute(1, 2, 0, 3)


def _forward(model: HookedModel, graph: ComponentGraph, hw: adapter.HeadWeights, base: torch.Tensor,
             source_UBSD: torch.Tensor, weights_RE: torch.Tensor, grad: bool = False
             ) -> tuple[torch.Tensor, _PatchedForward]:
    """(logits [R*B, S, V], the pass's state) of R rows on the base tokens [B, S], row r with the
    edges patched at weights_RE[r]."""
    state = _PatchedForward(model, graph, hw, graph.dense(weights_RE.float()), source_UBSD, grad)
    tokens = base.repeat(weights_RE.shape[0], 1)
    with torch.set_grad_enabled(grad), model.hooks(fwd_hooks=state.hooks()):
        logits = model(tokens)
    return logits, state


# -- the shared setup: runs, metric and the self-check ---------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Setup:
    """What every edge computation on one task starts from."""

    model: HookedModel
    graph: ComponentGraph
    hw: adapter.HeadWeights
    task: PatchingTask
    metric: Metric
    metric_name: str
    clean: _Run
    corrupt: _Run
    clean_metric: float
    corrupt_metric: float

    def base_and_source(self, direction: Direction) -> tuple[_Run, _Run]:
        """(the run the pass is on, the run patched edges carry) under `direction`."""
        return (self.corrupt, self.clean) if direction == "denoise" else (self.clean, self.corrupt)

    def values(self, logits: torch.Tensor) -> torch.Tensor:
        """[R] the metric of each row, averaged over the task's prompts."""
        return self.metric(logits, self.task).float().view(-1, self.task.n_prompts).mean(1)

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return normalize(values, self.clean_metric, self.corrupt_metric)

    def rows_per_batch(self) -> int:
        """How many rows of patches one forward pass may carry under the memory budget."""
        U, B, S, D = self.clean.writes.shape
        readers_per_layer = len(self.graph.readers) // max(self.graph.n_layers, 1)
        # the current writes and their differences [B, S, U, D], one layer's inputs, the logits
        per_row = 4 * B * S * (D * (3 * U + 3 * readers_per_layer + 8) + 2 * self.clean.logits.shape[-1])
        return max(1, _MEMORY // per_row)

    def run(self, weights_RE: torch.Tensor, direction: Direction,
            reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """[R] metric values (or `reduce(logits [R*B, S, V])`) of rows of patched edges, in batches
        under the memory budget."""
        base, source = self.base_and_source(direction)
        out = []
        step = self.rows_per_batch()
        with torch.no_grad():
            for i in range(0, weights_RE.shape[0], step):
                logits, _ = _forward(self.model, self.graph, self.hw, base.tokens, source.writes,
                                     weights_RE[i:i + step])
                out.append((reduce or self.values)(logits))
        return torch.cat(out)


def _setup(model: HookedModel, task: PatchingTask, metric: Union[Metric, str]) -> _Setup:
    arch = adapter.describe(model)
    what = "edge patching"
    arch.require("residual", what)
    arch.require("qkv edits", what)
    names = ["blocks.0.hook_resid_pre", f"blocks.{arch.n_layers - 1}.hook_resid_post",
             *(f"blocks.{l}.hook_resid_mid" for l in range(arch.n_layers) if arch.has_mlp and not arch.parallel)]
    arch.require_hooks(names, what)
    graph = _graph(arch)
    fn, name = resolve_metric(metric, task)
    device = next(model.parameters()).device
    task = task.to(device)
    hw = adapter.head_weights(model)
    clean, corrupt = _plain_run(model, graph, task.clean, hw), _plain_run(model, graph, task.corrupt, hw)
    m_clean = float(fn(clean.logits, task).float().mean())
    m_corrupt = float(fn(corrupt.logits, task).float().mean())
    return _Setup(model, graph, hw, task, fn, name, clean, corrupt, m_clean, m_corrupt)


def _self_check(setup: _Setup, direction: Direction) -> None:
    """The edits must take effect and reproduce the model, else DoesNotApplyError naming the
    architecture. Four rows of one pass on the base run, each with a known answer: the source run.

        every edge but those into the logits   each node reads only source writes, so each head
                                               and MLP must write what it wrote on the source
                                               run (every rebuilt head and MLP input)
        only the edges into the logits         the logits (the final residual stream's edit)
        only the edges out of the embedding    the logits (the embedding moved in the stream)
        every edge                             the metric and the logits

    With no edge patched the run is the base run itself: nothing is edited."""
    g = setup.graph
    base, source = setup.base_and_source(direction)
    half = next(setup.model.parameters()).dtype in (torch.float16, torch.bfloat16)
    rel = 3e-2 if half else 1e-4
    into_logits = torch.as_tensor(g.edge_reader == g.logits_reader, dtype=torch.float32)
    from_embed = torch.as_tensor(g.edge_node == 0, dtype=torch.float32)
    rows = torch.stack([1.0 - into_logits, into_logits, from_embed, torch.ones(g.n_edges)])
    B = setup.task.n_prompts
    pos = setup.task.position
    problems = []
    with torch.no_grad():
        logits, state = _forward(setup.model, g, setup.hw, base.tokens, source.writes, rows.to(source.writes.device))
        got = torch.stack([state._write(u)[:B] for u in range(1, len(g.nodes))])  # the embedding reads nothing
        error = (got - source.writes[1:]).abs().amax(dim=(1, 2, 3))
        bad = [1 + u for u in torch.nonzero(error > rel * (1.0 + source.writes[1:].abs().amax(dim=(1, 2, 3))))[:, 0]
               .tolist()]
        if bad:
            problems.append(f"with every edge but the logits' patched, {', '.join(g.nodes[u] for u in bad[:3])} "
                            f"{'does' if len(bad) == 1 else 'do'} not write what {'it' if len(bad) == 1 else 'they'} "
                            f"wrote on the source run (off by {float(error.max()):.3g})")
        want_logits = source.logits.gather(1, pos[..., None].expand(-1, -1, source.logits.shape[-1]))
        want = float(setup.values(source.logits)[0])
        for r, what in ((1, "only the edges into the logits"), (2, "only the embedding's edges"), (3, "every edge")):
            row = logits[r * B:(r + 1) * B].float()
            got_logits = row.gather(1, pos[..., None].expand(-1, -1, row.shape[-1]))
            value = float(setup.values(row)[0])
            off = float((got_logits - want_logits).abs().max())
            if not (abs(value - want) <= rel * max(1.0, abs(setup.clean_metric), abs(setup.corrupt_metric))
                    and off <= rel * (1.0 + float(want_logits.abs().max()))):
                problems.append(f"with {what} patched the metric is {value:.6g}, not {want:.6g} (logits off by "
                                f"{off:.3g})")
    if problems:
        raise DoesNotApplyError(
            f"{g.architecture}: edge patching does not apply ({direction}): {problems[0]}; the edits of the "
            "heads' inputs (hook_q/k/v), the MLPs' inputs, the final residual stream or blocks.0.hook_resid_pre "
            "do not reproduce this model's run.")


def _edge_rows(graph: ComponentGraph, edges: EdgeSets, device: torch.device) -> torch.Tensor:
    """[R, E] float weights from any accepted form of edge sets."""
    if isinstance(edges, (np.ndarray, torch.Tensor)):
        w = torch.as_tensor(np.asarray(edges) if isinstance(edges, np.ndarray) else edges).float()
        w = w[None] if w.ndim == 1 else w
        if w.ndim != 2 or w.shape[1] != graph.n_edges or w.shape[0] == 0:
            raise InputError(f"Edge sets as an array must be [R, E] or [E] with E = {graph.n_edges} edges; got "
                             f"{tuple(w.shape)}.")
        if bool(((w < 0) | (w > 1)).any()) or not bool(torch.isfinite(w).all()):
            raise InputError("Edge weights must lie in [0, 1] (1: the edge patched or kept, 0: not).")
        return w.to(device)
    if isinstance(edges, str) or any(isinstance(s, str) for s in edges):
        raise InputError("Edge sets are a [R, E] array or a list of R collections of edge names, e.g. "
                         "[['L0H1->L1H2.k']] (one set); got a flat list of names.")
    if not len(edges):
        raise InputError("No edge sets given: pass at least one (a list of edge names, or a row of weights).")
    return torch.as_tensor(np.stack([graph.mask(s) for s in edges]), dtype=torch.float32, device=device)


def _check_direction(direction: str) -> None:
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction must be 'denoise' or 'noise', got {direction!r}.")


# -- exact patching --------------------------------------------------------------------------------------
def patch_edges(model: HookedModel, task: PatchingTask, edges: EdgeSets, direction: Direction = "denoise",
                metric: Union[Metric, str] = "auto", normalized: bool = True) -> np.ndarray:
    """[R] the metric of R runs, run r with the edge set edges[r] patched (see the module docstring:
    "denoise" runs the corrupt prompt with those edges carrying the clean writes, "noise" the
    reverse); normalised to clean 1, corrupt 0 unless `normalized=False`. Self-checked."""
    _check_direction(direction)
    setup = _setup(model, task, metric)
    weights = _edge_rows(setup.graph, edges, setup.clean.writes.device)
    _self_check(setup, direction)
    values = setup.run(weights, direction)
    return (setup.normalize(values) if normalized else values).cpu().numpy()


def run_with_edges(model: HookedModel, task: PatchingTask, circuits: EdgeSets, metric: Union[Metric, str] = "auto",
                   normalized: bool = True) -> np.ndarray:
    """[R] the metric of R circuits: only each circuit's edges carry clean information (the module
    docstring defines the run); normalised to clean 1, corrupt 0 unless `normalized=False`. A row
    of weights in [0, 1] keeps each edge partly. Self-checked."""
    setup = _setup(model, task, metric)
    kept = _edge_rows(setup.graph, circuits, setup.clean.writes.device)
    _self_check(setup, "noise")
    values = _run_circuits(setup, kept)
    return (setup.normalize(values) if normalized else values).cpu().numpy()


def _run_circuits(setup: _Setup, kept_RE: torch.Tensor,
                  reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """[R] raw metric values (or `reduce(logits)`) of circuits: "noise" with every edge outside the
    circuit patched."""
    return setup.run(1.0 - kept_RE, "noise", reduce)


# -- attribution -----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EdgeScores:
    """A score for every edge of the component graph: the fraction of the clean–corrupt difference
    in the metric that the edge carries (first-order for EAP and EAP-IG, exact for "exact")."""

    graph: ComponentGraph
    scores: np.ndarray
    """[E] in the order of graph.edges."""
    method: str
    """'eap', 'eap-ig' or 'exact'."""
    direction: str
    """'denoise' or 'noise' (see the module docstring)."""
    metric: str
    clean_metric: float
    """The metric on the clean prompts (mean over prompts)."""
    corrupt_metric: float
    steps: int
    """Points on the integrated-gradients path (1 for EAP, 0 for exact)."""
    ig: str = ""
    """'inputs' or 'activations' for EAP-IG, else ''."""
    check: Optional[ApproximationCheck] = None
    """For EAP and EAP-IG: the scores against exact single-edge patching (in `direction`) on a
    sample of edges, the half of largest |score| and a random half."""

    @property
    def edges(self) -> tuple[str, ...]:
        return self.graph.edges

    def ranked(self, absolute: bool = True) -> list[str]:
        """Edge names, highest score first (by |score| unless `absolute=False`)."""
        key = np.abs(self.scores) if absolute else self.scores
        return [self.graph.edges[i] for i in np.argsort(-key, kind="stable")]

    def top(self, k: int = 10, absolute: bool = True) -> list[tuple[str, float]]:
        """The k highest-scoring edges with their scores."""
        return [(e, self.score(e)) for e in self.ranked(absolute)[:k]]

    def rank(self, edge: str, absolute: bool = True) -> int:
        """0-based rank of `edge` in `ranked`."""
        return self.ranked(absolute).index(self.graph.edges[self.graph.index(edge)])

    def score(self, edge: str) -> float:
        return float(self.scores[self.graph.index(edge)])

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (NaN as null): the settings and each edge's score."""
        return {"method": self.method, "direction": self.direction, "metric": self.metric, "steps": self.steps,
                "ig": self.ig, "clean_metric": finite(self.clean_metric), "corrupt_metric": finite(self.corrupt_metric),
                "architecture": self.graph.architecture, "edges": list(self.graph.edges),
                "scores": json_array(self.scores, 6), "check": None if self.check is None else self.check.to_dict()}


def edge_attribution(model: HookedModel, task: PatchingTask, method: Method = "eap",
                     metric: Union[Metric, str] = "auto", direction: Direction = "denoise", steps: int = 8,
                     ig: IGPath = "inputs", check: int = 32, seed: int = 0) -> EdgeScores:
    """Scores for every edge (see the module docstring): "eap" from one clean and one corrupt forward
    and one backward pass; "eap-ig" averaging the gradient over `steps` points from the corrupt to
    the clean run (`ig="inputs"`: the embedding moves; "activations": one node group at a time);
    "exact" patching each edge on its own. An estimate's `check` holds its error against exact
    patching of `check` edges in `direction` (0: none). This is the benchmark's entry point.

    Memory: the clean and corrupt runs' writes, 2 x U x B x S x D floats (162 MB for GPT-2 small on
    8 prompts of 21 tokens), and one layer's reader gradients at a time."""
    _check_direction(direction)
    if method not in ("eap", "eap-ig", "exact"):
        raise InputError(f"method must be 'eap', 'eap-ig' or 'exact', got {method!r}.")
    if ig not in ("inputs", "activations"):
        raise InputError(f"ig must be 'inputs' or 'activations', got {ig!r}.")
    if method == "eap-ig" and (not isinstance(steps, int) or steps < 1):
        raise InputError(f"steps must be a positive integer, got {steps!r}.")
    setup = _setup(model, task, metric)
    _self_check(setup, direction)
    scores = _attribution(setup, method, direction, steps, ig)
    if method == "exact" or check <= 0:
        return scores
    picked = sample_for_check(scores.scores, check, seed)
    rows = torch.zeros(len(picked), setup.graph.n_edges, device=setup.clean.writes.device)
    rows[torch.arange(len(picked)), torch.as_tensor(picked)] = 1.0
    values = setup.run(rows, direction)
    raw = values - setup.corrupt_metric if direction == "denoise" else setup.clean_metric - values
    exact = setup.normalize(raw + setup.corrupt_metric).cpu().numpy()
    checked = ApproximationCheck.of([(setup.graph.edges[i],) for i in picked], scores.scores[picked], exact)
    return replace(scores, check=checked)


def _attribution(setup: _Setup, method: Method, direction: Direction, steps: int, ig: IGPath) -> EdgeScores:
    """edge_attribution on a checked setup."""
    if method == "exact":
        raw = _exact_scores(setup, direction)
        n_steps, path = 0, ""
    else:
        n_steps, path = (1, "") if method == "eap" else (steps, ig)
        raw = _gradient_scores(setup, direction, n_steps, path)
    scores = setup.normalize(raw + setup.corrupt_metric)  # raw / (clean - corrupt), refusing a zero gap
    return EdgeScores(setup.graph, scores.cpu().numpy().astype(np.float64), method, direction, setup.metric_name,
                      setup.clean_metric, setup.corrupt_metric, n_steps, path)


def _exact_scores(setup: _Setup, direction: Direction) -> torch.Tensor:
    """[E] raw metric change of patching each edge alone (signed so that positive carries the clean
    behaviour: m(patched) - m(corrupt) for denoise, m(clean) - m(patched) for noise)."""
    E = setup.graph.n_edges
    device = setup.clean.writes.device
    step = 4 * setup.rows_per_batch()
    values = []
    for i in range(0, E, step):
        n = min(step, E - i)
        rows = torch.zeros(n, E, device=device)
        rows[torch.arange(n), i + torch.arange(n)] = 1.0
        values.append(setup.run(rows, direction))
    values = torch.cat(values)
    return values - setup.corrupt_metric if direction == "denoise" else setup.clean_metric - values


def _ig_rows(graph: ComponentGraph, steps: int, path: str, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [R, E], row group [R], node group [U]): each row a point on an integrated-gradients
    path, and each node's edges scored with the gradient averaged over the rows of its group.
    EAP (path ''): one row, nothing patched. "inputs": the edges out of `embed` at alpha, one group.
    "activations": per group of nodes (the embedding, one layer's heads, one MLP), its edges at alpha."""
    U, E = len(graph.nodes), graph.n_edges
    node_group = torch.zeros(U, dtype=torch.long)
    if path == "":
        return torch.zeros(1, E), torch.zeros(1, dtype=torch.long), node_group
    alphas = (torch.arange(steps) + 0.5) / steps  # midpoints
    if path == "activations":
        per = 1 + int(graph.has_mlp)
        for l in range(graph.n_layers):
            node_group[graph.layer_nodes(l)] = 1 + l * per
            if graph.has_mlp:
                node_group[graph.mlp_node(l)] = 2 + l * per
        moving = node_group
    else:
        moving = torch.full((U,), -1, dtype=torch.long)
        moving[0] = 0  # only the embedding moves
    n_groups = int(node_group.max()) + 1
    moving_GE = (moving[torch.as_tensor(graph.edge_node)][None] == torch.arange(n_groups)[:, None]).float()
    weights = (alphas[None, :, None] * moving_GE[:, None, :]).reshape(-1, E)
    return weights.to(device), torch.arange(n_groups).repeat_interleave(steps).to(device), node_group.to(device)


def _gradient_scores(setup: _Setup, direction: Direction, steps: int, path: str) -> torch.Tensor:
    """[E] raw (a_clean - a_corrupt) . mean gradient at each edge's reader, the mean over the rows of
    the edge's node group (see _ig_rows). EAP is steps=1 with no path: the gradient at the base run."""
    g = setup.graph
    weights, row_group, node_group = _ig_rows(g, steps, path, setup.clean.writes.device)
    base, source = setup.base_and_source(direction)
    diff_UBSD = setup.clean.writes - setup.corrupt.writes
    n_groups = int(node_group.max()) + 1
    scores_GUN = torch.zeros(n_groups, len(g.nodes), len(g.readers), device=diff_UBSD.device)
    B = setup.task.n_prompts
    step = setup.rows_per_batch()
    for i in range(0, weights.shape[0], step):
        rows = slice(i, i + step)
        logits, state = _forward(setup.model, g, setup.hw, base.tokens, source.writes, weights[rows], grad=True)
        groups = row_group[rows]
        for readers, grad in state.reader_grads(setup.values(logits).sum()):
            prefix = int(g.reads_from[readers.start])
            grad_RBSnD = grad.view(-1, B, *grad.shape[1:])
            for gi in torch.unique(groups).tolist():
                summed_nX = grad_RBSnD[groups == gi].sum(0).permute(2, 0, 1, 3).reshape(grad.shape[2], -1)
                scores_GUN[gi, :prefix, readers] += diff_UBSD[:prefix].reshape(prefix, -1) @ summed_nX.T
        del logits, state
    counts = torch.bincount(row_group, minlength=n_groups).clamp_min(1).float()
    scores_UN = (scores_GUN / counts[:, None, None])[node_group, torch.arange(len(g.nodes))]
    return scores_UN[torch.as_tensor(g.edge_node), torch.as_tensor(g.edge_reader)]
