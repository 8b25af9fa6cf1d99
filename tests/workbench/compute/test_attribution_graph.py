"""Transcoders and attribution graphs: the two exact identities, pruning, scores, interventions, files,
circuit-tracer's layout, and the errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_config
from workbench.adapter import DoesNotApplyError
from workbench.cache.activations import stream_activations
from workbench.compute.attribution_graph import (
    GraphConfig,
    build_graph,
    graph_scores,
    influence,
    intervene,
    load_graph,
    normalized,
    prune,
    save_graph,
)
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.errors import CheckpointError, ConfigError, InputError
from workbench.model.transformer import Transformer
from workbench.sae.circuit_tracer_format import export_circuit_tracer, load_circuit_tracer
from workbench.sae.files import load_sae, save_sae
from workbench.sae.modules import SAEConfig, make_sae
from workbench.sae.training import SAETrainConfig, train_saes
from workbench.sae.transcoders import (
    Transcoders,
    as_transcoders,
    clt_batches,
    evaluate_transcoders,
    input_hook,
    load_transcoders,
    make_transcoders,
    output_hook,
)

PROMPT = "def f(x): return f(x"


def _model(**overrides) -> Transformer:
    return Transformer(tiny_config(d_mlp=64, n_ctx=32, **overrides), tokenizer=TextCodec(byte_tokenizer())).eval()


def _trained(model: Transformer, cross_layer: bool, skip: bool = False, arch: str = "topk", steps: int = 30
             ) -> Transcoders:
    """Briefly trained transcoders (the identities hold for any weights; training makes features sparse
    and varied, as real ones are)."""
    d = make_transcoders(model, 96, arch, k=6, skip=skip, cross_layer=cross_layer, l1_coefficient=1.0)
    rows = torch.randint(0, 257, (64, 32), generator=torch.Generator().manual_seed(1))
    hooks = [h for l in range(2) for h in (input_hook(l), output_hook(l))]
    source = stream_activations(model, rows, hooks, batch_size=256, seed=0)
    cfg = SAETrainConfig(sae=next(iter(d.values())).cfg, n_tokens=steps * 256, batch_size=256, n_checkpoints=0)
    train_saes(d, clt_batches(source, [input_hook(0), input_hook(1)]) if cross_layer else source, cfg, progress=False)
    return as_transcoders(d, 2, "tiny")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return _model()


@pytest.fixture(scope="module", params=["per-layer+skip", "cross-layer", "per-layer-jumprelu"])
def tc(request, model) -> Transcoders:
    if request.param == "cross-layer":
        return _trained(model, cross_layer=True)
    if request.param == "per-layer-jumprelu":
        return _trained(model, cross_layer=False, arch="jumprelu")
    return _trained(model, cross_layer=False, skip=True)


@pytest.fixture(scope="module")
def graph(model, tc):
    return build_graph(model, tc, PROMPT, progress=False)


def test_every_target_is_its_bias_plus_its_incoming_edges(graph):
    """Identity (a), checked independently of build_graph's own check: row sums + bias = real value."""
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.n_nodes - graph.n_logits, graph.n_nodes)])
    total = graph.adjacency[rows].sum(1) + graph.bias[rows]
    assert torch.allclose(total, graph.values[rows], atol=1e-4, rtol=1e-4)
    # feature→feature edges
    assert graph.n_features > 0 and graph.adjacency[rows][:, : graph.n_features].abs().sum() > 0
    # a feature receives nothing from its own layer or later, and sources (errors, tokens) have no inputs
    lay = graph.features[:, 0]
    later = lay[None, :] >= lay[:, None]
    assert graph.adjacency[: graph.n_features, : graph.n_features][later].abs().max() == 0
    assert graph.adjacency[graph.n_features: graph.n_nodes - graph.n_logits].abs().max() == 0


def test_the_frozen_replacement_model_reproduces_the_logits(model, graph):
    """Identity (b) (build_graph refuses to return a graph where it fails): and the logit nodes are the
    real logits, most probable first, holding 95% of the mass or 10 tokens."""
    assert graph.meta["logit_max_error"] <= 1e-4
    with torch.no_grad():
        logits = model(torch.tensor([graph.tokens]))[0, -1]
    probs = logits.softmax(-1)
    assert torch.allclose(graph.values[-graph.n_logits:], logits[graph.logit_tokens], atol=1e-5)
    assert torch.equal(graph.logit_tokens, probs.argsort(descending=True)[: graph.n_logits])
    assert graph.n_logits == 10 or float(graph.logit_probs.sum()) >= 0.95


def test_the_error_nodes_hold_what_the_transcoder_misses(model, tc, graph):
    """Error nodes make each MLP output exact: the real output minus the graph's decoder writes, b_dec
    and the skip path is each error node's vector (its norm is stored as the node's value)."""
    from workbench.cache.collect import run_collect
    _, acts = run_collect(model, torch.tensor([graph.tokens]), [output_hook(0), input_hook(0)])
    x0 = acts[input_hook(0)][0]
    writes = tc.b_dec(0).expand_as(x0).clone()
    for n in (graph.features[:, 0] == 0).nonzero().flatten().tolist():
        _, p, f = graph.features[n].tolist()
        writes[p] += graph.activations[n] * tc.decoder(0)[f, 0]
    skip = tc.skip(0, x0)
    errors = acts[output_hook(0)][0] - writes - (skip if skip is not None else 0)
    recon_norm = torch.stack([errors[p].norm() for p in range(graph.n_pos)])
    assert torch.allclose(recon_norm, graph.values[graph.n_features: graph.n_features + graph.n_pos], atol=1e-4)


def test_pruning_keeps_tokens_and_logits_and_no_edge_to_a_pruned_node(graph):
    for node_t, edge_t in ((0.8, 0.98), (0.3, 0.5), (0.0, 0.0), (1.0, 1.0)):
        p = prune(graph, node_t, edge_t)
        first_token = graph.n_features + graph.n_errors
        assert p.node_mask[first_token:].all()
        kept = p.node_mask
        assert not (p.edge_mask & ~(kept[:, None] & kept[None, :])).any()
        # every kept feature/error reaches a kept node
        inner = kept.clone()
        inner[first_token:] = False
        assert p.edge_mask[:, inner].any(0).all()
    small, large = prune(graph, 0.3, 0.5), prune(graph, 0.9, 0.99)
    assert small.node_mask.sum() <= large.node_mask.sum() and small.edge_mask.sum() <= large.edge_mask.sum()


def test_circuit_tracers_node_definitions_as_options(model, tc):
    """Each definition changes what it says and nothing else: the same features, the identities
    still exact, logits demeaned, tokens without their position embedding, position-0 errors gone
    into the biases, and sources counted in pruning and completeness."""
    bos = torch.tensor([[256] + list(PROMPT.encode())])  # circuit-tracer's prompts start with a BOS
    plain = build_graph(model, tc, bos, GraphConfig(), progress=False)
    ct = build_graph(model, tc, bos, GraphConfig.circuit_tracer_compatible(), progress=False)
    assert torch.equal(plain.features, ct.features) and torch.equal(plain.logit_tokens, ct.logit_tokens)
    rows = torch.cat([torch.arange(ct.n_features), torch.arange(ct.n_nodes - ct.n_logits, ct.n_nodes)])
    assert torch.allclose(ct.adjacency[rows].sum(1) + ct.bias[rows], ct.values[rows], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        logits = model(bos)[0, -1]
    assert torch.allclose(ct.values[-ct.n_logits:], logits[ct.logit_tokens] - logits.mean(), atol=1e-5)
    tok = slice(ct.n_features + ct.n_errors, ct.n_features + ct.n_errors + ct.n_pos)
    assert torch.allclose(ct.values[tok], model.W_E[bos[0]].norm(dim=-1), atol=1e-5)
    assert not torch.allclose(plain.values[tok], ct.values[tok])  # the plain nodes hold the position too
    first_errors = [ct.n_features + l * ct.n_pos for l in range(ct.n_layers)]
    assert ct.adjacency[:, first_errors].abs().max() == 0 and plain.adjacency[:, first_errors].abs().max() > 0
    # the feature-to-feature edges do not depend on any of these definitions
    nf = ct.n_features
    assert torch.allclose(ct.adjacency[:nf, :nf], plain.adjacency[:nf, :nf], atol=1e-5)
    # counting sources: tokens take a share of the node threshold, so no more features are needed
    assert (prune(ct).node_mask & ~prune(ct, count_sources=False).node_mask)[:nf].sum() == 0
    An, w = normalized(ct.adjacency), ct.logit_weights()
    infl = influence(An, w)
    errors = slice(nf, nf + ct.n_errors)
    expected = float(((1 - An[:, errors].sum(1)) * (infl + w)).sum() / (infl + w).sum())
    assert graph_scores(ct)["completeness_score"] == pytest.approx(expected, rel=1e-5)
    assert graph_scores(ct, count_sources=False)["completeness_score"] != pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="logit_nodes"):
        GraphConfig(logit_nodes="centred")


def test_influence_counts_every_path_and_scores_are_shares(graph):
    An = normalized(graph.adjacency)
    w = graph.logit_weights()
    infl = influence(An, w)
    series, cur = torch.zeros_like(w), w.clone()
    for _ in range(graph.n_layers + 3):  # the graph's depth: tokens, L layers, logits
        cur = cur @ An
        series += cur
    assert torch.allclose(infl, series, atol=1e-6)
    # all influence ends at sources (tokens and errors): their share sums to the logits' total weight
    sources = slice(graph.n_features, graph.n_features + graph.n_errors + graph.n_pos)
    assert float(infl[sources].sum()) == pytest.approx(float(w.sum()), rel=1e-4)
    scores = graph_scores(graph)
    pruned = graph_scores(graph, prune(graph))
    for s in (scores, pruned):
        assert 0 <= s["replacement_score"] <= 1 and 0 <= s["completeness_score"] <= 1
    assert pruned["replacement_score"] <= scores["replacement_score"] + 1e-6


def test_interventions_reach_the_model_and_scale_one_changes_nothing(model, tc, graph):
    node = int(prune(graph).node_influence[: graph.n_features].argmax())  # one that reaches the logits
    same = intervene(model, tc, graph, [node], 1.0)
    assert max(map(abs, same["actual"] + same["predicted_direct"] + same["predicted_graph"])) < 1e-5
    ablated = intervene(model, tc, graph, [node], 0.0)
    assert max(map(abs, ablated["actual"])) > 0
    with pytest.raises(InputError, match="not feature nodes"):
        intervene(model, tc, graph, [graph.n_nodes - 1], 0.0)


def test_a_graph_file_round_trips_and_refuses_another_model(model, graph, tmp_path):
    save_graph(graph, tmp_path / "g")
    back = load_graph(tmp_path / "g", model)
    assert torch.equal(back.adjacency, graph.adjacency) and back.tokens == graph.tokens
    assert json.loads((tmp_path / "g" / "graph.json").read_text())["kind"] == "workbench.AttributionGraph"
    other = _model(seed=1)
    with pytest.raises(InputError, match="does not match this model"):
        load_graph(tmp_path / "g", other)
    with pytest.raises(InputError, match="layers"):
        load_graph(tmp_path / "g", _model(n_layers=3))
    (tmp_path / "g" / "graph.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="damaged"):
        load_graph(tmp_path / "g")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not"):
        save_graph(graph, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_bad_input_gets_a_clear_error(model, tc):
    with pytest.raises(InputError, match="longer than the model's context"):
        build_graph(model, tc, "x" * 40, progress=False)
    for bad in (-0.1, 1.5):
        with pytest.raises(InputError, match=r"in \[0, 1\]"):
            prune(build_graph(model, tc, PROMPT, progress=False), bad, 0.9)
    attn_only = Transformer(tiny_config(), tokenizer=TextCodec(byte_tokenizer())).eval()
    with pytest.raises(InputError, match="attention-only.*sae"):
        make_transcoders(attn_only, 32)
    wide = _model(d_model=48, d_head=12)
    with pytest.raises(InputError, match="trained on another model"):
        build_graph(wide, tc, PROMPT, progress=False)
    if tc.per_layer is not None:
        with pytest.raises(InputError, match="trained for another layer"):
            Transcoders("x", 2, per_layer={0: tc.per_layer[1], 1: tc.per_layer[1]})
        sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name=output_hook(0)))
        with pytest.raises(InputError, match="or is an SAE"):
            Transcoders("x", 2, per_layer={0: sae, 1: tc.per_layer[1]})


def test_a_model_where_freezing_does_not_take_effect_is_refused(model, tc, monkeypatch):
    """If the pattern edit were ignored, the frozen model would not be linear: the identity check must
    catch it rather than return a wrong graph."""
    import workbench.model.transformer as wm
    real = wm.Attention.forward

    def ignores_pattern_edits(self, x, kv=None):
        hooks = self.hook_pattern.fwd_hooks
        self.hook_pattern.fwd_hooks = []
        try:
            out = real(self, x, kv)
        finally:
            self.hook_pattern.fwd_hooks = hooks
        return out

    monkeypatch.setattr(wm.Attention, "forward", ignores_pattern_edits)
    with pytest.raises(DoesNotApplyError):
        build_graph(model, tc, PROMPT, progress=False)


def test_transcoder_sets_round_trip(model, tc, tmp_path):
    tc.save(tmp_path / "set")
    with pytest.raises(InputError, match="not empty"):
        tc.save(tmp_path / "set")  # never over a folder that holds anything
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # built beside it and renamed: no temporary left
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "set").rglob("*") if p.is_file()}
    assert len(modes) == 1, modes  # the weights as readable as the JSON beside them
    back = load_transcoders(tmp_path / "set")
    x = torch.randn(2, 5, 32)
    for a, b in zip(tc.reconstruct([x, x]), back.reconstruct([x, x])):
        assert torch.allclose(a, b, atol=1e-6)
    if tc.per_layer is None or tc.per_layer[0].cfg.arch == "topk":  # circuit-tracer cannot represent these
        with pytest.raises(InputError, match="cross-layer|TopK"):
            export_circuit_tracer(tc, tmp_path / "ct")
        assert not (tmp_path / "ct").exists()
        return
    export_circuit_tracer(tc, tmp_path / "ct")
    ct = load_circuit_tracer(tmp_path / "ct")
    for a, b in zip(tc.reconstruct([x, x]), ct.reconstruct([x, x])):
        assert torch.allclose(a, b, atol=1e-6)
    g1, g2 = build_graph(model, tc, PROMPT, progress=False), build_graph(model, ct, PROMPT, progress=False)
    assert torch.allclose(g1.adjacency, g2.adjacency, atol=1e-5)


def test_a_transcoder_folds_its_input_and_output_scales():
    cfg = SAEConfig(d_in=16, d_sae=40, architecture="topk", k=4, hook_name=input_hook(0), target_hook=output_hook(0),
                    skip=True)
    t = make_sae(cfg, seed=0)
    with torch.no_grad():
        t.W_skip.normal_()
        t.b_dec.normal_()
    x = torch.randn(8, 16)
    before = t(x * 3.0) / 0.5  # trained on x·3 to predict y·0.5
    features = t.encode(x * 3.0)
    t.fold_scale(3.0, 0.5)
    assert torch.allclose(t(x), before, atol=1e-4)
    assert torch.allclose(t.encode(x), features, atol=1e-5)  # the same features fire, as strongly


def test_a_transcoder_saves_in_the_saelens_layout_and_loads_back(tmp_path):
    cfg = SAEConfig(d_in=16, d_sae=40, architecture="jumprelu", hook_name=input_hook(1), target_hook=output_hook(1),
                    skip=True)
    t = make_sae(cfg, seed=0)
    with torch.no_grad():
        t.b_dec.normal_()
        t.W_skip.normal_()
    save_sae(t, tmp_path / "t")
    saved = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert saved["apply_b_dec_to_input"] is False and saved["hook_name_out"] == output_hook(1)
    back = load_sae(tmp_path / "t")
    x = torch.randn(4, 16)
    assert back.cfg.target_hook == output_hook(1) and torch.allclose(back(x), t.eval()(x), atol=1e-6)


def test_transcoder_quality_is_measured_against_ablation(model, tc):
    rows = torch.randint(0, 257, (8, 32), generator=torch.Generator().manual_seed(3))
    q = evaluate_transcoders(model, tc, rows)
    assert len(q["layers"]) == 2 and all(0 <= x["fvu"] for x in q["layers"])
    assert q["with_errors_max_loss_change"] < 1e-5  # the error terms make the replacement exact
    assert q["ce"]["zero_ablated"] != q["ce"]["clean"]


def test_a_graph_file_that_is_newer_incomplete_or_inconsistent_is_refused(graph, tmp_path):
    from safetensors.torch import load_file, save_file

    save_graph(graph, tmp_path / "g")
    meta_path, tensor_path = tmp_path / "g" / "graph.json", tmp_path / "g" / "graph.safetensors"
    meta, tensors = json.loads(meta_path.read_text()), load_file(str(tensor_path))
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="upgrade the workbench"):
        load_graph(tmp_path / "g")
    meta_path.write_text(json.dumps(meta))
    save_file({k: v for k, v in tensors.items() if k != "bias"}, str(tensor_path))
    with pytest.raises(CheckpointError, match="lacks bias"):
        load_graph(tmp_path / "g")
    if "adjacency_index" in tensors:  # the sparse form: indices and values must pair up
        save_file({**tensors, "adjacency_values": tensors["adjacency_values"][:-1].contiguous()}, str(tensor_path))
        with pytest.raises(CheckpointError, match="edge list does not fit"):
            load_graph(tmp_path / "g")
