"""Transcoders: sparse, wide MLPs that imitate a model's MLPs, for circuit tracing.

A transcoder reads an MLP's input and predicts its output (Dunefsky et al. 2024; Paulo et al.,
"Transcoders Beat Sparse Autoencoders", 2025). It is one more kind of dictionary, trained by the
SAE trainer (`workbench.sae.training`):

    per-layer        an `SAE` whose config has `target_hook`: it reads blocks.l.ln2.hook_normalized
                     and predicts blocks.l.hook_mlp_out; any SAE architecture (TopK with AuxK,
                     ReLU + L1, JumpReLU, BatchTopK), with an optional linear skip x W_skip
    cross-layer      `CrossLayerTranscoder`: features read at layer l and write to the MLP outputs
                     of layers l..L-1, all layers trained jointly (Ameisen et al., "Circuit Tracing",
                     2025); TopK (k per layer, with AuxK), ReLU + L1 or JumpReLU

`Transcoders` puts either behind the one interface the attribution graph uses (`encode(l, x)`,
`decoder(l)`, `b_dec(l)`, `skip(l, x)`), and saves and loads a set:

    folder/transcoders.json             kind, model, layers, hooks, and where each layer lives
    folder/layer_<l>/cfg.json + sae_weights.safetensors    (per-layer: SAELens layout, as SAEs)
    folder/clt/cfg.json + sae_weights.safetensors          (cross-layer)

`workbench.sae.circuit_tracer_format` writes per-layer sets in the files the `circuit-tracer`
package loads, and reads its files back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from workbench.artifacts import SAE_CFG_FILE, SAE_WEIGHTS_FILE, TRANSCODERS_MANIFEST, atomic_write_json, open_modes
from workbench.errors import CheckpointError, InputError
from workbench.model.hooked import HookedModel
from workbench.sae.modules import (
    SAE,
    SAEConfig,
    TrainOut,
    _JumpReLU,
    _Step,
    centred_sq_mean,
    load_sae,
    make_sae,
    save_sae,
)
from workbench.train.distributed import Dist

CLT_INPUT, CLT_TARGET = "clt.inputs", "clt.targets"
"""Batch keys of a cross-layer transcoder: every layer's MLP input (and output), concatenated."""


def per_token(act: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """An activation as [B, S, d] (OPT's bridge hands the MLP's hooks [B·S, d])."""
    return act.reshape(B, S, -1)


def input_hook(layer: int, parallel: bool = False) -> str:
    """The MLP's input: ln2's output, or ln1's in a block whose attention and MLP read the same norm
    (GPT-J, Phi)."""
    return f"blocks.{layer}.ln{1 if parallel else 2}.hook_normalized"


def output_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def mlp_layers(model: HookedModel) -> list[int]:
    """Every layer's index, or a clear error for a model whose blocks have no MLP (or no ln2 hook)."""
    n_layers = int(model.cfg.n_layers)
    missing = [l for l in range(n_layers) if output_hook(l) not in model.hook_dict]
    if missing:
        raise InputError(f"Transcoders imitate MLPs, and layers {missing} of this model have none (an attention-only "
                         "model?). Train SAEs on its attention outputs instead: `workbench run sae --hook "
                         "blocks.0.hook_attn_out`.")
    mlp_input_hooks(model)
    return list(range(n_layers))


def mlp_input_hooks(model: HookedModel) -> list[str]:
    """Each layer's MLP input hook (see `input_hook`), or a clear error where there is none."""
    from workbench.adapter import describe

    arch = describe(model)
    hooks = []
    for l in range(int(model.cfg.n_layers)):
        own = input_hook(l)  # a block with its own norm before the MLP (GPT-NeoX has one even when parallel)
        hooks.append(own if own in model.hook_dict or not arch.parallel else input_hook(l, parallel=True))
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing:
        raise InputError(f"This model has no {missing[0]!r} hook (no normalisation before its MLP), which transcoders "
                         "read; circuit tracing does not support it.")
    return hooks


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


# -- the cross-layer transcoder -------------------------------------------------------------------------
class CrossLayerTranscoder(nn.Module):
    """Features at layer l read x_l (that layer's MLP input) and write to the MLP outputs of layers
    l..L-1. On the trainer's side it is a dictionary of d_in = L·d_model and d_sae = L·F over the
    concatenated inputs and targets; `cfg.k` is per layer."""

    dist: Dist = Dist()
    """Set by a data-parallel trainer (see `SAE.dist`)."""

    def __init__(self, cfg: SAEConfig, n_layers: int, seed: int = 0, input_hooks: Optional[Sequence[str]] = None):
        super().__init__()
        self.input_hooks = list(input_hooks or [input_hook(l) for l in range(n_layers)])
        if cfg.arch not in ("topk", "relu", "jumprelu"):
            raise InputError(f"A cross-layer transcoder is 'topk', 'relu' or 'jumprelu', not {cfg.architecture!r}.")
        if cfg.d_in % n_layers or cfg.d_sae % n_layers:
            raise InputError(f"d_in {cfg.d_in} and d_sae {cfg.d_sae} must be n_layers ({n_layers}) × the per-layer "
                             "width.")
        self.cfg, self.n_layers = cfg, n_layers
        L, d, Fw = n_layers, cfg.d_in // n_layers, cfg.d_sae // n_layers
        self.d_model, self.d_tc = d, Fw
        gen = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(L, d, Fw, generator=gen) / d ** 0.5)
        self.b_enc = nn.Parameter(torch.zeros(L, Fw))
        # W_dec[l]: [F, (L - l)·d], the writes of layer l's features to the outputs of layers l..L-1
        self.W_dec_layers = nn.ParameterList(
            [nn.Parameter(torch.randn(Fw, (L - l) * d, generator=gen) / (Fw * (L - l)) ** 0.5) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L * d))
        if cfg.arch == "jumprelu":
            self.threshold = nn.Parameter(torch.full((L * Fw,), cfg.jumprelu_init_threshold))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # -- the graph's interface ----------------------------------------------------------------------
    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s feature activations [..., F] from its MLP input x [..., d_model]."""
        pre = x @ self.W_enc[layer] + self.b_enc[layer]
        if self.cfg.arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
        if self.cfg.arch == "jumprelu":
            theta = self.threshold.view(self.n_layers, -1)[layer]
            return pre * (pre > theta)
        return F.relu(pre)

    def decoder(self, layer: int) -> torch.Tensor:
        """[F, L - layer, d_model]: what each feature of `layer` writes to each later MLP output."""
        return self.W_dec_layers[layer].view(self.d_tc, self.n_layers - layer, self.d_model)

    # -- the trainer's interface ----------------------------------------------------------------------
    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        """pre [B, L, F] -> f [B, L, F]."""
        if self.cfg.arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))
        if self.cfg.arch == "jumprelu":
            flat = pre.flatten(1)
            if torch.is_grad_enabled() and self.training:
                return _JumpReLU.apply(flat, self.threshold, self.cfg.jumprelu_bandwidth).view_as(pre)
            return (flat * (flat > self.threshold)).view_as(pre)
        return F.relu(pre)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L·d] -> pre [B, L, F]."""
        return torch.einsum("bld,ldf->blf", x.view(x.shape[0], self.n_layers, self.d_model), self.W_enc) + self.b_enc

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [B, L·F] (or [B, L, F]) -> predicted MLP outputs [B, L·d], b_dec included."""
        f = f.view(f.shape[0], self.n_layers, self.d_tc)
        y = self.b_dec.expand(f.shape[0], -1).clone()
        for l in range(self.n_layers):
            y[:, l * self.d_model:] += f[:, l] @ self.W_dec_layers[l]
        return y

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._activate(self.pre_acts(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def skip_out(self, x: torch.Tensor) -> None:
        return None

    def train_forward(self, x: torch.Tensor) -> TrainOut:
        pre = self.pre_acts(x)
        f = self._activate(pre).flatten(1)
        return TrainOut(self.decode(f), pre.flatten(1), f=f)

    def _decoder_norms(self) -> torch.Tensor:
        """‖everything feature i writes‖ over all its output layers, [L·F]."""
        return torch.cat([w.norm(dim=1) for w in self.W_dec_layers])

    def sparsity_loss(self, out: TrainOut, coefficient: float) -> torch.Tensor:
        if self.cfg.arch == "relu":
            return coefficient * (out.f * self._decoder_norms()).sum(-1).mean()
        if self.cfg.arch == "jumprelu":
            return coefficient * _Step.apply(out.pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return out.x_hat.new_zeros(())

    def aux_loss(self, target: torch.Tensor, out: TrainOut, dead: torch.Tensor) -> torch.Tensor:
        """AuxK (TopK only): the k_aux largest dead latents reconstruct the residual."""
        n_dead = int(dead.sum())
        if self.cfg.arch != "topk" or n_dead == 0:
            return target.new_zeros(())
        k_aux = min(self.cfg.aux_k or self.d_model // 2, n_dead)
        residual = (target - out.x_hat).detach()
        top = out.pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
        f_aux = torch.zeros_like(out.pre).scatter_(-1, top.indices, top.values)  # no ReLU, as TopKSAE.aux_loss
        recon = self.decode(f_aux) - self.b_dec
        denom = centred_sq_mean(residual, self.dist).clamp_min(1e-12)
        return self.cfg.aux_coefficient * min(n_dead / k_aux, 1.0) * (recon - residual).pow(2).sum(-1).mean() / denom

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.arch == "topk":  # unit-norm features (over all the layers each writes to)
            norms = self._decoder_norms().clamp_min(1e-12).view(self.n_layers, -1)
            for l, w in enumerate(self.W_dec_layers):
                w.div_(norms[l][:, None])
        elif self.cfg.arch == "jumprelu":
            self.threshold.clamp_(min=1e-6)

    def fold_scale(self, scale: float, scale_out: Optional[float] = None) -> None:
        scale_out = scale if scale_out is None else scale_out
        with torch.no_grad():
            self.W_enc.mul_(scale)
            for w in self.W_dec_layers:
                w.div_(scale_out)
            self.b_dec.div_(scale_out)

    # -- files --------------------------------------------------------------------------------------
    def save(self, folder: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> Path:
        """cfg.json + sae_weights.safetensors (weights first, then the config, each renamed into place)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SAE_CFG_FILE).unlink(missing_ok=True)
        weights = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec,
                   **{f"W_dec.{l}": w for l, w in enumerate(self.W_dec_layers)},
                   **({"threshold": self.threshold} if self.cfg.arch == "jumprelu" else {})}
        tmp = folder / f".{SAE_WEIGHTS_FILE}.tmp{os.getpid()}"
        save_file({k: v.detach().contiguous().float().cpu() for k, v in weights.items()}, str(tmp))
        open_modes(tmp)  # safetensors writes 0600; the weights get the mode of the JSON beside them
        os.replace(tmp, folder / SAE_WEIGHTS_FILE)
        atomic_write_json(folder / SAE_CFG_FILE, {"architecture": "cross_layer_transcoder", "n_layers": self.n_layers,
                                              "input_hooks": self.input_hooks,
                                              "d_model": self.d_model, "d_transcoder": self.d_tc,
                                              "metadata": {"model_name": self.cfg.model_name,
                                                           "workbench": {"config": self.cfg.to_dict(),
                                                                         **(extra or {})}}})
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "CrossLayerTranscoder":
        folder = Path(folder)
        cfg = _read_json(folder / SAE_CFG_FILE)
        try:
            own = SAEConfig(**cfg["metadata"]["workbench"]["config"])
            n_layers, hooks = cfg["n_layers"], cfg.get("input_hooks")
            if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
                raise CheckpointError(f"{folder / SAE_CFG_FILE}: n_layers should be a positive integer, got "
                                      f"{n_layers!r}; "
                                      "the file is damaged.")
            if hooks is not None and not (isinstance(hooks, list) and len(hooks) == n_layers
                                          and all(isinstance(h, str) for h in hooks)):
                raise CheckpointError(f"{folder / SAE_CFG_FILE}: input_hooks should list {n_layers} hook names, got "
                                      f"{hooks!r:.80}; the file is damaged.")
            clt = cls(own, n_layers, input_hooks=hooks)
            weights = load_file(str(folder / SAE_WEIGHTS_FILE))
            state = {"W_enc": weights["W_enc"], "b_enc": weights["b_enc"], "b_dec": weights["b_dec"],
                     **{f"W_dec_layers.{l}": weights[f"W_dec.{l}"] for l in range(clt.n_layers)},
                     **({"threshold": weights["threshold"]} if own.arch == "jumprelu" else {})}
            clt.load_state_dict(state)
        except CheckpointError:
            raise
        except Exception as err:  # missing keys, wrong shapes, a damaged safetensors file
            raise CheckpointError(f"Could not load the cross-layer transcoder in {folder} ({type(err).__name__}: "
                                  f"{err}); the files are damaged or from another version.") from err
        return clt.eval()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {path.parent} is not a transcoder folder.") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged ({err}).") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object.")
    return data


# -- one interface for both kinds ------------------------------------------------------------------
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
    manifest = _read_json(path)
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


# -- training data ---------------------------------------------------------------------------------
def clt_batches(batches: Iterator[dict[str, torch.Tensor]], input_hooks: Sequence[str]
                ) -> Iterator[dict[str, torch.Tensor]]:
    """Every layer's MLP input and output concatenated, as a cross-layer transcoder trains on them."""
    for batch in batches:
        yield {CLT_INPUT: torch.cat([batch[h] for h in input_hooks], -1),
               CLT_TARGET: torch.cat([batch[output_hook(l)] for l in range(len(input_hooks))], -1)}


# -- training and evaluation ------------------------------------------------------------------------
def make_transcoders(model: HookedModel, d_tc: int, architecture: str = "topk", k: int = 32, skip: bool = False,
                     cross_layer: bool = False, l1_coefficient: float = 5.0, seed: int = 0,
                     model_name: str = "") -> dict[str, nn.Module]:
    """Freshly initialised dictionaries for every MLP of `model`: {'layer_<l>': SAE} or {'clt': CLT}, made
    on the CPU (a width whose weights cannot fit in its memory is refused first)."""
    layers = mlp_layers(model)
    hooks = mlp_input_hooks(model)
    d = int(model.cfg.d_model)
    check_memory(model, d_tc, cross_layer, skip)
    common = dict(architecture=architecture, k=k, l1_coefficient=l1_coefficient, model_name=model_name)
    if cross_layer:
        if skip:
            raise InputError("The skip connection is a per-layer transcoder's option; leave it off for a "
                             "cross-layer one.")
        cfg = SAEConfig(d_in=len(layers) * d, d_sae=len(layers) * d_tc, hook_name=CLT_INPUT, target_hook=CLT_TARGET,
                        aux_k=d // 2, **common)
        return {"clt": CrossLayerTranscoder(cfg, len(layers), seed=seed, input_hooks=hooks)}
    return {f"layer_{l}": make_sae(SAEConfig(d_in=d, d_sae=d_tc, hook_name=hooks[l], target_hook=output_hook(l),
                                             skip=skip, **common), seed=seed + l) for l in layers}


def check_memory(model: HookedModel, d_tc: int, cross_layer: bool = False, skip: bool = False,
                 device: Optional[Union[str, torch.device]] = None, batch_size: int = 0) -> None:
    """A clear error, before anything is allocated, when transcoders of `d_tc` features per layer cannot
    fit: their float32 weights in the CPU's memory (where they are made) or, with a `device` to train
    on, weights, gradients, Adam's two moments and a batch's activations in that device's memory.
    Where the memory cannot be read, nothing is refused."""
    if isinstance(d_tc, bool) or not isinstance(d_tc, int) or d_tc < 1:
        raise InputError(f"d_tc (features per layer) must be a positive integer, got {d_tc!r}.")
    L, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    if cross_layer:  # encoders, then layer l's features write to the L - l later MLP outputs
        n = L * d * d_tc + d_tc * d * L * (L + 1) // 2 + 2 * L * d_tc + L * d
    else:
        n = L * (2 * d * d_tc + 2 * d_tc + d + (d * d if skip else 0))
    training = device is not None
    need = 4 * (4 * n + 3 * batch_size * L * d_tc) if training else 4 * n
    dev = torch.device(device) if training else torch.device("cpu")
    try:
        if dev.type == "cuda":
            have, where = torch.cuda.get_device_properties(dev).total_memory, f"{dev} has"
        else:
            have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    except (AttributeError, ValueError, OSError, RuntimeError, AssertionError):  # no sysconf (Windows), no CUDA
        return
    if need > have:
        what = ("to train (weights, gradients, Adam's two moments and a batch's activations)" if training
                else "for their weights alone")
        raise InputError(f"Transcoders of {d_tc:,} features for each of the {L} layers need about "
                         f"{need / 2 ** 30:,.1f} GiB of memory {what}, more than the {have / 2 ** 30:,.1f} GiB "
                         f"{where}. Choose a smaller width (--d-tc; the usual one is 8 × d_model = {8 * d:,}).")


def as_transcoders(dictionaries: dict[str, nn.Module], n_layers: int, model_name: str = "") -> Transcoders:
    """The `Transcoders` view of what `make_transcoders` built (after training)."""
    if "clt" in dictionaries:
        return Transcoders(model_name, n_layers, clt=dictionaries["clt"].eval())
    return Transcoders(model_name, n_layers, per_layer={int(name.split("_")[1]): m.eval()
                                                        for name, m in dictionaries.items()})


@torch.no_grad()
def evaluate_transcoders(model: HookedModel, tc: Transcoders, rows: torch.Tensor, batch_rows: int = 16
                         ) -> dict[str, Any]:
    """Per layer: FVU of the MLP output, L0 and dead fraction on `rows` (positions 1 on); and the next-token
    loss (every position) with the
    model clean, with every MLP replaced by its transcoder (no error terms), with each MLP replaced
    alone, with the error terms added back (which must equal clean), and with every MLP zero- and
    mean-ablated. CE loss recovered = (CE_ablated − CE_replaced) / (CE_ablated − CE_clean), where one
    MLP replaced alone is measured against zero-ablating that MLP alone. Replacing leaves position 0
    (usually the BOS, whose activations are outliers) as it is, as training leaves it out."""
    from workbench.cache.collect import run_collect
    from workbench.model.transformer import lm_loss
    from workbench.sae.interventions import MIN_ABLATION_GAP
    from workbench.sae.metrics import ReconstructionStats
    from workbench.strict_json import ratio

    tc.check_model(model)
    L = tc.n_layers
    stats = [ReconstructionStats(tc.width(l)) for l in range(L)]
    ce: dict[str, list[float]] = {}
    device = next(model.parameters()).device
    names = [h for l in range(L) for h in (tc.in_hook(l), output_hook(l))]
    means = None
    for start in range(0, len(rows), batch_rows):
        toks = rows[start:start + batch_rows].to(device)
        logits, acts = run_collect(model, toks, names)
        B, S = toks.shape
        xs = [per_token(acts[tc.in_hook(l)], B, S).float() for l in range(L)]
        ys = [per_token(acts[output_hook(l)], B, S).float() for l in range(L)]
        preds = tc.reconstruct(xs)
        # position 0 (the BOS, an outlier the transcoders never train on) is left out, as in training
        for l in range(L):
            f = tc.encode(l, xs[l][:, 1:])
            stats[l].add(ys[l][:, 1:].flatten(0, 1), preds[l][:, 1:].flatten(0, 1), f.flatten(0, 1))
        if means is None:
            means = [y[:, 1:].mean(dim=(0, 1), keepdim=True) for y in ys]
        runs = {"clean": logits, "replaced": _run_replaced(model, tc, toks, range(L)),
                "replaced_with_errors": _run_replaced(model, tc, toks, range(L),
                                                      errors=[ys[l] - preds[l] for l in range(L)]),
                "zero_ablated": _run_ablated(model, toks, range(L), _zeros),
                "mean_ablated": _run_ablated(model, toks, range(L), lambda l, a, m=means: m[l])}
        runs.update({f"replaced_layer_{l}": _run_replaced(model, tc, toks, [l]) for l in range(L)})
        runs.update({f"zero_layer_{l}": _run_ablated(model, toks, [l], _zeros) for l in range(L)})
        for name, lg in runs.items():
            ce.setdefault(name, []).append(float(lm_loss(lg.float(), toks)) * len(toks))
    n = len(rows)
    loss = {name: sum(v) / n for name, v in ce.items()}

    def recovered(replaced: str, base: str) -> Optional[float]:
        return ratio(loss[base] - loss[replaced], loss[base] - loss["clean"], MIN_ABLATION_GAP)

    layers = []
    for l in range(L):
        s = stats[l].summary()
        layers.append({"layer": l, "fvu": s["fvu"], "l0": s["l0"], "dead_fraction": s["dead_fraction"],
                       "ce_loss_recovered_alone": recovered(f"replaced_layer_{l}", f"zero_layer_{l}")})
    return {"layers": layers, "ce": loss,
            "ce_loss_recovered_zero": recovered("replaced", "zero_ablated"),
            "ce_loss_recovered_mean": recovered("replaced", "mean_ablated"),
            "with_errors_max_loss_change": abs(loss["replaced_with_errors"] - loss["clean"])}


def _zeros(layer: int, act: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(act)


def _run_ablated(model: HookedModel, toks: torch.Tensor, layers: Sequence[int], value: Any) -> torch.Tensor:
    """Logits with the MLP outputs of `layers` set to value(layer, act) (broadcast to act) from position 1
    on. Position 0 stays clean in these baselines as in the replacements (`_run_replaced`), so CE loss
    recovered compares like with like."""
    B, S = toks.shape

    def set_output(act, hook, l):
        out = value(l, act).expand_as(act).reshape(B, S, -1).clone()
        out[:, 0] = act.reshape(B, S, -1)[:, 0]
        return out.reshape(act.shape).to(act.dtype)

    return model.run_with_hooks(toks, fwd_hooks=[(output_hook(l), partial(set_output, l=l)) for l in layers])


def _run_replaced(model: HookedModel, tc: Transcoders, toks: torch.Tensor, layers: Sequence[int],
                  errors: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Logits with the MLP outputs of `layers` replaced by the transcoders' predictions from this run's
    own MLP inputs (plus `errors[l]`, the clean output minus the prediction on the clean run, if given:
    then every layer's output, and the logits, are the clean ones)."""
    xs: dict[int, torch.Tensor] = {}
    replaced = set(layers)

    B, S = toks.shape

    def keep(act, hook, l):
        xs[l] = per_token(act, B, S).float()
        return act

    def replace(act, hook, l):
        if l not in replaced:
            return act
        f_out = tc.b_dec(l).expand_as(xs[l]).clone()
        for l0 in range(l + 1):
            dec = tc.decoder(l0)
            if l - l0 < dec.shape[1]:
                f_out = f_out + tc.encode(l0, xs[l0]) @ dec[:, l - l0]
        s = tc.skip(l, xs[l])
        out = f_out + (s if s is not None else 0)
        if errors is not None:
            out = out + errors[l]
        out[:, 0] = per_token(act, B, S)[:, 0].float()  # position 0 stays clean: the transcoders never train on it
        return out.reshape(act.shape).to(act.dtype)

    hooks = [(tc.in_hook(l), lambda a, hook, l=l: keep(a, hook, l)) for l in range(tc.n_layers)]
    hooks += [(output_hook(l), lambda a, hook, l=l: replace(a, hook, l)) for l in range(tc.n_layers)]
    return model.run_with_hooks(toks, fwd_hooks=hooks)


def train_transcoders(model: HookedModel, d_tc: int, out: Optional[Union[str, Path]] = None, architecture: str = "topk",
                      k: int = 32, skip: bool = False, cross_layer: bool = False, l1_coefficient: float = 5.0,
                      n_tokens: int = 1_000_000, batch_size: int = 2048, lr: float = 1e-3, n_rows: int = 2000,
                      seed: int = 0, resume: bool = False, progress: bool = True, model_name: str = "",
                      resume_command: Optional[str] = None, n_checkpoints: int = 2, precision: str = "fp32"
                      ) -> tuple[Transcoders, dict]:
    """Train transcoders for every MLP of `model` on its own training text (the standard library's
    source for a model without one), with the SAE trainer: one forward pass feeds every layer. With
    `out`, each layer's run folder (out/layer_<l>, or out/clt) gets the trainer's log, checkpoints
    and resume, and out/transcoders.json is written last. Returns (transcoders, the trainer's logs)."""
    from workbench.cache.collect import training_text
    from workbench.sae.training import SAETrainConfig, train_saes

    name = model_name or model_name_of(model)
    out = Path(out) if out is not None else None
    for p in (out, *out.parents) if out is not None else ():
        if p.exists():  # the nearest existing folder on the way must be one
            if not p.is_dir():
                raise InputError(f"Cannot write transcoders into {out}: {p} is a file, not a folder. Choose another "
                                 "--out.")
            break
    device = next(model.parameters()).device
    check_memory(model, d_tc, cross_layer, skip, device, batch_size)
    dictionaries = make_transcoders(model, d_tc, architecture, k, skip, cross_layer, l1_coefficient, seed, name)
    for m in dictionaries.values():
        m.to(device)
    rows, _ = training_text(model, n_rows, min(int(model.cfg.n_ctx), 256))
    first = next(iter(dictionaries.values()))
    cfg = SAETrainConfig(sae=first.cfg, n_tokens=n_tokens, batch_size=batch_size, lr=lr, seed=seed,
                         n_checkpoints=n_checkpoints, dead_window=min(200_000, max(batch_size, n_tokens // 10)),
                         precision=precision)
    if out is not None and (out / TRANSCODERS_MANIFEST).exists() and not resume:
        raise InputError(f"{out} already holds trained transcoders ({TRANSCODERS_MANIFEST}); nothing was overwritten. "
                         "Choose "
                         "another --out.")
    source = _stream(model, rows, batch_size, seed)
    data = {"rows": n_rows, "seq_len": int(rows.shape[1])}  # a resume with other data settings is refused
    if cross_layer:  # one dictionary: train_saes writes into its folder directly, so give it out/clt
        logs = train_saes(dictionaries, clt_batches(source, mlp_input_hooks(model)), cfg,
                          out / "clt" if out is not None else None, resume, progress, resume_command, data=data)
    else:
        logs = train_saes(dictionaries, source, cfg, out, resume, progress, resume_command, data=data)
    tc = as_transcoders(dictionaries, len(mlp_layers(model)), name)
    if out is not None:
        tc.write_manifest(out)
    return tc, logs


def _stream(model: HookedModel, rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    from workbench.cache.activations import stream_activations

    hooks = [h for l, x in enumerate(mlp_input_hooks(model)) for h in (x, output_hook(l))]
    return stream_activations(model, rows, hooks, batch_size=batch_size, seed=seed)
