"""Transcoders: sparse, wide MLPs that imitate a model's MLPs, for circuit tracing.

A transcoder reads an MLP's input and predicts its output (Dunefsky et al. 2024; Paulo et al.,
"Transcoders Beat Sparse Autoencoders", 2025). It is one more kind of dictionary, trained by the
SAE trainer (`workbench.sae.training`):

    per-layer        an `SAE` whose config has `target_hook`: it reads blocks.l.ln2.hook_normalized
                     and predicts blocks.l.hook_mlp_out; any SAE architecture (TopK with AuxK,
                     ReLU + L1, JumpReLU, BatchTopK), with an optional linear skip x W_skip
    cross-layer      `CrossLayerTranscoder`: features read at layer l and write to the MLP outputs
                     of layers l..L-1, all layers trained jointly (Ameisen et al., "Circuit Tracing",
                     2025); TopK (k per layer, with AuxK), ReLU + L1 or JumpReLU

`Transcoders` puts either behind the one interface the attribution graph uses (`encode(l, x)`,
`decoder(l)`, `b_dec(l)`, `skip(l, x)`), and saves and loads a set:

    folder/transcoders.json             kind, model, layers, hooks, and where each layer lives
    folder/layer_<l>/cfg.json + sae_weights.safetensors    (per-layer: SAELens layout, as SAEs)
    folder/clt/cfg.json + sae_weights.safetensors          (cross-layer)

The package, by job:

    hooks          each MLP's input and output hooks
    cross_layer    `CrossLayerTranscoder`, its files and training batches
    replacement    `Transcoders` (either kind behind one interface), `load_transcoders`, the set's files
    training       `make_transcoders`, `check_memory`, `train_transcoders`
    evaluation     `evaluate_transcoders`: FVU, L0 and CE loss recovered with the MLPs replaced

Its modules import one another, never this `__init__`, which re-exports their public names.
`workbench.sae.circuit_tracer_format` writes per-layer sets in the files the `circuit-tracer`
package loads, and reads its files back.
"""

from workbench.sae.transcoders.cross_layer import CLT_INPUT, CLT_TARGET, CrossLayerTranscoder, clt_batches
from workbench.sae.transcoders.evaluation import evaluate_transcoders
from workbench.sae.transcoders.hooks import input_hook, mlp_input_hooks, mlp_layers, output_hook, per_token
from workbench.sae.transcoders.replacement import Transcoders, load_transcoders
from workbench.sae.transcoders.training import as_transcoders, check_memory, make_transcoders, train_transcoders

__all__ = ["CLT_INPUT", "CLT_TARGET", "CrossLayerTranscoder", "Transcoders", "as_transcoders", "check_memory",
           "clt_batches", "evaluate_transcoders", "input_hook", "load_transcoders", "make_transcoders",
           "mlp_input_hooks", "mlp_layers", "output_hook", "per_token", "train_transcoders"]
