"""`Transcoders`: every MLP of a model replaced, per layer or by one cross-layer transcoder, behind the
one interface the attribution graph uses (`encode(l, x)`, `decoder(l)`, `b_dec(l)`, `skip(l, x)`);
and a set's files:

    folder/transcoders.json             kind, model, layers, hooks, and where each layer lives
    folder/layer_<l>/cfg.json + sae_weights.safetensors    (per-layer: SAELens layout, as SAEs)
    folder/clt/cfg.json + sae_weights.safetensors          (cross-layer)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from workbench.adapter.provenance import comparable_name, model_name_of
from workbench.artifacts import TRANSCODERS_MANIFEST, atomic_write_json, open_modes
from workbench.errors import CheckpointError, InputError
from workbench.model.hooked import HookedModel
from workbench.sae.files import load_sae, save_sae
from workbench.sae.modules import SAE
from workbench.sae.transcoders.cross_layer import CrossLayerTranscoder, read_json
from workbench.sae.transcoders.hooks import input_hook, mlp_input_hooks, mlp_layers, output_hook


@dataclass

class Transcoders:
    """Every MLP of a model replaced: per-layer transcoders (`per_layer[l]`) or one cross-layer
    transcoder (`clt`). The attribution graph reads them only through the methods below."""

    model_name: str
    n_layers: int
    per_layer: Optional[dict[int, SAE]] = None
    clt: Optional[CrossLayerTranscoder] = None

    def __post_init__(self) -> None:
        if (self.per_layer is None) == (self.clt is None):
            raise InputError("Transcoders need either per_layer transcoders or one cross-layer transcoder.")
        if not isinstance(self.model_name, str):
            raise InputError(f"Transcoders.model_name must be text ('' if unknown), got {self.model_name!r}.")
        if isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int) or self.n_layers < 1:
            raise InputError(f"Transcoders.n_layers must be a positive integer, got {self.n_layers!r}.")
        if self.clt is not None and self.clt.n_layers != self.n_layers:
            raise InputError(f"The cross-layer transcoder spans {self.clt.n_layers} layers, not n_layers = "
                             f"{self.n_layers}.")
        if self.per_layer is not None:
            missing = sorted(set(range(self.n_layers)) - set(self.per_layer))
            if missing:
                raise InputError(f"Transcoders for layers {missing} are missing: a replacement model replaces every "
                                 f"MLP (layers 0–{self.n_layers - 1}).")
            extra = sorted(set(self.per_layer) - set(range(self.n_layers)), key=str)
            if extra:
                raise InputError(f"Transcoders are given for layers {extra}, but the model's layers are 0–"
                                 f"{self.n_layers - 1}.")
            for l, tc in self.per_layer.items():
                if tc.cfg.hook_name not in (input_hook(l), input_hook(l, True)) or tc.cfg.target_hook != output_hook(l):
                    raise InputError(f"The transcoder given for layer {l} reads {tc.cfg.hook_name!r} and predicts "
                                     f"{tc.cfg.target_hook!r}, not {input_hook(l)!r} → {output_hook(l)!r}: it was "
                                     "trained for another layer, or is an SAE.")

    def in_hook(self, layer: int) -> str:
        """The hook layer `layer`'s features read (its MLP's input)."""
        return self.clt.input_hooks[layer] if self.clt is not None else self.per_layer[layer].cfg.hook_name

    @property
    def kind(self) -> str:
        return "cross-layer" if self.clt is not None else "per-layer"

    @property
    def d_model(self) -> int:
        return self.clt.d_model if self.clt is not None else self.per_layer[0].d_in

    def width(self, layer: int) -> int:
        return self.clt.d_tc if self.clt is not None else self.per_layer[layer].d_sae

    @property
    def device(self) -> torch.device:
        return next(self.modules()[0].parameters()).device

    def modules(self) -> list[nn.Module]:
        return [self.clt] if self.clt is not None else [self.per_layer[l] for l in range(self.n_layers)]

    def to(self, device: Union[str, torch.device]) -> "Transcoders":
        for m in self.modules():
            m.to(device)
        return self

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., F] of layer `layer` from its MLP input."""
        if self.clt is not None:
            return self.clt.encode_layer(layer, x)
        return self.per_layer[layer].encode(x)

    def pre_acts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., F]: linear in x (what attribution graph edges add up to)."""
        if self.clt is not None:
            return x @ self.clt.W_enc[layer] + self.clt.b_enc[layer]
        return self.per_layer[layer].pre_acts(x)

    def encoder(self, layer: int) -> torch.Tensor:
        """[d_model, F]: pre-activation = x · encoder + encoder bias."""
        return self.clt.W_enc[layer] if self.clt is not None else self.per_layer[layer].W_enc

    def decoder(self, layer: int) -> torch.Tensor:
        """[F, n_out, d_model]: what each feature of `layer` writes to the MLP outputs of layers
        layer..layer + n_out − 1 (n_out = 1 for a per-layer transcoder)."""
        if self.clt is not None:
            return self.clt.decoder(layer)
        return self.per_layer[layer].W_dec[:, None, :]

    def b_dec(self, layer: int) -> torch.Tensor:
        if self.clt is not None:
            return self.clt.b_dec.view(self.n_layers, -1)[layer]
        return self.per_layer[layer].b_dec

    def skip(self, layer: int, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The linear skip path x W_skip into layer `layer`'s MLP output, or None."""
        return None if self.clt is not None else self.per_layer[layer].skip_out(x)

    def reconstruct(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Predicted MLP outputs of every layer from every layer's MLP input (no error terms)."""
        outs = [self.b_dec(l).expand_as(xs[l]).clone() for l in range(self.n_layers)]
        for l in range(self.n_layers):
            f = self.encode(l, xs[l])
            dec = self.decoder(l)
            for j in range(dec.shape[1]):
                outs[l + j] = outs[l + j] + f @ dec[:, j]
            s = self.skip(l, xs[l])
            if s is not None:
                outs[l] = outs[l] + s
        return outs

    # -- files --------------------------------------------------------------------------------------
    def save(self, folder: Union[str, Path], dtype: torch.dtype = torch.float32) -> Path:
        """Every layer's files, then transcoders.json (so a folder with a manifest is complete). fp16
        halves the files (the shipped transcoders); they load as float32."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is a file; transcoders are saved into a new or empty folder. Choose another "
                             "folder name.")
        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} is not empty; transcoders are saved into a new or empty folder, so nothing "
                             "there is overwritten. Choose another folder.")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp", dir=folder.parent))  # built here, then renamed
        try:
            if self.clt is not None:
                self.clt.save(tmp / "clt")
            else:
                for l, tc in self.per_layer.items():
                    save_sae(tc, tmp / f"layer_{l}", dtype=dtype)
            self.write_manifest(tmp)
            open_modes(tmp)  # mkdtemp's 0700 and safetensors' 0600 would hide the set from its readers
            if folder.exists():
                folder.rmdir()  # empty, checked above
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the temporary folder this call made, nothing else
            raise
        return folder

    def write_manifest(self, folder: Union[str, Path]) -> Path:
        folder = Path(folder)
        where = {"clt": "clt"} if self.clt is not None else {str(l): f"layer_{l}" for l in range(self.n_layers)}
        atomic_write_json(folder / TRANSCODERS_MANIFEST, {"kind": "workbench.Transcoders", "format_version": 1,
                                              "type": self.kind, "model_name": self.model_name,
                                              "n_layers": self.n_layers, "d_model": self.d_model,
                                              "input_hooks": [self.in_hook(l) for l in range(self.n_layers)],
                                              "output_hooks": [output_hook(l) for l in range(self.n_layers)],
                                              "folders": where})
        return folder

    def check_model(self, model: HookedModel) -> None:
        """A clear error when these transcoders do not fit `model` (layers, widths or hook names) or were
        trained on another model (its name, `model_name_of`, differs from theirs; where either name is
        unknown, only the shapes can be checked)."""
        layers = mlp_layers(model)
        if len(layers) != self.n_layers or int(model.cfg.d_model) != self.d_model:
            raise InputError(f"These transcoders ({self.model_name!r}: {self.n_layers} layers of width {self.d_model}) "
                             f"do not fit this model ({len(layers)} layers of width {int(model.cfg.d_model)}); "
                             "they were trained on another model. "
                             "Train transcoders for it with `workbench transcoder train`.")
        wanted = mlp_input_hooks(model)
        if [self.in_hook(l) for l in layers] != wanted:
            raise InputError(f"These transcoders read {self.in_hook(0)!r}, ..., but this model's MLPs read "
                             f"{wanted[0]!r}, ...; they were trained on another kind of model.")
        theirs, mine = comparable_name(model_name_of(model)), comparable_name(self.model_name)
        if theirs and mine and theirs != mine:  # same shapes, another model: the replacement would be meaningless
            raise InputError(f"These transcoders were trained on {self.model_name!r}, not on this model "
                             f"({model_name_of(model)!r}); another model's transcoders of the same shape do not "
                             "imitate its MLPs. Use the ones trained on it, or train them with `workbench transcoder "
                             "train --model <this model>`.")


def load_transcoders(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Transcoders:
    """A set saved by `Transcoders.save` (or `workbench transcoder train`)."""
    folder = Path(folder)
    path = folder / TRANSCODERS_MANIFEST
    manifest = read_json(path)
    if manifest.get("kind") != "workbench.Transcoders":
        raise CheckpointError(f"{path} is not a workbench transcoder manifest.")

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; the file is damaged. Train the transcoders again, or restore the "
                               "file as `workbench transcoder train` wrote it.")

    n_layers, name, kind = manifest.get("n_layers"), manifest.get("model_name", ""), manifest.get("type", "per-layer")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise damaged(f"n_layers should be a positive integer, got {n_layers!r}")
    if not isinstance(name, str):
        raise damaged(f"model_name should be text, got {name!r}")
    if kind not in ("per-layer", "cross-layer"):
        raise damaged(f"type should be 'per-layer' or 'cross-layer', got {kind!r}")
    if kind == "cross-layer":
        clt = CrossLayerTranscoder.load(folder / "clt")
        if clt.n_layers != n_layers:
            raise damaged(f"n_layers is {n_layers}, but the cross-layer transcoder in {folder / 'clt'} spans "
                          f"{clt.n_layers} layers")
        return Transcoders(name, n_layers, clt=clt).to(device)
    folders = manifest.get("folders")
    if not isinstance(folders, dict):
        raise damaged(f"folders should map each layer to its folder ({{\"0\": \"layer_0\", ...}}), got {folders!r:.60}")
    if sorted(folders) != sorted(str(l) for l in range(n_layers)):
        raise damaged(f"folders should name one folder for each of the layers 0–{n_layers - 1} (n_layers), got the "
                      f"layer keys {sorted(folders)[:8]}")
    per_layer = {int(l): load_sae(_inside(folder, sub, path)) for l, sub in folders.items()}
    return Transcoders(name, n_layers, per_layer=per_layer).to(device)


def _inside(folder: Path, sub: Any, path: Path) -> Path:
    """folder/sub, where sub (from the file `path`) is a relative path that stays inside `folder`, or a
    CheckpointError: a file must never point a loader outside its own set."""
    parts = PurePosixPath(sub.replace("\\", "/")).parts if isinstance(sub, str) else ()
    if not parts or parts[0] == "/" or ":" in parts[0] or ".." in parts:
        raise CheckpointError(f"{path}: every folder it names must be a folder inside {folder} (like 'layer_0'), got "
                              f"{sub!r}; the file is damaged or was edited. Restore it as `workbench transcoder "
                              "train` wrote it.")
    return folder.joinpath(*parts)
