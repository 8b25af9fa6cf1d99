"""What an analysis may ask of a model: `HookedModel`, the type that travels from the model layer to
the adapter, the activation cache and the compute functions.

Both kinds of model the workbench runs satisfy it: its own `Transformer` (a TransformerLens
`HookedRootModule`) and TransformerLens's `TransformerBridge` around a Hugging Face model
(tests/families checks both). Anything a step needs beyond these members (folded weights, norm
scales, the model's name, its training log) it asks of the adapter (`workbench.adapter`), which
answers the same way for every architecture or refuses with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelShape(Protocol):
    """The sizes every analysis reads from `model.cfg` (TransformerLens's config names)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int


@runtime_checkable
class HookedModel(Protocol):
    """A model with TransformerLens hook points: its config, tokenizer (or None), hooks by name, and
    forward passes with hooks attached (`run_with_hooks`), cached (`run_with_cache`) or scoped
    (`hooks`, a context manager that always removes them)."""

    cfg: Any
    """A `ModelShape` at least (TransformerLens's config, or the workbench's `ModelConfig`)."""
    tokenizer: Optional[Any]
    hook_dict: dict[str, Any]

    def __call__(self, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...
