"""`build_graph`: the attribution graph of a prompt, in four phases (the clean run and the nodes in
`nodes`, the edges and the identities in `edges`); and `check_supported`, which refuses, before any
transcoder is trained, a model whose attention cannot be frozen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from workbench.adapter.provenance import model_name_of
from workbench.adapter.tokens import token_strings
from workbench.cache.rows import special_ids
from workbench.compute.attribution_graph.edges import FrozenReplacement, check_identities, compute_edges
from workbench.compute.attribution_graph.graph import AttributionGraph, GraphConfig
from workbench.compute.attribution_graph.nodes import CleanRun, Nodes, frozen_attention
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.sae.transcoders import Transcoders, mlp_layers


def _tokens(model: HookedModel, prompt: Union[str, torch.Tensor, Sequence[int]]) -> torch.Tensor:
    """[1, S] token ids of `prompt`. Text is tokenized without special tokens and then gets the model's BOS
    first (where it has one and the text does not already start with it), as the study's default
    prompts and training rows do: the same text gives the same graph whichever way it arrives. Token
    ids are taken as they are."""
    device = next(model.parameters()).device
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InputError("This model has no tokenizer; give the prompt as token ids.")
        tok = model.tokenizer
        ids = list(tok(prompt, add_special_tokens=False)["input_ids"] if hasattr(tok, "all_special_ids")
                   else tok.encode(prompt))  # a Hugging Face tokenizer, or the workbench's TextCodec
        bos, _ = special_ids(model)
        if ids and bos is not None and ids[0] != bos:
            ids = [bos] + ids
        tokens = torch.tensor([ids], dtype=torch.long)
    else:
        tokens = torch.as_tensor(prompt).long()
    tokens = tokens.reshape(1, -1).to(device)
    n_ctx = int(model.cfg.n_ctx)
    if tokens.shape[1] > n_ctx:
        raise InputError(f"The prompt is {tokens.shape[1]} tokens, longer than the model's context of {n_ctx}; "
                         "shorten it.")
    if tokens.shape[1] == 0:
        raise InputError("The prompt is empty.")
    return tokens


def build_graph(model: HookedModel, transcoders: Transcoders, prompt: Union[str, torch.Tensor, Sequence[int]],
                cfg: GraphConfig = GraphConfig(),  # noqa: B008 (frozen: one shared default is safe)
                progress: bool = True) -> AttributionGraph:
    """The attribution graph of `prompt` (text or token ids) through `transcoders`, in four phases:
    (1) one clean run records what the frozen model holds fixed; (2) the nodes: active features, error
    vectors, logit targets; (3) the edges, by batched backward passes through the frozen replacement
    model; (4) both identities checked, or a DoesNotApplyError."""
    transcoders.check_model(model)
    run = CleanRun.record(model, transcoders, _tokens(model, prompt), cfg)  # 1
    nodes = Nodes.find(model, transcoders, run, cfg)  # 2
    frozen = FrozenReplacement(model, transcoders, run)
    A, gap = compute_edges(frozen, transcoders, run, nodes, cfg, progress)  # 3
    bias, values, worst = check_identities(frozen, transcoders, run, nodes, A)  # 4
    if not cfg.first_position_errors:  # their edges join the targets' biases: bias + edges is unchanged
        cols = torch.tensor([nodes.nf + l * run.S for l in range(run.L)])
        rows = nodes.target_rows(run)
        bias[rows] += A[rows][:, cols].sum(1)
        A[:, cols] = 0
        values[cols] = 0
    graph = AttributionGraph(model_name_of(model), run.tokens[0].tolist(), token_strings(model, run.tokens[0]), run.L,
                             nodes.features, nodes.activations.cpu(), nodes.logit_tokens, nodes.logit_probs, A, bias,
                             values, transcoders.kind)
    graph.meta["logit_strs"] = token_strings(model, nodes.logit_tokens)[: nodes.n_logits]
    graph.meta["logits_clean"] = run.last[nodes.logit_tokens.to(run.last.device)].cpu().tolist()
    graph.meta.update({"identity_max_relative_error": worst, "logit_max_error": gap, "config": vars(cfg).copy()})
    return graph


def check_supported(model: HookedModel) -> None:
    """DoesNotApplyError, before any transcoder is trained, for a model whose attention cannot be frozen;
    InputError for one without MLPs."""
    mlp_layers(model)
    frozen_attention(model, torch.arange(1, 9, device=next(model.parameters()).device)[None] % int(model.cfg.d_vocab))
