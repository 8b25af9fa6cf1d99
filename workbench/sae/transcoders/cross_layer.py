"""The cross-layer transcoder (Ameisen et al., "Circuit Tracing", 2025): features read at layer l and
write to the MLP outputs of layers l..L-1, all layers trained jointly by the SAE trainer over every
layer's MLP input and output concatenated (`clt_batches`). TopK (k per layer, with AuxK), ReLU + L1 or
JumpReLU. Its files: folder/cfg.json + sae_weights.safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from workbench.artifacts import SAE_CFG_FILE, SAE_WEIGHTS_FILE, atomic_write_json, open_modes
from workbench.errors import CheckpointError, InputError
from workbench.sae.modules import SAEConfig, TrainOut, _JumpReLU, _Step, centred_sq_mean
from workbench.sae.transcoders.hooks import input_hook, output_hook
from workbench.train.distributed import Dist

CLT_INPUT, CLT_TARGET = "clt.inputs", "clt.targets"
"""Batch keys of a cross-layer transcoder: every layer's MLP input (and output), concatenated."""


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
        cfg = read_json(folder / SAE_CFG_FILE)
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


def clt_batches(batches: Iterator[dict[str, torch.Tensor]], input_hooks: Sequence[str]
                ) -> Iterator[dict[str, torch.Tensor]]:
    """Every layer's MLP input and output concatenated, as a cross-layer transcoder trains on them."""
    for batch in batches:
        yield {CLT_INPUT: torch.cat([batch[h] for h in input_hooks], -1),
               CLT_TARGET: torch.cat([batch[output_hook(l)] for l in range(len(input_hooks))], -1)}


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in a transcoder set's file, or a CheckpointError that says what is wrong."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {path.parent} is not a transcoder folder.") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged ({err}).") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object.")
    return data
