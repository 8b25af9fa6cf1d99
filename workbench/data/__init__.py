"""The data layer: text sources and the token pipeline, tokenizers, and the facts knowledge base.
Nothing here knows of models, activations or reports."""

from workbench.data.facts import Fact, KnowledgeBase
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

__all__ = ["Batches", "DataConfig", "Fact", "KnowledgeBase", "TextCodec", "TextData", "build_text_data",
           "build_tokenizer", "load_text", "load_tokenizer", "readable_tokens", "repeated_sequence", "save_tokenizer"]
