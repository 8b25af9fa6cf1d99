"""Tiny CPU models and isolated caches for the test suite. No network, no downloads."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
import torch
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from workbench.data.text import DataConfig
from workbench.data.tokenizer import TextCodec, byte_tokenizer
from workbench.model.transformer import ModelConfig, Transformer
from workbench.train.lm import TrainConfig
from workbench.train.modular import ModularConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub must fail fast
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "wb-cache"))


def tiny_config(**overrides) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=None, n_ctx=24, d_vocab=257, seed=0)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture
def attn_model() -> Transformer:
    return Transformer(tiny_config(), tokenizer=TextCodec(byte_tokenizer())).eval()


@pytest.fixture
def mlp_model() -> Transformer:
    return Transformer(tiny_config(d_mlp=64), tokenizer=TextCodec(byte_tokenizer())).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 257, (3, 20), generator=torch.Generator().manual_seed(0))


def tiny_train_config(**overrides) -> TrainConfig:
    """A run of a few seconds on synthetic data only (no corpus to read)."""
    base = dict(model=tiny_config(n_ctx=32), data=DataConfig(synthetic_fraction=1.0), batch_size=8,
                n_steps=20, warmup_steps=2, eval_every=5, log_every=2, n_checkpoints=5)
    return TrainConfig(**{**base, **overrides})


def tiny_modular_config(**overrides) -> ModularConfig:
    """A modular-addition run of about a second."""
    base = dict(p=11, d_model=32, n_heads=4, d_mlp=64, n_steps=30, warmup_steps=2, eval_every=5, n_checkpoints=5,
                first_checkpoint=2)
    return ModularConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 and a small byte-level BPE tokenizer, saved with
    `save_pretrained` to a temp folder: the Hugging Face path, with no download."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["def main(): return the value of x"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                         eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def signal_on_call(monkeypatch, owner, attr: str, call: int, after: bool = False, sig=signal.SIGINT) -> None:
    """Patch `owner.attr` so that its `call`-th call (1-based) sends `sig` to this process, before the real
    call or, with `after`, right after it returns: a Ctrl-C landing in a chosen phase of a step."""
    real, count = getattr(owner, attr), [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == call and not after:
            os.kill(os.getpid(), sig)
        out = real(*args, **kwargs)
        if count[0] == call and after:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(owner, attr, wrapped)


def assert_colorbars_titled(figs: dict) -> None:
    """Every colour scale shown in these figures has a title naming what it measures."""
    for name, fig in figs.items():
        for trace in getattr(fig, "data", ()):  # widgets have no plotly traces
            shown = trace.type == "heatmap" and trace.showscale is not False
            if trace.type == "bar" and trace.marker is not None and trace.marker.showscale:
                shown, trace = True, trace.marker
            if shown:
                title = trace.colorbar.title.text if trace.colorbar and trace.colorbar.title else None
                assert title, f"figure {name!r}: a colour bar with no title"


class NoAttention(HookedRootModule):
    """An embedding and an unembedding: a model with no attention layers."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(n_layers=1, n_heads=0, n_ctx=64, d_vocab=10)
        self.tokenizer = None
        self.embed = torch.nn.Embedding(10, 8)
        self.hook_embed = HookPoint()
        self.unembed = torch.nn.Linear(8, 10)
        self.setup()

    def forward(self, tokens):
        return self.unembed(self.hook_embed(self.embed(tokens)))
