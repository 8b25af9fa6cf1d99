"""The one model-facing layer: what every analysis asks of a model, answered the same way for the
workbench's own `Transformer` and for a `transformer_lens.TransformerBridge` around a Hugging Face
causal LM (GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Gemma, Gemma 2, OPT, GPT-J, Phi, BLOOM).

Shape letters as in workbench.model.transformer, plus G for key/value heads (G = H without grouped-query
attention) and C for components.

    arch = describe(model)              # norms, positions, GQA, parallel blocks, hooks that fire, ...
    w = folded_weights(model)           # per-head W_Q/W_K/W_V/W_O, KV heads expanded, norms folded
    hw = head_weights(model)            # the same unfolded, biases zero where the model has none
    run_with_knockout(model, tokens, {layer: blocked_BST})   # attention knockout that takes effect
    random_control(model, seed)         # same architecture, re-initialised by its own init

`describe` reads the config and then runs the model once on a few tokens, so that nothing below is
assumed. It records which hooks fire (a bridge registers `hook_pos_embed` for a rotary model but
never fires it), and checks five things on that run:

    fold          the folded W_Q, W_K, W_V reproduce hook_q/k/v, and the folded unembedding the logits
    embedding     the effective embedding (with Gemma's √d scale or BLOOM's embedding LayerNorm)
                  plus W_pos reproduces blocks.0.hook_resid_pre
    residual      the last residual stream is the embedding plus every attention and MLP output, and
                  each attention output is its heads' z W_O (through Gemma 2's post-norm) plus bias
    z edits       an edit at hook_z reaches the attention output (head ablation works)
    qkv edits     edits at hook_q, hook_k and hook_v change the heads' z (path patching works)
    knockout      which edit blocks attention: -inf at hook_attn_scores where that takes effect; on
                  OPT and GPT-J bridges the pattern is only reported after the fact, so there z is
                  recomputed from the reported pattern and values, once that identity is verified

Whatever fails is kept as a problem, and an analysis that needs it gets `DoesNotApplyError`: one
line naming the architecture and the missing piece. No analysis reports a number that rests on an
unverified fold or edit.

The package, lowest module first (each imports only those before it):

    architecture  Architecture, DoesNotApplyError: what a model is
    folding       the arithmetic of norms, weights and the heads' writes, for a given Architecture
    knockout      the knockout edit by a named method
    probe         describe: the config read, the run, and the checks above, in named steps
    weights       norm scales, head weights, embeddings, the unembedding and the verified fold
    decompose     the residual stream in parts, from cached activations
    edits         run_with_knockout with the verified method, random_control
    sites         require_edit: an edit at a hook point is seen to change the logits, or a refusal

and beside them, reading no Architecture: `provenance` (a model's name, training log, checkpoints and
validation rows, as its folder records them) and `tokens` (readable token strings).
"""

from __future__ import annotations

from workbench.adapter.architecture import Architecture, DoesNotApplyError, KnockoutMethod, NormKind, Piece, Positional
from workbench.adapter.decompose import (
    apply_final_norm,
    attn_bias_output,
    final_norm_hooks,
    head_output_hooks,
    head_outputs,
    head_write_change,
    uncap_logits,
)
from workbench.adapter.edits import random_control, run_with_knockout
from workbench.adapter.folding import FoldedWeights, HeadWeights, norm_bias, normalize
from workbench.adapter.probe import describe
from workbench.adapter.provenance import (
    Checkpoint,
    checkpoints,
    comparable_name,
    model_label,
    model_name_of,
    run_folder,
    tokens_seen,
    training_data,
    training_log,
    validation_rows,
)
from workbench.adapter.sites import require_edit, require_hook
from workbench.adapter.tokens import token_strings
from workbench.adapter.weights import (
    effective_embedding_std,
    embedding_matrix,
    folded_weights,
    head_weights,
    norm_scale,
    positional_matrix,
    unembed,
)

__all__ = ["Architecture", "Checkpoint", "DoesNotApplyError", "FoldedWeights", "HeadWeights", "KnockoutMethod",
           "NormKind", "Piece", "Positional", "apply_final_norm", "attn_bias_output", "checkpoints",
           "comparable_name", "describe", "effective_embedding_std", "embedding_matrix", "final_norm_hooks",
           "folded_weights", "head_output_hooks", "head_outputs", "head_weights", "head_write_change", "model_label",
           "model_name_of", "norm_bias", "norm_scale", "normalize", "positional_matrix", "random_control",
           "require_edit", "require_hook", "run_folder", "run_with_knockout", "token_strings", "tokens_seen",
           "training_data", "training_log", "uncap_logits", "unembed", "validation_rows"]
