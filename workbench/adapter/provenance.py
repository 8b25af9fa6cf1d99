"""The one reader of what a model's folder records about where the model came from, so that a study
learns it by asking, without opening model files: its name, its training log, its training
checkpoints and the validation rows it was evaluated on.

    model_name_of(model)              'gelu-2l' (its folder), 'gpt2' (hf:openai-community/gpt2), or ''
    model_label(model)                that name, else the model's type: the name a study shows
    run_folder(model)                 (its model folder, '') or (None, why it has none)
    training_log(model)               (log.jsonl's records, '') or ([], why there are none)
    checkpoints(model)                (its checkpoints oldest first, '') or ([], why there are none);
                                      each loads lazily with `Checkpoint.load(device)`
    tokens_seen(model)                training tokens behind its weights, as its folder records them
    validation_rows(model, n_rows)    (rows [N, n_ctx], what they are) or (None, why there are none)

Every reader answers with a value or with nothing and the reason for it (a model built in memory, a
TransformerBridge around a Hugging Face model, a folder without a log or checkpoints), never with a
number guessed from a neighbouring fact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from workbench.artifacts import CONFIG_FILE, LOG_FILE, list_checkpoints, load_folder, read_log
from workbench.config import from_dict
from workbench.data.text import Batches, DataConfig, build_text_data
from workbench.model.hooked import HookedModel


# -- the model's name ------------------------------------------------------------------------------------
def model_name_of(model: HookedModel) -> str:
    """The model's name, as transcoder sets and graphs record it: its folder's name (a shipped or trained
    model: 'gelu-2l'), else the last part of its config's model_name (a Hugging Face model: 'gpt2' for
    hf:gpt2, hf:openai-community/gpt2 or hf:/path/to/gpt2); '' for a model with neither."""
    folder = getattr(model, "folder", None)
    if folder is not None:
        return Path(folder).name
    return comparable_name(str(getattr(model.cfg, "model_name", "") or ""))


def comparable_name(name: str) -> str:
    """A recorded model name as `model_name_of` spells it: the last part of a path or hub name, without
    an 'hf:' prefix (or 'hf_', as `workbench transcoder train` once wrote it: 'hf_gpt2')."""
    name = name.strip().replace("\\", "/").rstrip("/")
    for prefix in ("hf:", "hf_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.rsplit("/", 1)[-1]


def model_label(model: HookedModel) -> str:
    """The name a study shows for the model: `model_name_of`, else its type's name ('Transformer' for
    one built in memory)."""
    return model_name_of(model) or type(model).__name__


# -- its folder and what the folder records ----------------------------------------------------------------
def run_folder(model: HookedModel) -> tuple[Optional[Path], str]:
    """(the workbench model folder the model was loaded from, ''), or (None, why it has none)."""
    folder = getattr(model, "folder", None)
    if folder is not None:
        return Path(folder), ""
    return None, (f"this {type(model).__name__} was not loaded from a workbench model folder (a Hugging Face "
                  "model and one built in memory have none), so nothing about its training is recorded")


def training_log(model: HookedModel) -> tuple[list[dict[str, Any]], str]:
    """(the records of the model folder's training log, log.jsonl, oldest first; ''), or ([], why there
    are none). Each record is one logged step: {'step': ..., 'train_loss': ..., ...} as the trainer
    wrote it. A corrupt line other than a half-written last one is a CheckpointError."""
    folder, why = run_folder(model)
    if folder is None:
        return [], why
    path = folder / LOG_FILE
    if not path.exists():
        return [], f"{folder} has no training log ({LOG_FILE})"
    rows = read_log(path)
    return (rows, "") if rows else ([], f"{path} holds no records")


@dataclass(frozen=True)
class Checkpoint:
    """One training checkpoint of a run: its step and folder; `load` reads its weights."""

    step: int
    folder: Path

    def load(self, device: torch.device) -> Any:
        """The model at this checkpoint, loaded as its folder says (`workbench.artifacts.load_folder`)."""
        return load_folder(self.folder, device)


def checkpoints(model: HookedModel) -> tuple[list[Checkpoint], str]:
    """(the complete training checkpoints under the model folder's checkpoints/, oldest first; ''), or
    ([], why there are none). Nothing is loaded until `Checkpoint.load` is called."""
    folder, why = run_folder(model)
    if folder is None:
        return [], why
    found = [Checkpoint(step, path) for step, path in list_checkpoints(folder)]
    return (found, "") if found else ([], f"{folder} has no training checkpoints under checkpoints/")


def tokens_seen(model: HookedModel) -> Optional[int]:
    """Training tokens behind the model's weights, as its folder's config records them (None when it
    does not: a model from elsewhere, or one trained on a task counted in steps)."""
    seen = (getattr(model, "meta", None) or {}).get("tokens_seen")
    return None if seen is None else int(seen)


# -- the data it was trained and evaluated on --------------------------------------------------------------
def training_data(model: HookedModel) -> tuple[Optional[DataConfig], str]:
    """(the DataConfig the model was trained on, as its folder's config records it; ''), or (None, why
    there is none). An unreadable record is a ConfigError naming the file."""
    folder, why = run_folder(model)
    if folder is None:
        return None, why
    train = (getattr(model, "meta", None) or {}).get("train")
    if not train or "data" not in train:
        return None, "no training data recorded in the model folder"
    return from_dict(DataConfig, train["data"], f"{folder / CONFIG_FILE}:train.data"), ""


def validation_rows(model: HookedModel, n_rows: int) -> tuple[Optional[torch.Tensor], str]:
    """The validation rows [<= n_rows, n_ctx] the trainer evaluated the model on, on the CPU, rebuilt
    from the data config its folder records: (its text validation rows, 'text validation rows') when it
    trained on text, else (its synthetic ones, 'synthetic validation rows'); (None, why) when its
    folder records no training data, or the rows need a tokenizer the model lacks."""
    data_cfg, why = training_data(model)
    if data_cfg is None:
        return None, why
    n_ctx = int(model.cfg.n_ctx)
    text = None
    if data_cfg.uses_text:
        tok = getattr(getattr(model, "tokenizer", None), "tok", None)
        if tok is None:
            return None, "the model has no tokenizer to rebuild the text it was trained on"
        text = build_text_data(data_cfg, n_ctx, tok)
    val = Batches(data_cfg, n_ctx, 1, text, min(int(model.cfg.d_vocab), 256)).validation(n_rows)
    kind = "text" if "text" in val else "synthetic"
    return val[kind], f"{kind} validation rows"
