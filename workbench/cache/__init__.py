"""The cache layer: run a model and keep the activations an analysis needs (`run_collect`), the
token rows it runs on (probe sequences, the model's own text), and activation streams and stores
for training dictionaries."""

from workbench.cache.activations import ActivationStore, TensorSource, model_activations, stream_activations
from workbench.cache.collect import layer_hooks, run_collect
from workbench.cache.rows import held_out_text, probe_tokens, text_probe_tokens, text_rows, training_text

__all__ = ["ActivationStore", "TensorSource", "held_out_text", "layer_hooks", "model_activations", "probe_tokens",
           "run_collect", "stream_activations", "text_probe_tokens", "text_rows", "training_text"]
