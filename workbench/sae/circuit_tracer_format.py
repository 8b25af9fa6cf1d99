"""Per-layer transcoders in the files `circuit-tracer` reads, and back.

circuit-tracer (0.5) loads a transcoder set from a `config.yaml` whose `transcoders` is a list of
`.safetensors` paths, one per layer in layer order, read by its `load_relu_transcoder`:

    W_enc  [d_tc, d_model]   pre = x @ W_enc.T + b_enc            (F.linear)
    W_dec  [d_tc, d_model]   out = f @ W_dec + b_dec + x @ W_skip.T
    b_enc  [d_tc], b_dec [d_model], W_skip [d_model, d_model] (optional)
    activation_function.threshold [d_tc]   present: JumpReLU f = pre·[pre > θ]; absent: ReLU

Its file loader builds nothing else, so `activation_function` in the config is not read: a TopK
transcoder would load as a ReLU and fire several times as many features. Only what it can represent
is exported: ReLU, JumpReLU, and BatchTopK (which at inference is a JumpReLU with its learned
threshold, exactly). The workbench's transcoders read the MLP's input after the norm's weight and
bias; in circuit-tracer's TransformerLens model that point is `mlp.hook_in` (TransformerLens's
`ln2.hook_normalized` is taken before the weight and bias), so that is the `feature_input_hook`
written. circuit-tracer opens the listed paths as they are, relative to the working directory: the
files sit beside `config.yaml` and are named relative to it, so load from inside that folder (or
join the paths to it). `workbench_format` in the config keeps this layout's version.

    export_circuit_tracer(transcoders, folder)     write (a new or workbench-written folder only)
    load_circuit_tracer(folder, model=None)        read circuit-tracer's files (ReLU / JumpReLU)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from workbench.artifacts import CIRCUIT_TRACER_CONFIG_FILE, write_output_folder
from workbench.errors import CheckpointError, InputError
from workbench.model.hooked import HookedModel
from workbench.sae.modules import SAEConfig, make_sae
from workbench.sae.transcoders.hooks import input_hook, mlp_input_hooks, output_hook
from workbench.sae.transcoders.replacement import Transcoders

FORMAT_VERSION = 2
"""1: the first export (W_enc [d_model, d_tc], `{layer, path}` entries, W_skip as x @ W_skip), which
circuit-tracer could not load; 2: circuit-tracer 0.5's own layout."""
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"
"""Where circuit-tracer's TransformerLens model reads and writes features: the MLP's input (after the
norm's weight and bias) and its output."""
OUTPUT_HOOKS = (OUTPUT_HOOK, "mlp.hook_out")
THRESHOLD = "activation_function.threshold"
EXPORTABLE = {"relu": "relu", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
"""Architecture → what circuit-tracer runs (a BatchTopK transcoder is a JumpReLU at inference)."""


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def circuit_tracer_tensors(tc: Transcoders, layer: int) -> dict[str, torch.Tensor]:
    """Layer `layer`'s tensors in circuit-tracer's names and orientation (float32, on the CPU)."""
    t = tc.per_layer[layer]
    arch, weights, _ = t.inference_state()
    out = {"W_enc": weights["W_enc"].T, "W_dec": weights["W_dec"], "b_enc": weights["b_enc"],
           "b_dec": weights["b_dec"]}
    if "W_skip" in weights:
        out["W_skip"] = weights["W_skip"].T  # circuit-tracer computes x @ W_skip.T, the workbench x @ W_skip
    if arch == "jumprelu":
        out[THRESHOLD] = weights["threshold"].expand(t.d_sae)
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def check_exportable(tc: Transcoders) -> None:
    """InputError for a set circuit-tracer's file loader cannot represent exactly."""
    if tc.per_layer is None:
        raise InputError("circuit-tracer's transcoder_set layout holds per-layer transcoders; this set is one "
                         "cross-layer transcoder. Train per-layer ones (`workbench transcoder train` without "
                         "--cross-layer) to export.")
    for l in range(tc.n_layers):
        arch = tc.per_layer[l].cfg.arch
        if arch not in EXPORTABLE:
            raise InputError(f"Layer {l}'s transcoder is {arch!r}, which circuit-tracer cannot represent: its file "
                             "loader builds a ReLU or a JumpReLU only, so a TopK transcoder would load as a ReLU and "
                             "fire other features. Export transcoders trained with --arch batchtopk (a JumpReLU with "
                             "its learned threshold at inference, exactly), jumprelu or relu.")
    archs = {EXPORTABLE[tc.per_layer[l].cfg.arch] for l in range(tc.n_layers)}
    skips = {bool(tc.per_layer[l].cfg.skip) for l in range(tc.n_layers)}
    if len(skips) > 1:
        raise InputError("Some layers have a skip connection and others not; circuit-tracer takes one setting for "
                         "the whole set (from layer 0).")
    if len(archs) > 1:
        raise InputError(f"The layers mix {sorted(archs)}; export a set of one kind.")


def export_circuit_tracer(tc: Transcoders, folder: Union[str, Path]) -> Path:
    """Write `tc` as circuit-tracer's `transcoder_set` files into `folder` (built beside it, then
    renamed; a folder that holds files the workbench did not write is refused). Returns the folder."""
    check_exportable(tc)
    first = tc.per_layer[0]
    config = {
        "model_kind": "transcoder_set",
        "model_name": tc.model_name,
        "scan": f"workbench/{tc.model_name or 'transcoders'}",
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
        "activation_function": EXPORTABLE[first.cfg.arch],
        "skip_connection": bool(first.cfg.skip),
        "transcoders": [layer_file(l) for l in range(tc.n_layers)],
        "workbench_format": FORMAT_VERSION,
        "workbench_architecture": first.cfg.arch,
        "workbench_input_hooks": [tc.in_hook(l) for l in range(tc.n_layers)],
    }

    layers = [circuit_tracer_tensors(tc, l) for l in range(tc.n_layers)]

    def build(tmp: Path) -> None:
        for l, tensors in enumerate(layers):
            save_file(tensors, str(tmp / layer_file(l)))
        (tmp / CIRCUIT_TRACER_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))

    needed = sum(v.numel() * v.element_size() for tensors in layers for v in tensors.values())
    return write_output_folder(Path(folder), "circuit-tracer transcoders", build, needed_bytes=needed)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CIRCUIT_TRACER_CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {folder} is not a circuit-tracer transcoder folder.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path} could not be read as YAML ({err}).") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a mapping (model_kind, transcoders, feature_input_hook, ...).")
    return data


def _layer_paths(folder: Path, config: dict[str, Any]) -> list[Path]:
    """Each layer's file, inside `folder` (circuit-tracer's list of paths, one per layer)."""
    where = folder / CIRCUIT_TRACER_CONFIG_FILE
    if config.get("model_kind") != "transcoder_set":
        raise CheckpointError(f"{where}: model_kind {config.get('model_kind')!r} is not 'transcoder_set'; the "
                              "workbench reads circuit-tracer's per-layer transcoder sets only (not cross-layer "
                              "transcoders).")
    if "workbench_format" in config and config["workbench_format"] != FORMAT_VERSION:
        raise CheckpointError(f"{where} was written by an older workbench export (format "
                              f"{config['workbench_format']!r}) that circuit-tracer could not load; export the "
                              "transcoders again with `workbench transcoder export`.")
    paths = config.get("transcoders")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise CheckpointError(f"{where}: 'transcoders' should be a non-empty list of file paths, one per layer, got "
                              f"{paths!r}" + (" (a list of {layer, path} entries is the first workbench export's "
                                              "layout: export again)" if isinstance(paths, list) else "") + ".")
    root = folder.resolve()
    out = []
    for l, p in enumerate(paths):
        if p.startswith("hf://"):
            raise CheckpointError(f"{where}: layer {l} is on the Hugging Face hub ({p}); this machine reads local "
                                  "files only. Download the files next to config.yaml and list their names.")
        path = (folder / p).resolve()
        if Path(p).is_absolute() or root not in path.parents:
            raise CheckpointError(f"{where}: layer {l}'s path {p!r} leads outside {folder}; the files must sit in the "
                                  "folder of config.yaml, named relative to it.")
        out.append(path)
    return out


def load_circuit_tracer(folder: Union[str, Path], model: Optional[HookedModel] = None,
                        model_name: str = "") -> Transcoders:
    """circuit-tracer's per-layer ReLU or JumpReLU transcoder files (as `export_circuit_tracer` writes
    them, or circuit-tracer's own) as workbench `Transcoders`. With `model`, the input hooks are that
    model's MLP inputs (ln1's output on GPT-J and Phi); without, ln2's."""
    folder = Path(folder)
    config = _read_config(folder)
    paths = _layer_paths(folder, config)
    where = folder / CIRCUIT_TRACER_CONFIG_FILE
    hook_in, hook_out = config.get("feature_input_hook"), config.get("feature_output_hook")
    if hook_in != INPUT_HOOK:
        raise CheckpointError(
            f"{where}: feature_input_hook is {hook_in!r}; the workbench's transcoders read the MLP's input after the "
            f"norm's weight and bias, circuit-tracer's {INPUT_HOOK!r}. "
            + ("TransformerLens's 'ln2.hook_normalized' is taken before ln2's weight and bias, so these "
               "transcoders read another vector." if hook_in == "ln2.hook_normalized" else ""))
    if hook_out not in OUTPUT_HOOKS:
        raise CheckpointError(f"{where}: feature_output_hook is {hook_out!r}; transcoders predict the MLP's output "
                              f"({' or '.join(map(repr, OUTPUT_HOOKS))}).")
    declared = config.get("activation_function", "relu")
    if declared not in ("relu", "jumprelu", "jump_relu"):
        raise CheckpointError(f"{where}: activation_function is {declared!r}. circuit-tracer's file loader ignores "
                              "that field and builds a ReLU (or a JumpReLU where the files hold a threshold), so these "
                              "transcoders would not compute what they were trained to; the workbench refuses rather "
                              "than guess (a TopK set also needs its k).")
    hooks = mlp_input_hooks(model) if model is not None else [input_hook(l) for l in range(len(paths))]
    if len(hooks) != len(paths):
        raise InputError(f"{where} lists {len(paths)} layers; the model has {len(hooks)}.")
    name = str(config.get("model_name") or model_name)
    per_layer = {l: _layer(path, l, hooks[l], name) for l, path in enumerate(paths)}
    return Transcoders(name, len(per_layer), per_layer=per_layer)


def _layer(path: Path, layer: int, hook: str, model_name: str):
    """One layer's file as a workbench SAE (relu, or jumprelu when it has a threshold)."""
    try:
        w = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (listed for layer {layer} in "
                              f"{CIRCUIT_TRACER_CONFIG_FILE}).") from None
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"{path} could not be read as safetensors ({err}).") from err
    for key in ("log_thresholds", "threshold"):
        if key in w:
            raise CheckpointError(f"{path} holds {key!r}, which circuit-tracer's file loader does not read (it reads "
                                  f"{THRESHOLD!r}); this is not a file circuit-tracer would load as it is.")
    b_enc, b_dec = w.get("b_enc"), w.get("b_dec")
    if b_enc is None or b_dec is None or b_enc.ndim != 1 or b_dec.ndim != 1:
        raise CheckpointError(f"{path}: b_enc and b_dec should be vectors ([d_tc] and [d_model]); the file is "
                              "damaged or not a transcoder.")
    d_tc, d_model = int(b_enc.shape[0]), int(b_dec.shape[0])
    shapes = {"W_enc": (d_tc, d_model), "W_dec": (d_tc, d_model), "W_skip": (d_model, d_model), THRESHOLD: (d_tc,)}
    for key in ("W_enc", "W_dec", *(k for k in ("W_skip", THRESHOLD) if k in w)):
        got = tuple(w[key].shape) if key in w else "missing"
        if got != shapes[key]:
            raise CheckpointError(f"{path}: {key} should have shape {shapes[key]} (circuit-tracer's layout, with "
                                  f"d_tc {d_tc} and d_model {d_model} from b_enc and b_dec), got {got}.")
    extra = sorted(set(w) - {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", THRESHOLD})
    if extra:
        raise CheckpointError(f"{path} holds tensors circuit-tracer does not read ({', '.join(extra)}).")
    if not all(bool(torch.isfinite(v).all()) for v in w.values()):
        raise CheckpointError(f"{path} holds NaN or infinite weights; the file is damaged.")
    arch = "jumprelu" if THRESHOLD in w else "relu"
    t = make_sae(SAEConfig(d_in=d_model, d_sae=d_tc, architecture=arch, hook_name=hook,
                           target_hook=output_hook(layer), skip="W_skip" in w, model_name=model_name))
    with torch.no_grad():
        t.W_enc.copy_(w["W_enc"].T)
        t.W_dec.copy_(w["W_dec"])
        t.b_enc.copy_(w["b_enc"])
        t.b_dec.copy_(w["b_dec"])
        if "W_skip" in w:
            t.W_skip.copy_(w["W_skip"].T)
        if arch == "jumprelu":
            t.threshold.copy_(w[THRESHOLD])
    return t.eval()
