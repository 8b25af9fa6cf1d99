"""The model layer: the hookable `Transformer` (TransformerLens hook names and weight shapes), the
superposition toy models, loading shipped, local and Hugging Face models, `HookedModel`, the type
of a model as the layers above see it, and the modular-addition model's answer logits."""

from workbench.model.hooked import HookedModel, ModelShape
from workbench.model.loading import load, load_hf, models_dir, resolve_device, save_model, shipped_models
from workbench.model.modular import answer_logits, answer_logits_fast, is_modular_model
from workbench.model.toy_models import ToyConfig, ToyModel, train_toy
from workbench.model.transformer import ModelConfig, Transformer, lm_loss

__all__ = ["HookedModel", "ModelConfig", "ModelShape", "ToyConfig", "ToyModel", "Transformer", "answer_logits",
           "answer_logits_fast", "is_modular_model", "load", "load_hf", "lm_loss", "models_dir", "resolve_device",
           "save_model", "shipped_models", "train_toy"]
