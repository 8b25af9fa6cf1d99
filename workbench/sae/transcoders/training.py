"""Training transcoders for every MLP of a model with the SAE trainer (one forward pass feeds every
layer): `make_transcoders` builds them (after `check_memory`), `train_transcoders` trains and saves a
set."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from workbench.adapter.provenance import model_name_of
from workbench.artifacts import TRANSCODERS_MANIFEST
from workbench.errors import InputError
from workbench.model.hooked import HookedModel
from workbench.sae.modules import SAEConfig, make_sae
from workbench.sae.transcoders.cross_layer import CLT_INPUT, CLT_TARGET, CrossLayerTranscoder, clt_batches
from workbench.sae.transcoders.hooks import mlp_input_hooks, mlp_layers, output_hook
from workbench.sae.transcoders.replacement import Transcoders


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
    from workbench.cache.rows import training_text
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
