"""Peers mode: the workbench against the real peer libraries, each in a virtual environment of its own.

Optional, and run by hand only (not by CI or the test suite): the peers cannot be installed beside
TransformerLens 4, so each gets its own venv, and every figure is measured in a separate process.

    python benchmarks/peers.py [--rounds 5] [--only tl3,saelens,sparsify] [--venvs DIR] [--steps N]
    python benchmarks/peers.py --setup-only          # only create / check the venvs

Set-up (once; reused afterwards). Under --venvs (default ~/.cache/workbench-peers/) one venv per peer,
made with `python -m venv`, then `pip install torch==2.13.0` first (the CPU build this machine's pip
finds; a bare `torch` would pull gigabytes of CUDA wheels), then the peer pinned, with torch held at
that version by a constraints file:

    tl3        transformer-lens==3.9.0
    saelens    sae-lens==6.54.12
    sparsify   eai-sparsify==1.3.3

Each venv folder gets a marker file; a folder without it was not made by this script and is never
used, changed or deleted. A failed install names the venv and the pip command to retry.

What it measures (CPU, random-initialised models and data, fixed seeds, no network). Every workload
runs in two worker processes (benchmarks/peer_workers/): the workbench side under this interpreter,
the peer side under its venv's python. Each builds its model or SAE, warms up, then times --steps
steps whenever asked and prints a JSON line with tokens/s. Rounds are interleaved (workbench, peer,
workbench, peer, ...) so that noise on the machine hits both; each ratio is taken per round and
reported as the median and the spread (min-max) over the rounds.

    tl3       the workbench `Transformer` against TL3's `HookedTransformer`, the config of
              benchmarks/train_speed.py (2 layers, d_model 256, 8 heads, n_ctx 256, d_vocab 1024,
              LayerNorm, gelu; attention-only and with d_mlp 1024): training steps on 16 x 256 random
              tokens (loss via return_type="loss", AdamW lr 1e-4, clip_grad_norm 1.0), fp32 and bf16
              autocast. And `run_with_cache` with every hook against the same library's plain forward
              (no_grad, d_mlp 1024): each library's cached / plain time and workbench / TL3 speed of
              the cached forward. And `generate` with the KV cache (64 new tokens sampled after a
              random 32-token prompt, stop_at_eos=False) on the shipped attn-only-2l and gelu-2l
              weights at batch 1 and 16, and after a 512-token prompt on attn-only-2l with its W_pos
              tiled to n_ctx 640 (benchmarks/peer_workers/worker_tl_generate.py).
    saelens   one training step of SAELens's own training SAEs (`TopKTrainingSAE` with its AuxK loss,
              `StandardTrainingSAE` with its L1 loss, via `training_forward_pass` as its trainer calls
              it, Adam lr 1e-3) against the workbench trainer (`_Trainer.train_step`, as in
              benchmarks/sae_speed.py): d_in 256, d_sae 4096, k 32, batch 4096.
    sparsify  one training step of sparsify's TopK `SparseCoder` as its Trainer takes it (forward with
              its FVU and AuxK loss on the dead latents, backward, decoder-norm handling, Adam) against
              the workbench's TopK trainer, at 256 -> 4096 and 512 -> 16384, k 32, batch 4096.

Dead latents (AuxK): a fixed random quarter of the latents (--dead-fraction) is dead at every
TopK step, on both sides, and the same latents: the workbench trainer's tokens-since-fired counter
is set before each step so that exactly they are past its dead window, and the peer gets the same
mask where its trainer would compute it. The AuxK loss then runs over k_aux = d_in / 2 latents on
both sides (more are dead than that, so its cost does not depend on the fraction).

Set-up took 3 min 52 s for the three venvs on the 2-core development machine (4.8 GB on disk, torch
in each); it happens once. A run starts two processes per workload (about 15 s of imports and
building each time) and ends with one JSON line holding every figure; with --rounds 1 --steps 1 the
nine workloads took 3 min 13 s, and the default 5 rounds took 6 min 26 s on the 2-core machine. The
five generate workloads added later take about 1 min at 5 rounds (benchmarks/generate_speed.py --peers
runs only them).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "peer_workers"
TORCH_PIN = "torch==2.13.0"
MARKER = ".workbench-peers.json"
"""The file this script writes into each venv it creates; without it a folder is not its own."""
DEFAULT_VENVS = Path("~/.cache/workbench-peers")


@dataclass(frozen=True)
class Workload:
    """One comparison: the same worker script and arguments on both sides."""

    name: str
    worker: str
    args: tuple[str, ...]
    steps: int
    """Default steps (or forward passes) timed per round; --steps overrides."""
    kind: str = "train"
    """'train': tok/s per side and their ratio; 'cache': plain and cached forwards per side."""


@dataclass(frozen=True)
class Peer:
    name: str
    requirement: str
    module: str
    """Its import name, to check the install."""
    workloads: tuple[Workload, ...] = field(default_factory=tuple)


def _tl(name: str, d_mlp: int, precision: str) -> Workload:
    return Workload(name, "worker_tl.py", ("--task", "train", "--d-mlp", str(d_mlp), "--precision", precision), 4)


def _generate(model: str, batch: int, prompt: int = 32, n_ctx: Optional[int] = None) -> Workload:
    """`generate` of 64 new tokens after a random prompt, on a shipped model's weights."""
    name = f"generate_{model.replace('-', '_')}_b{batch}" + (f"_prompt{prompt}" if n_ctx else "")
    args = ("--model", model, "--batch", str(batch), "--prompt", str(prompt), "--new", "64")
    return Workload(name, "worker_tl_generate.py", args + (("--n-ctx", str(n_ctx)) if n_ctx else ()), 3)


GENERATE_WORKLOADS = (_generate("attn-only-2l", 1), _generate("attn-only-2l", 16), _generate("gelu-2l", 1),
                      _generate("gelu-2l", 16), _generate("attn-only-2l", 1, prompt=512, n_ctx=640))
"""TL3's generate against the workbench's (also run by benchmarks/generate_speed.py --peers)."""


PEERS: dict[str, Peer] = {
    "tl3": Peer("tl3", "transformer-lens==3.9.0", "transformer_lens", (
        _tl("train_attn_only_fp32", 0, "fp32"),
        _tl("train_attn_only_bf16", 0, "bf16"),
        _tl("train_mlp_fp32", 1024, "fp32"),
        _tl("train_mlp_bf16", 1024, "bf16"),
        Workload("run_with_cache_all_hooks", "worker_tl.py", ("--task", "cache", "--d-mlp", "1024"), 10, "cache"),
        *GENERATE_WORKLOADS,
    )),
    "saelens": Peer("saelens", "sae-lens==6.54.12", "sae_lens", (
        Workload("topk_256x4096", "worker_saelens.py", ("--arch", "topk"), 5),
        Workload("l1_256x4096", "worker_saelens.py", ("--arch", "l1"), 5),
    )),
    "sparsify": Peer("sparsify", "eai-sparsify==1.3.3", "sparsify", (
        Workload("topk_256x4096", "worker_sparsify.py", ("--d-in", "256", "--d-sae", "4096"), 5),
        Workload("topk_512x16384", "worker_sparsify.py", ("--d-in", "512", "--d-sae", "16384"), 3),
    )),
}


class SetupError(Exception):
    """A venv could not be made or used; the message says what to do."""


# -- arguments ------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/peers.py", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per workload (default 5)")
    parser.add_argument("--only", type=_peer_list, default=list(PEERS),
                        help=f"comma-separated peers to run, of {','.join(PEERS)} (default: all)")
    parser.add_argument("--venvs", type=Path, default=DEFAULT_VENVS,
                        help=f"folder holding one venv per peer (default {DEFAULT_VENVS}/)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps (or forward passes) timed per round, for every workload (default: each "
                             "workload's own, 3 to 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the first round (default 2)")
    parser.add_argument("--dead-fraction", type=float, default=0.25,
                        help="share of latents held dead in the TopK workloads, for AuxK (default 0.25)")
    parser.add_argument("--setup-only", action="store_true", help="create or check the venvs, then stop")
    args = parser.parse_args(argv)
    for name in ("rounds", "warmup"):
        if getattr(args, name) < (1 if name == "rounds" else 0):
            parser.error(f"--{name} must be at least {1 if name == 'rounds' else 0}")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 0 <= args.dead_fraction < 1:
        parser.error("--dead-fraction must be in [0, 1)")
    args.venvs = args.venvs.expanduser()
    existing = next(p for p in (args.venvs, *args.venvs.parents) if p.exists())  # "/" always exists
    if not existing.is_dir():
        parser.error(f"--venvs {args.venvs}: {existing} is a file, not a folder; pass a folder (new or made by "
                     "this script) to hold one venv per peer.")
    return args


def _peer_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(unknown) or '(none given)'}; choose from "
                                         f"{', '.join(PEERS)}")
    return list(dict.fromkeys(names))


# -- venvs ----------------------------------------------------------------------------------------
def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def read_marker(folder: Path) -> Optional[dict[str, Any]]:
    """The marker this script wrote in `folder`, or None when the folder does not exist. A folder that
    exists without a valid marker was not made here: SetupError, and nothing in it is touched."""
    if not folder.exists():
        return None
    marker = folder / MARKER
    try:
        data = json.loads(marker.read_text())
        if not isinstance(data, dict) or data.get("created_by") != "workbench benchmarks/peers.py":
            raise ValueError
    except (OSError, ValueError):
        raise SetupError(f"{folder} exists but was not created by benchmarks/peers.py (no {MARKER} in it), so it "
                         "is left alone: nothing there is used, changed or deleted. Pass another --venvs, or move "
                         "that folder away yourself.") from None
    return data


def write_marker(folder: Path, data: dict[str, Any]) -> None:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"created_by": "workbench benchmarks/peers.py", **data}, indent=1))
    tmp.replace(folder / MARKER)


def pip_commands(peer: Peer, folder: Path) -> list[list[str]]:
    """torch first (the local CPU build), then the peer with torch held at that version."""
    py = str(venv_python(folder))
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    return [pip + [TORCH_PIN], pip + ["-c", str(folder / "constraints.txt"), peer.requirement]]


def ensure_venv(peer: Peer, root: Path, run: Callable[..., Any] = subprocess.run) -> Path:
    """The python of `peer`'s venv under `root`, created and installed on first use. Returns quickly
    when the marker says it is installed with the same pins."""
    folder = root / peer.name
    marker = read_marker(folder)
    want = {"peer": peer.name, "requirement": peer.requirement, "torch": TORCH_PIN}
    if (marker is not None and marker.get("installed") and all(marker.get(k) == v for k, v in want.items())
            and venv_python(folder).exists()):
        return venv_python(folder)
    if marker is None:
        print(f"[{peer.name}] creating a venv in {folder}", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:  # someone made it in between: then it is not ours
            raise SetupError(f"{folder} appeared while this script was about to create it; it is left alone. "
                             "Run benchmarks/peers.py again.") from None
        write_marker(folder, {**want, "installed": False})  # ours from now on, even if a step below fails
    else:
        print(f"[{peer.name}] completing the venv in {folder} (an earlier install did not finish, or the pins "
              "changed)", flush=True)
    if not venv_python(folder).exists():
        _run_or_explain(run, [sys.executable, "-m", "venv", str(folder)], peer, folder)
    (folder / "constraints.txt").write_text(TORCH_PIN + "\n")
    for cmd in pip_commands(peer, folder):
        print(f"[{peer.name}] installing {cmd[-1]} into {folder}", flush=True)
        _run_or_explain(run, cmd, peer, folder)
    check = [str(venv_python(folder)), "-c", f"import torch, importlib.metadata as m, {peer.module}; "
             f"print(torch.__version__, m.version({peer.requirement.split('==')[0]!r}))"]
    out = _run_or_explain(run, check, peer, folder, capture=True).strip().splitlines()  # last line: ours
    found = out[-1] if out else "?"
    print(f"[{peer.name}] ready: torch and {peer.requirement.split('==')[0]} = {found}", flush=True)
    write_marker(folder, {**want, "installed": True, "versions": found})
    return venv_python(folder)


def _run_or_explain(run: Callable[..., Any], cmd: list[str], peer: Peer, folder: Path, capture: bool = False) -> str:
    try:
        done = run(cmd, check=False, text=True, capture_output=capture)
    except OSError as err:
        done = None
        why = str(err)
    else:
        why = f"exit status {done.returncode}" + (f": {(done.stderr or '').strip()[-2000:]}" if capture else "")
    if done is None or done.returncode != 0:
        raise SetupError(f"[{peer.name}] this step failed for the venv {folder} ({why}):\n    {shlex.join(cmd)}\n"
                         "Retry it by hand with that command, or run benchmarks/peers.py again (it picks up where "
                         "it stopped).")
    return (done.stdout or "") if capture else ""


# -- summary --------------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and min-max of a figure over the rounds."""
    if not values:
        raise ValueError("no rounds to summarise")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio_spread(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    """The ratio taken round by round (each round's pair was measured back to back), then summarised."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators against {len(denominators)} denominators")
    return spread([a / b for a, b in zip(numerators, denominators)])


def describe(s: dict[str, float], unit: str = "x") -> str:
    return f"{s['median']:.2f}{unit} (spread {s['min']:.2f}-{s['max']:.2f} over {s['n']} rounds)"


def summarize(workload: Workload, peer: str, rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Figures of one workload from its rounds ({'workbench': result, peer: result} each)."""
    wb = [r["workbench"] for r in rounds]
    other = [r[peer] for r in rounds]
    if workload.kind == "cache":
        return {
            "tok_s_workbench_plain": spread([r["plain_tok_s"] for r in wb]),
            "tok_s_workbench_cached": spread([r["cached_tok_s"] for r in wb]),
            f"tok_s_{peer}_plain": spread([r["plain_tok_s"] for r in other]),
            f"tok_s_{peer}_cached": spread([r["cached_tok_s"] for r in other]),
            "ratio_workbench_cached_over_plain_time": ratio_spread([r["plain_tok_s"] for r in wb],
                                                                   [r["cached_tok_s"] for r in wb]),
            f"ratio_{peer}_cached_over_plain_time": ratio_spread([r["plain_tok_s"] for r in other],
                                                                 [r["cached_tok_s"] for r in other]),
            f"ratio_workbench_vs_{peer}_cached": ratio_spread([r["cached_tok_s"] for r in wb],
                                                              [r["cached_tok_s"] for r in other]),
        }
    return {"tok_s_workbench": spread([r["tok_s"] for r in wb]), f"tok_s_{peer}": spread([r["tok_s"] for r in other]),
            f"ratio_workbench_vs_{peer}": ratio_spread([r["tok_s"] for r in wb], [r["tok_s"] for r in other])}


def report_lines(workload: Workload, peer: str, figures: dict[str, Any]) -> list[str]:
    lines = []
    for key, s in figures.items():
        if key.startswith("tok_s_"):
            lines.append(f"  {key[6:]:<28} {s['median']:>10,.0f} tok/s  ({s['min']:,.0f}-{s['max']:,.0f})")
    for key, s in figures.items():
        if key.startswith("ratio_"):
            lines.append(f"  {key[6:]:<40} {describe(s)}")
    return [f"{peer} / {workload.name}:"] + lines


# -- workers --------------------------------------------------------------------------------------
class WorkerError(Exception):
    pass


class Worker:
    """A worker process that has built and warmed up its model; `measure()` times one round."""

    def __init__(self, python: Path | str, workload: Workload, side: str, steps: int, warmup: int,
                 dead_fraction: float, log_dir: Path):
        self.label = f"{side} / {workload.name}"
        self.log = log_dir / f"{side}-{workload.name}.log"
        self.cmd = [str(python), str(WORKERS / workload.worker), "--side", side, *workload.args, "--steps",
                    str(steps), "--warmup", str(warmup), "--dead-fraction", str(dead_fraction), "--serve"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
        env.pop("PYTHONPATH", None)  # the peer's venv must not see this checkout's packages
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, env=env, cwd=str(HERE.parent))
        self.info = self._read()

    def _failed(self, what: str) -> WorkerError:
        """Stop the worker (so none is left running) and say what happened, with its command and log tail."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        tail = self.log.read_text()[-3000:] if self.log.exists() else ""
        return WorkerError(f"worker {self.label} {what} (exit status {self.proc.returncode}); command:\n    "
                           f"{shlex.join(self.cmd)}\nits last output:\n{tail}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise self._failed("stopped")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise self._failed(f"printed {line[:200]!r} where a JSON line was due") from None

    def measure(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("time\n")
            self.proc.stdin.flush()
        except OSError:  # a broken pipe: the worker is gone
            raise self._failed("stopped") from None
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def run_workload(workload: Workload, peer: str, peer_python: Path, args: argparse.Namespace,
                 log_dir: Path) -> dict[str, Any]:
    steps = args.steps or workload.steps
    workers: dict[str, Worker] = {}
    try:
        for side, python in (("workbench", sys.executable), (peer, peer_python)):  # one at a time: no overlap
            workers[side] = Worker(python, workload, side, steps, args.warmup, args.dead_fraction, log_dir)
        info = {side: w.info for side, w in workers.items()}
        rounds = []
        for _ in range(args.rounds):
            rounds.append({side: w.measure() for side, w in workers.items()})  # interleaved: workbench, peer
    finally:
        for w in workers.values():
            w.close()
    figures = summarize(workload, peer, rounds)
    return {"steps": steps, "rounds": args.rounds, "info": info, "figures": figures,
            "samples": rounds}


def _compact(figures: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, s in figures.items():
        digits = 0 if key.startswith("tok_s") else 3
        out[key] = {k: (round(v, digits) if k != "n" else v) for k, v in s.items()}
        if digits == 0:
            out[key] = {k: int(v) for k, v in out[key].items()}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    pythons: dict[str, Path] = {}
    start = time.perf_counter()
    try:
        for name in args.only:
            pythons[name] = ensure_venv(PEERS[name], args.venvs)
    except SetupError as err:
        print(f"\n{err}", file=sys.stderr)
        return 1
    print(f"venvs ready in {time.perf_counter() - start:.0f} s under {args.venvs}", flush=True)
    if args.setup_only:
        return 0
    import torch  # the workbench side's, only for the header line

    print(f"workbench side: python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} interleaved rounds per workload", flush=True)
    record: dict[str, Any] = {"rounds": args.rounds, "dead_fraction": args.dead_fraction, "peers": {}}
    failed = []
    with tempfile.TemporaryDirectory(prefix="workbench-peers-") as tmp:
        for name in args.only:
            record["peers"][name] = {}
            for workload in PEERS[name].workloads:
                t0 = time.perf_counter()
                try:
                    result = run_workload(workload, name, pythons[name], args, Path(tmp))
                except WorkerError as err:
                    print(f"{name} / {workload.name}: FAILED\n{err}", file=sys.stderr, flush=True)
                    failed.append(f"{name}/{workload.name}")
                    continue
                peer_info = result["info"][name]
                print("\n".join(report_lines(workload, name, result["figures"])) +
                      f"\n  ({result['steps']} steps per round; {peer_info.get('versions', '')}; "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
                record["peers"][name][workload.name] = {"steps": result["steps"], "versions": peer_info.get("versions"),
                                                        **_compact(result["figures"])}
    record["failed"] = failed
    print(json.dumps(record))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
