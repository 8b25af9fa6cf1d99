"""The one reader of a model's token strings: what a person sees for each token id, in figures,
viewers, dashboards and graphs.

    token_strings(model, ids)   one readable string per id (escaped control characters and bytes);
                                the id itself, as text, for a model without a tokenizer
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch

from workbench.data.tokenizer import readable_tokens
from workbench.model.hooked import HookedModel


def token_strings(model: HookedModel, ids: Union[torch.Tensor, Sequence[int]]) -> list[str]:
    """Each id of the 1-d `ids` as a one-line string a person can read (`readable_tokens`), or as its
    number when the model has no tokenizer (a toy trained on token ids)."""
    flat = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
    if getattr(model, "tokenizer", None) is None:
        return [str(int(i)) for i in flat]
    return readable_tokens(model.tokenizer, flat)
