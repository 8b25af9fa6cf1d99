"""The data layer: text sources and the token pipeline, tokenizers, the facts knowledge base, and the
modular-arithmetic task. Nothing here knows of models, activations or reports."""

from workbench.data.facts import Fact, KnowledgeBase
from workbench.data.modular import ModularData, is_prime, modular_data, modular_tokenizer
from workbench.data.text import (
           Batches,
           DataConfig,
           TextData,
           build_text_data,
           build_tokenizer,
           load_text,
           repeated_sequence,
)
from workbench.data.tokenizer import TextCodec, load_tokenizer, readable_tokens, save_tokenizer

__all__ = ["Batches", "DataConfig", "Fact", "KnowledgeBase", "ModularData", "TextCodec", "TextData", "build_text_data",
           "build_tokenizer", "is_prime", "load_text", "load_tokenizer", "modular_data", "modular_tokenizer",
           "readable_tokens", "repeated_sequence", "save_tokenizer"]
