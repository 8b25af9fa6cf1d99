"""The cache layer: run a model and keep the activations an analysis needs (`run_collect`), the
token rows it runs on (probe sequences, the model's own text), activation streams and stores
for training dictionaries, and the activations linear probes are fitted on (`probe_activations`)."""

from workbench.cache.activations import ActivationStore, TensorSource, model_activations, stream_activations
from workbench.cache.collect import layer_hooks, run_collect
from workbench.cache.probing import ProbeActivations, PromptSplit, probe_activations, split_prompts
from workbench.cache.rows import held_out_text, probe_tokens, text_probe_tokens, text_rows, training_text

__all__ = ["ActivationStore", "ProbeActivations", "PromptSplit", "TensorSource", "held_out_text", "layer_hooks",
           "model_activations", "probe_activations", "probe_tokens", "run_collect", "split_prompts",
           "stream_activations", "text_probe_tokens", "text_rows", "training_text"]
