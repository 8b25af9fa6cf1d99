"""Tiny random-weight Hugging Face models of the families people study, saved with
`save_pretrained` (no download). Norm weights and biases are moved away from their init values, so
that every fold and every bias is really exercised.

    build_family("qwen2", folder)      # writes config.json, model.safetensors and a fast tokenizer
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma2", "opt", "gptj", "phi", "bloom")
VOCAB, N_CTX, D_MODEL, N_HEADS, N_LAYERS, D_MLP = 300, 128, 32, 4, 2, 64


def hf_config(family: str):
    """A small `transformers` config of the family: 2 layers, d_model 32, 4 heads (2 KV heads for GQA)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    rms = dict(hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
               max_position_embeddings=N_CTX, **common)
    make = {
        "gpt2": lambda: tf.GPT2Config(n_layer=N_LAYERS, n_head=N_HEADS, n_embd=D_MODEL, n_positions=N_CTX, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                                             num_attention_heads=N_HEADS, max_position_embeddings=N_CTX,
                                             rotary_pct=0.25, use_parallel_residual=True, **common),
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=N_HEADS, **rms),
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **rms),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, **rms),
        "gemma": lambda: tf.GemmaConfig(num_key_value_heads=N_HEADS, head_dim=D_MODEL // N_HEADS,
                                        hidden_activation="gelu_pytorch_tanh", **rms),
        "gemma2": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=D_MODEL // N_HEADS, query_pre_attn_scalar=8,
                                          sliding_window=N_CTX, hidden_activation="gelu_pytorch_tanh", **rms),
        "opt": lambda: tf.OPTConfig(hidden_size=D_MODEL, ffn_dim=D_MLP, num_hidden_layers=N_LAYERS,
                                    num_attention_heads=N_HEADS, max_position_embeddings=N_CTX,
                                    word_embed_proj_dim=D_MODEL, **common),
        "gptj": lambda: tf.GPTJConfig(n_layer=N_LAYERS, n_head=N_HEADS, n_embd=D_MODEL, n_positions=N_CTX,
                                      rotary_dim=4, n_inner=D_MLP, **common),
        "phi": lambda: tf.PhiConfig(hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                                    num_attention_heads=N_HEADS, max_position_embeddings=N_CTX,
                                    partial_rotary_factor=0.5, **common),
        "bloom": lambda: tf.BloomConfig(hidden_size=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, **common),
    }
    return make[family]()


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every 1-D parameter (norm scales and biases) away from its init value, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def save_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A small byte-level BPE with <|endoftext|> as BOS and EOS (the approach of tests/conftest.py's tiny_gpt2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["def main(): return the value of x"] * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)


def build_family(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight model of `family`, with perturbed norms and biases, to `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
    perturb_(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder
