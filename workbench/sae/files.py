"""An SAE's files in SAELens's layout: `cfg.json` + `sae_weights.safetensors`, with SAELens's key and
field names, so an SAE moves between SAELens and the workbench both ways. SAELens options the
architectures have no switch for are folded into the weights on load (or refused)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from workbench.artifacts import SAE_CFG_FILE, SAE_WEIGHTS_FILE, atomic_write_json, staged_files
from workbench.errors import CheckpointError, unknown_name_message
from workbench.sae.modules import SAE, SAEConfig, make_sae


def save_sae(sae: SAE, folder: Union[str, Path], extra: Optional[dict[str, Any]] = None,
             dtype: torch.dtype = torch.float32) -> Path:
    """Write `folder/cfg.json` and `folder/sae_weights.safetensors` in SAELens's layout. Both files are
    written aside and renamed into place, weights first (`disk.staged_files`): a folder with a
    cfg.json is complete, other files in the folder (a training log, checkpoints) are left alone, and a
    full disk leaves the folder as it was and raises OutOfSpaceError."""
    folder = Path(folder)
    arch, weights, fields_ = sae.inference_state()
    cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": str(dtype).replace("torch.", ""),
           "device": "cpu", "apply_b_dec_to_input": not sae.cfg.is_transcoder, "normalize_activations": "none",
           "reshape_activations": "none", **fields_,
           **({"d_out": sae.d_in, "hook_name_out": sae.cfg.target_hook} if sae.cfg.is_transcoder else {}),
           "metadata": {"hook_name": sae.cfg.hook_name, "model_name": sae.cfg.model_name,
                        "workbench": {"config": sae.cfg.to_dict(), **(extra or {})}}}
    tensors = {k: v.contiguous().to(dtype).cpu() for k, v in weights.items()}
    with staged_files(folder, sum(t.numel() * t.element_size() for t in tensors.values())) as stage:
        save_file(tensors, str(stage(SAE_WEIGHTS_FILE)))
        atomic_write_json(stage(SAE_CFG_FILE), cfg)  # last: it marks the folder complete
    return folder



def load_sae(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> SAE:
    """An SAE from a SAELens-layout folder (written by SAELens or by `save_sae`)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / SAE_CFG_FILE).read_text())
        weights = load_file(str(folder / SAE_WEIGHTS_FILE))
    except FileNotFoundError as err:
        raise CheckpointError(f"{folder} is not an SAE folder: it needs {SAE_CFG_FILE} and "
                              f"{SAE_WEIGHTS_FILE}.") from err
    except Exception as err:  # a bad JSON file, or safetensors' own error types for a damaged weights file
        raise CheckpointError(f"Could not read the SAE in {folder} ({type(err).__name__}: {err}); the files are "
                              "damaged or not an SAE.") from err
    if isinstance(cfg, dict) and cfg.get("architecture") == "cross_layer_transcoder":
        raise CheckpointError(f"{folder} holds a cross-layer transcoder, not an SAE: load it with "
                              "workbench.sae.transcoders.load_transcoders on the folder above it.")
    arch = cfg.get("architecture")
    known = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
    if arch not in known:
        raise CheckpointError(unknown_name_message("SAE architecture in " + str(folder / SAE_CFG_FILE), str(arch),
                                                   known))
    meta = cfg.get("metadata") or {}
    own = (meta.get("workbench") or {}).get("config") or {}
    valid = {f.name for f in fields(SAEConfig)}
    base = {k: v for k, v in own.items() if k in valid}
    base.update(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), architecture=known[arch],
                hook_name=meta.get("hook_name", cfg.get("hook_name", "")) or "",
                model_name=meta.get("model_name", cfg.get("model_name", "")) or "")
    if "k" in cfg:
        base["k"] = int(cfg["k"])
    sae = make_sae(SAEConfig(**base))
    expected = {"W_enc": (sae.d_in, sae.d_sae), "b_enc": (sae.d_sae,), "W_dec": (sae.d_sae, sae.d_in),
                "b_dec": (sae.d_in,)} | ({"threshold": (sae.d_sae,)} if known[arch] == "jumprelu" else {}) | (
                {"W_skip": (sae.d_in, sae.d_in)} if sae.cfg.skip else {})
    for key, shape in expected.items():
        if key not in weights or tuple(weights[key].shape) != shape:
            got = tuple(weights[key].shape) if key in weights else "missing"
            raise CheckpointError(f"{folder / SAE_WEIGHTS_FILE}: {key} should have shape {shape}, got {got}.")
    if not sae.cfg.is_transcoder:  # a transcoder's b_dec is an output bias, never applied to the input
        weights = _fold_saelens_options(folder / SAE_CFG_FILE, cfg, known[arch], weights)
    with torch.no_grad():
        for key in ("W_enc", "b_enc", "W_dec", "b_dec") + (("W_skip",) if sae.cfg.skip else ()):
            getattr(sae, key).copy_(weights[key])
        if known[arch] == "jumprelu":
            sae.threshold.copy_(weights["threshold"])
    return sae.to(device).eval()



def _fold_saelens_options(path: Path, cfg: dict[str, Any], arch: str, weights: dict[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """SAELens options this module has no switch for, folded into the weights so that encode and
    decode give exactly what SAELens gives, or refused with an error that names the option:

    apply_b_dec_to_input false         pre = x W_enc + b_enc: b_enc absorbs b_dec W_enc
    rescale_acts_by_decoder_norm true  (topk) pre scaled by ‖W_dec,i‖ before the top k, and f divided
                                       by it before decoding: W_enc and b_enc absorb the norms and
                                       W_dec's rows become unit-norm
    normalize_activations              'none'; 'expected_average_only_in' with a `norm_scaling_factor`
                                       in cfg.json (folded as SAELens's fold_activation_norm_scaling_factor);
                                       anything else (a per-token rescale) is refused
    """
    W_enc, b_enc, W_dec, b_dec = (weights[k].double() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    if cfg.get("rescale_acts_by_decoder_norm", False):
        if arch != "topk":
            raise CheckpointError(f"{path}: rescale_acts_by_decoder_norm is true, which SAELens defines for TopK SAEs "
                                  f"only; this one is {cfg.get('architecture')!r}, so the file is refused.")
        norms = W_dec.norm(dim=1)
        if bool((norms == 0).any()):
            raise CheckpointError(f"{path}: rescale_acts_by_decoder_norm is true but {int((norms == 0).sum())} decoder "
                                  "rows have zero norm, so the activations cannot be rescaled by them.")
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    mode = cfg.get("normalize_activations", "none") or "none"
    if mode == "expected_average_only_in":
        factor = cfg.get("norm_scaling_factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
            raise CheckpointError(f"{path}: normalize_activations is 'expected_average_only_in', which needs the "
                                  "scaling factor the SAE was trained with, and the file has no positive "
                                  "'norm_scaling_factor'. Fold it into the weights (SAELens: "
                                  "sae.fold_activation_norm_scaling_factor(factor)) and save with 'none', or add it "
                                  "to cfg.json.")
        W_enc, W_dec, b_dec = W_enc * factor, W_dec / factor, b_dec / factor
    elif mode != "none":
        raise CheckpointError(f"{path}: normalize_activations {mode!r} rescales each token at run time, which this "
                              "loader does not do; only 'none' and 'expected_average_only_in' (with "
                              "'norm_scaling_factor') load.")
    dtype = weights["W_enc"].dtype
    return {**weights, "W_enc": W_enc.to(dtype), "b_enc": b_enc.to(dtype), "W_dec": W_dec.to(dtype),
            "b_dec": b_dec.to(dtype)}
