"""The `workbench` command.

    workbench report                          every analysis on the shipped models -> ./reports/<time>/
    workbench run <analysis> [--model M] [--out DIR] [--<setting> VALUE ...]
    workbench train <preset | config.json> [--out DIR] [--resume]
    workbench info <model>                    hook names and shapes, config, parameters
    workbench sae train --model M --hook H [--arch topk --k 32 ...]   train an SAE on activations
    workbench sae cache --model M --hook H --out DIR                  write activations to a disk store
    workbench transcoder train --model M [--d-tc 1024 --k 32 --skip --cross-layer ...]   transcoders for every MLP
    workbench transcoder export --transcoders DIR --out DIR          circuit-tracer's per-layer layout
    workbench list                            presets, shipped models and analyses
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

from workbench.config import add_config_args, config_overrides
from workbench.errors import ConfigError, WorkbenchError
from workbench.train.lifecycle import TrainingInterrupted

DEVICE_HELP = "auto (cuda if available, else cpu), cpu or cuda"


def _resume_command(prog: str, argv: list[str], out: Path) -> str:
    """The exact command that resumes this run: the user's own arguments, with --out and --resume."""
    args = list(argv)
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([*prog.split(), *args])


def cmd_run(argv: list[str]) -> int:
    from workbench.artifacts import check_output_folder
    from workbench.model.loading import load
    from workbench.report.pipeline import (
        default_report_dir,
        get_analysis,
        make_config,
        registry,
        run_analysis,
        write_report,
    )

    if not argv or argv[0].startswith("-"):
        names = ", ".join(sorted(registry()))
        print(f"usage: workbench run <analysis> [--model M] [--out DIR] [options]\nanalyses: {names}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    analysis = get_analysis(argv[0])
    parser = argparse.ArgumentParser(prog=f"workbench run {analysis.name}", description=analysis.description)
    if analysis.uses_model:
        default_model = analysis.default_models[0] if analysis.default_models else None
        parser.add_argument("--model", default=default_model,
                            help=f"preset name, model folder, or hf:<name or path> (default: {default_model})")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default ./reports/<analysis>-<time>)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_config_args(parser, analysis.config_cls)
    args = parser.parse_args(argv[1:])
    cfg = make_config(analysis, config_overrides(args, analysis.config_cls))
    out = args.out or default_report_dir().with_name(f"{analysis.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_output_folder(out, "report")  # refuse a bad --out before the work, not after
    model_ref = getattr(args, "model", None)
    model = load(model_ref, device=args.device) if analysis.uses_model and model_ref is not None else None
    section = run_analysis(analysis.name, model, cfg, device=args.device,
                           model_label=str(model_ref) if model is not None else None)
    path = write_report(out, [section], title=f"{analysis.name} · {section.model}")
    print(f"Wrote {path}/index.html, metrics.json and {len(section.figures)} figures in {path}/figures")
    for line in section.headlines:
        print(f"  {line}")
    print(f"Open {path / 'index.html'}")
    return 0


def cmd_report(argv: list[str]) -> int:
    from workbench.report.pipeline import report_all

    parser = argparse.ArgumentParser(prog="workbench report",
                                     description="Run every analysis on the shipped toy models.")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default ./reports/<time>)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--prompt", default="", help="your own prompt for the attention viewer and the logit lens "
                                                     "(shown first on the models' page)")
    args = parser.parse_args(argv)
    report_all(args.out, device=args.device, settings={"model-card": {"prompt": args.prompt}} if args.prompt else None)
    return 0


def cmd_train(argv: list[str]) -> int:
    from workbench.train.lm import load_train_config, train
    from workbench.train.modular import load_modular_config

    parser = argparse.ArgumentParser(prog="workbench train", description="Train a preset or a config JSON.")
    parser.add_argument("config", help="preset name in models/ or a path to a TrainConfig JSON")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default ./runs/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--steps", type=int, default=None, help="override n_steps")
    parser.add_argument("--seed", type=int, default=None, help="override the model and data seeds")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="override precision")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the transformer blocks (a few seconds of compiling; faster bf16 steps)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if load_modular_config(args.config) is not None:  # an algorithmic task has its own full-batch trainer
        return cmd_train_modular(args, argv)
    name, cfg = load_train_config(args.config)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, n_steps=args.steps)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seed=args.seed),
                                  data=dataclasses.replace(cfg.data, seed=args.seed))
    if args.precision is not None:
        cfg = dataclasses.replace(cfg, precision=args.precision)
    if args.compile:
        cfg = dataclasses.replace(cfg, compile=True)
    return _run_training(train, cfg, name, args, argv)


def cmd_train_modular(args: argparse.Namespace, argv: list[str]) -> int:
    """`workbench train` for a modular-addition preset or config (workbench.train.modular)."""
    from workbench.train.modular import load_modular_config, train_modular

    name, cfg = load_modular_config(args.config)
    if args.precision is not None:
        raise ConfigError("--precision: modular-addition training is fp32 only (its losses reach 1e-7).")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in {"n_steps": args.steps, "seed": args.seed,
                                                        "data_seed": args.seed}.items() if v is not None})
    return _run_training(train_modular, cfg, name, args, argv)


def _run_training(trainer, cfg: Any, name: str, args: argparse.Namespace, argv: list[str]) -> int:
    """Run `trainer` (train.lm.train or train.modular.train_modular) into --out; 130 after Ctrl-C."""
    out = args.out or Path("runs") / name
    try:
        trainer(cfg, out, name=name, resume=args.resume, device=args.device, progress=not args.no_progress,
                resume_command=_resume_command("workbench train", argv, out))
    except TrainingInterrupted as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 130
    return 0


def cmd_info(argv: list[str]) -> int:
    from workbench.model.loading import load

    parser = argparse.ArgumentParser(prog="workbench info", description="Hook names, shapes and config of a model.")
    parser.add_argument("model", help="preset name, model folder, or hf:<name or path>")
    parser.add_argument("--device", default="cpu", help=DEVICE_HELP)
    parser.add_argument("--seq-len", type=int, default=8, help="sequence length used for the shapes")
    args = parser.parse_args(argv)
    model = load(args.model, device=args.device)
    print(f"{args.model}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    cfg = model.cfg
    for key in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "normalization_type"):
        print(f"  {key:<20} {getattr(cfg, key, None)}")
    import torch

    tokens = torch.zeros(1, args.seq_len, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    print(f"hooks (shapes for batch 1 × {args.seq_len} tokens):")
    for name in cache:
        print(f"  {name:<40} {list(cache[name].shape)}")
    return 0


def cmd_list(argv: list[str]) -> int:
    from workbench.model.loading import models_dir, preset_names, shipped_models
    from workbench.report.pipeline import registry

    argparse.ArgumentParser(prog="workbench list", description="List the presets (trained or not) in models/ "
                            "and the analyses `workbench run` knows.").parse_args(argv)
    shipped = set(shipped_models())
    print(f"presets ({models_dir()}):")
    for name in preset_names():
        print(f"  {name:<16} {'trained' if name in shipped else 'not trained'}")
    print("analyses:")
    for a in registry().values():
        print(f"  {a.name:<16} {a.description}")
    return 0


def _text_source(args: argparse.Namespace, model: Any) -> tuple[Any, dict[str, Any]]:
    """(BOS-first rows of --text, whose position 0 training leaves out; the stream's options)."""
    from workbench.cache.rows import text_rows

    rows = text_rows(model, args.text, args.rows, min(int(model.cfg.n_ctx), args.seq_len))
    return rows, {"buffer_batches": args.buffer_batches, "exclude_special": not args.keep_special,
                  "skip_first": 0 if args.keep_first else 1}


def _sae_parser(sub: str, argv: list[str]) -> argparse.ArgumentParser:
    """The options of `workbench sae train` (or `cache`, which has the data options only)."""
    parser = argparse.ArgumentParser(prog=f"workbench sae {sub}")
    parser.add_argument("--model", required=sub == "cache" or "--store" not in argv,
                        help="preset name, model folder, or hf:<name or path>")
    parser.add_argument("--hook", action="append", required=True, help="hook name (repeat for several)")
    parser.add_argument("--out", type=Path, required=sub == "cache", help="output folder")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--rows", type=int, default=2000, help="rows of text to read")
    parser.add_argument("--text", default="stdlib", help="text to read: stdlib (the standard library's source), a file "
                        "or folder of text files, a dataset saved with datasets' save_to_disk, or hub:<name> (online)")
    parser.add_argument("--buffer-batches", type=int, default=8,
                        help="batches held by the shuffling buffer that mixes activations across rows")
    parser.add_argument("--keep-special", action="store_true",
                        help="train on special tokens too (BOS, EOS, padding are left out by default)")
    parser.add_argument("--keep-first", action="store_true",
                        help="train on each row's first position too (left out by default: a BOS, or an outlier)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row (capped at n_ctx)")
    parser.add_argument("--n-tokens", type=int, default=None, help="tokens to train on / to store")
    parser.add_argument("--no-progress", action="store_true")
    if sub == "train":
        parser.add_argument("--config", type=Path, default=None, help="SAETrainConfig JSON (flags override it)")
        parser.add_argument("--store", type=Path, default=None, help="train from an activation store instead")
        parser.add_argument("--arch", default=None, help="relu, topk, batchtopk or jumprelu")
        parser.add_argument("--k", type=int, default=None)
        parser.add_argument("--d-sae", type=int, default=None)
        parser.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_in (without --d-sae)")
        parser.add_argument("--l1", type=float, default=None, help="sparsity coefficient")
        parser.add_argument("--lr", type=float, default=None)
        parser.add_argument("--batch-size", type=int, default=None)
        parser.add_argument("--resume", action="store_true")
        parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                            help="bf16: forward pass and losses under bfloat16 autocast (fp32 weights and optimizer)")
        parser.add_argument("--wandb", default="", metavar="PROJECT",
                            help="also log to Weights & Biases under this project (needs pip install wandb)")
        parser.add_argument("--spread-hooks", action="store_true",
                            help="under torchrun: deal the hooks' SAEs over the processes instead of splitting batches")
    return parser


def cmd_sae(argv: list[str]) -> int:
    import torch

    from workbench.cache.activations import ActivationStore, check_hooks
    from workbench.cache.rows import check_rows
    from workbench.model.loading import load, resolve_device
    from workbench.sae.sharding import RankShare, text_batches
    from workbench.train.distributed import init_from_env

    usage = "usage: workbench sae {train,cache} --model M --hook H [options]  (--help on each)"
    if not argv or argv[0] not in ("train", "cache"):
        print(usage)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    sub, argv = argv[0], argv[1:]
    args = _sae_parser(sub, argv).parse_args(argv)
    check_rows(args.rows, args.seq_len)  # before the model loads: a bad --rows or --seq-len is an error at once
    dist = init_from_env(resolve_device(args.device)) if sub == "train" else None
    device = str(resolve_device(args.device))
    if dist is not None and dist.active and device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"  # one GPU per rank (LOCAL_RANK)
    model = load(args.model, device=device) if args.model else None
    if model is not None:
        check_hooks(model, args.hook)
    if sub == "train":
        return _sae_train(args, argv, model, dist, device)
    n = args.n_tokens or 1_000_000
    rows, stream = _text_source(args, model)
    store = ActivationStore.write(args.out, text_batches(model, rows, RankShare(args.hook, 4096), 0, **stream), n)
    print(f"Wrote {store.n_tokens:,} activations of {', '.join(args.hook)} to {args.out} "
          f"({len(store.manifest['shards'])} shards, manifest.json)")
    return 0


def _sae_train(args: argparse.Namespace, argv: list[str], model: Any, dist: Any, device: str) -> int:
    """`workbench sae train`: one SAE per --hook, data parallel under torchrun (`workbench.sae.sharding`)."""
    from workbench.cache.activations import ActivationStore
    from workbench.sae.modules import make_sae
    from workbench.sae.sharding import rank_share, store_batches, text_batches
    from workbench.sae.training import hook_widths, train_configs, train_saes, wandb_logger
    from workbench.train.distributed import restart_count, shutdown

    base = _read_json_object(args.config) if args.config else {}
    hooks = list(dict.fromkeys(args.hook))
    store = ActivationStore(args.store) if args.store else None
    configs = train_configs(hook_widths(hooks, model, store), base,
                            sae={"architecture": args.arch, "k": args.k, "l1_coefficient": args.l1},
                            train={"n_tokens": args.n_tokens, "lr": args.lr, "batch_size": args.batch_size,
                                   "precision": args.precision},
                            d_sae=args.d_sae, expansion=args.expansion, model_name=args.model,
                            where=str(args.config) if args.config else "the command line")
    cfg = configs[hooks[0]]
    name = hooks[0].replace(".", "_") if len(hooks) == 1 else f"{len(hooks)}-hooks"
    out = args.out or Path("runs") / f"sae-{name}-{cfg.sae.arch}"
    spread = args.spread_hooks and dist.active
    share = rank_share(dist, hooks, cfg.batch_size, spread)  # under torchrun: this rank's hooks, batch and rows
    if store is not None:
        batches = store_batches(store, share, cfg.seed)
    else:
        rows, stream = _text_source(args, model)
        batches = text_batches(model, rows, share, cfg.seed, **stream)
    resume = args.resume or restart_count() > 0  # torchrun --max-restarts
    saes = {h: make_sae(c.sae, seed=c.seed).to(device) for h, c in configs.items()}  # train_saes keeps a rank's own
    on_log = wandb_logger(args.wandb, {"hooks": hooks, **cfg.to_dict()}) if args.wandb and dist.is_main else None
    data = ({"store": str(args.store)} if store is not None else  # saved with the run: --resume must not change it
            {"text": args.text, "rows": args.rows, "seq_len": args.seq_len, "keep_special": args.keep_special,
             "keep_first": args.keep_first, "buffer_batches": args.buffer_batches})
    try:
        train_saes(saes, batches, cfg, out=out, resume=resume, progress=not args.no_progress,
                   resume_command=_resume_command("workbench sae train", argv, out), dist=dist, spread=spread,
                   on_log=on_log, data=data)
    except TrainingInterrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


def cmd_transcoder(argv: list[str]) -> int:
    from workbench.errors import InputError
    from workbench.model.loading import load
    from workbench.sae.circuit_tracer_format import export_circuit_tracer
    from workbench.sae.transcoders import load_transcoders, train_transcoders
    from workbench.train.distributed import under_torchrun

    usage = "usage: workbench transcoder {train,export} [options]  (--help on each)"
    if not argv or argv[0] not in ("train", "export"):
        print(usage)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    sub, argv = argv[0], argv[1:]
    parser = argparse.ArgumentParser(prog=f"workbench transcoder {sub}")
    if sub == "export":
        parser.add_argument("--transcoders", type=Path, required=True, help="a folder written by transcoder train")
        parser.add_argument("--out", type=Path, required=True,
                            help="a new folder for circuit-tracer's files (one holding other files is refused)")
        args = parser.parse_args(argv)
        folder = export_circuit_tracer(load_transcoders(args.transcoders), args.out)
        print(f"Wrote circuit-tracer transcoders (layer_<l>.safetensors, config.yaml) to {folder}; load them from "
              "inside that folder (circuit-tracer opens the listed file names relative to the working directory).")
        return 0
    parser.add_argument("--model", required=True, help="preset name, model folder, or hf:<name or path>")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/transcoders-<model>)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--d-tc", type=int, default=None,
                        help="features per layer, a positive integer (default: expansion × d_model)")
    parser.add_argument("--expansion", type=int, default=8,
                        help="d_tc = expansion × d_model without --d-tc, a positive integer (default: 8)")
    parser.add_argument("--arch", default="topk", help="topk (with AuxK), relu, jumprelu or batchtopk")
    parser.add_argument("--k", type=int, default=32, help="features kept per token and layer (topk)")
    parser.add_argument("--l1", type=float, default=5.0, help="sparsity coefficient (relu, jumprelu)")
    parser.add_argument("--skip", action="store_true", help="add a linear skip connection x W_skip")
    parser.add_argument("--cross-layer", action="store_true", help="one cross-layer transcoder for all layers")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: forward pass and losses under bfloat16 autocast")
    parser.add_argument("--n-tokens", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rows", type=int, default=2000, help="rows of the model's training text to read")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for flag, value in (("--d-tc", args.d_tc), ("--expansion", args.expansion)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}. Leave --d-tc out for --expansion × "
                              "d_model features per layer (8 × d_model by default).")
    if under_torchrun():  # each rank would train every layer into the same folder
        raise InputError("`workbench transcoder train` trains in one process (it splits no batches between "
                         "processes), and under torchrun every rank would train all of it into the same --out. Run it "
                         "without torchrun: `workbench transcoder train ...` (for data-parallel training of one "
                         "layer's dictionary, use `workbench sae train` under torchrun).")
    model = load(args.model, device=args.device)
    name = Path(str(args.model)).name.replace(":", "_")
    out = args.out or Path("runs") / f"transcoders-{name}"
    try:  # the set records the model's name as `model_name_of` reads it, so circuit-tracing can check it
        tc, _ = train_transcoders(model, args.d_tc or args.expansion * int(model.cfg.d_model), out, args.arch, args.k,
                                  args.skip, args.cross_layer, args.l1, args.n_tokens, args.batch_size, args.lr,
                                  args.rows, args.seed, args.resume, not args.no_progress, "",
                                  _resume_command("workbench transcoder train", argv, out),
                                  precision=args.precision)
    except TrainingInterrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    print(f"Wrote {tc.kind} transcoders for {tc.n_layers} layers to {out} (transcoders.json); use them with "
          f"`workbench run circuit-tracing --model {args.model} --transcoders {out}`")
    return 0


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, or a ConfigError naming the file."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"Could not read {path} as JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object ({{...}}), got {type(data).__name__}.")
    return data


COMMANDS = {"run": cmd_run, "report": cmd_report, "train": cmd_train, "info": cmd_info, "list": cmd_list,
            "sae": cmd_sae, "transcoder": cmd_transcoder}


def _same_command_on_every_rank(argv: list[str]) -> None:
    """Under torchrun: join the process group (as the command will, for the device it names) and stop
    every rank unless all were started with the same settings (`distributed.check_same_settings`)."""
    from workbench.model.loading import resolve_device
    from workbench.train.distributed import check_same_settings, command_settings, init_from_env

    device = command_settings(argv, may_differ=()).get("--device") or ["auto"]
    check_same_settings(init_from_env(resolve_device(device[-1])), command_settings(argv))


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `workbench` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from workbench.train.distributed import shutdown, under_torchrun

    try:
        if under_torchrun():
            _same_command_on_every_rank(argv)
        code = COMMANDS[argv[0]](argv[1:])
    except TrainingInterrupted as err:  # Ctrl-C inside any training (a study's too): the resume hint, exit 130
        shutdown()  # leave torchrun's process group (if joined) without waiting for the other ranks
        print(f"\n{err}", file=sys.stderr)
        return 130
    except WorkbenchError as err:
        shutdown()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        shutdown()
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a full disk in a write that has no OutOfSpaceError of its own: still no traceback
        from workbench.artifacts import is_out_of_space

        if not is_out_of_space(err):
            raise
        shutdown()
        print(f"error: The disk filled ({err}). Free some space (or choose a folder on another disk) and run the "
              "command again.", file=sys.stderr)
        return 2
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
