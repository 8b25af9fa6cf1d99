"""`workbench.load`: shipped presets, model folders, checkpoints, and Hugging Face models.

    load("attn-only-2l")                 # a preset in models/, from any working folder
    load("runs/my-run")                  # a model or run folder
    load("attn-only-2l", checkpoint=64)  # the intermediate checkpoint at step 64
    load("hf:gpt2") / load("hf:/path")   # a transformer_lens.TransformerBridge
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from workbench.artifacts import (
    TOKENIZER_FILE,
    list_checkpoints,
    load_folder,
    read_weights,
    register_kind,
    write_model_folder,
)
from workbench.data.text import require_hub
from workbench.data.tokenizer import TextCodec, load_tokenizer
from workbench.errors import CheckpointError, InputError, unknown_name_message
from workbench.model.transformer import ModelConfig, Transformer

TRANSFORMER_KIND = "workbench.Transformer"


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto.")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"Unknown device {device!r}; use auto, cpu or cuda.")
    return torch.device(device)


def models_dir() -> Path:
    """The folder of presets and shipped models ($WORKBENCH_MODELS, default <repo>/models)."""
    env = os.environ.get("WORKBENCH_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models"


def preset_names() -> list[str]:
    """Names of the presets in models/ (a <name>.json training config)."""
    return sorted(p.stem for p in models_dir().glob("*.json"))


def shipped_models() -> list[str]:
    """Presets that are shipped trained (models/<name>/config.json exists)."""
    return [n for n in preset_names() if (models_dir() / n / "config.json").exists()]


def resolve_model_path(name_or_path: Union[str, Path]) -> Path:
    """A folder path as given, or the shipped folder of a preset name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    shipped = models_dir() / str(name_or_path)
    if shipped.is_dir():
        return shipped
    if str(name_or_path) in preset_names():
        raise CheckpointError(f"Preset {str(name_or_path)!r} is not trained yet (no {shipped}); run "
                              f"`workbench train {name_or_path} --out {shipped}`.")
    if not preset_names():
        raise CheckpointError(f"No model folder or preset named {str(name_or_path)!r}, and no presets were found "
                              f"in {models_dir()}.")
    message = unknown_name_message("model folder or preset", str(name_or_path), preset_names(),
                                   listed_by="`workbench list`")
    raise CheckpointError(f"{message} A folder path or hf:<name> also works.")


def save_model(model: Transformer, folder: Path, meta: Optional[dict[str, Any]] = None) -> None:
    """Write a model folder: weights, tokenizer (if any) and config.json."""
    tok_json = model.tokenizer.tok.to_str() if model.tokenizer is not None else None
    write_model_folder(Path(folder), TRANSFORMER_KIND, model.state_dict(),
                       {"model": model.cfg.to_dict(), **(meta or {})}, tok_json)


@register_kind(TRANSFORMER_KIND)
def _load_transformer(folder: Path, meta: dict[str, Any], device: torch.device) -> Transformer:
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json has no valid 'model' section ({err}).") from err
    tok_path = folder / TOKENIZER_FILE
    tokenizer = TextCodec(load_tokenizer(tok_path)) if tok_path.exists() else None
    model = Transformer(cfg, tokenizer=tokenizer)
    weights = read_weights(folder, meta)
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not match the config (missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]}).")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{folder}: weight shapes do not match the config ({err}).") from err
    model.folder = folder
    model.meta = meta
    return model.to(device).eval()


def load(name_or_path: Union[str, Path], device: Union[str, torch.device] = "auto",
         checkpoint: Optional[int] = None) -> Any:
    """A trained model: a preset name, a folder, `checkpoint=<step>` of a run, or 'hf:<name or path>'."""
    dev = resolve_device(device)
    if isinstance(name_or_path, str) and name_or_path.startswith("hf:"):
        return load_hf(name_or_path[3:], dev)
    folder = resolve_model_path(name_or_path)
    if checkpoint is not None:
        steps = dict(list_checkpoints(folder))
        if checkpoint not in steps:
            raise CheckpointError(f"{folder} has no checkpoint at step {checkpoint}; it has {sorted(steps)}.")
        folder = steps[checkpoint]
    return load_folder(folder, dev)


def load_hf(name: str, device: torch.device):
    """A Hugging Face causal LM wrapped as a transformer_lens.TransformerBridge."""
    from transformer_lens import TransformerBridge

    if not Path(name).expanduser().exists():
        require_hub(f"The Hugging Face model {name!r}")
    else:
        name = str(Path(name).expanduser().resolve())
        if Path(name).is_dir():
            check_hf_folder(Path(name))
    return TransformerBridge.boot_transformers(name, device=device)


def check_hf_folder(folder: Path) -> None:
    """Refuse a Hugging Face model folder that only loads by running its own code (config.json's
    `auto_map` for a `model_type` transformers does not implement) or by unpickling its weights."""
    from transformers import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: no readable config.json ({err}); a Hugging Face model folder has one, "
                              "as save_pretrained writes it.") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if auto_map and model_type not in CONFIG_MAPPING:
        code = ", ".join(sorted({str(v) for v in auto_map.values()} if isinstance(auto_map, dict) else {str(auto_map)}))
        raise CheckpointError(f"{folder}: config.json's auto_map points at the folder's own Python code ({code}) for "
                              f"model_type {model_type!r}, which transformers does not implement. The workbench never "
                              "runs code from a model folder (trust_remote_code); use a checkpoint of an architecture "
                              "transformers implements itself (GPT-2, Llama, Mistral, Qwen2, Gemma, ...).")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise CheckpointError(f"{folder} holds its weights only as {', '.join(pickled[:3])}, a pickle, and "
                                  "unpickling can run code, so the workbench loads safetensors only. If you trust the "
                                  "file, convert it once (transformers: AutoModelForCausalLM.from_pretrained(folder)"
                                  ".save_pretrained(new_folder)) and load the new folder.")
        raise CheckpointError(f"{folder} holds no weights: a Hugging Face model folder has model.safetensors (or its "
                              "shards), as save_pretrained writes them.")
