"""The full-batch trainer of modular addition, the task of the grokking papers (Power et al. 2022;
Nanda et al. 2023; the task itself: `workbench.data.modular`, the model's answer logits:
`workbench.model.modular`).

The model reads `a b =` and predicts (a + b) mod p at the last position; the loss is on that answer
token only. A fixed fraction of all p² pairs is the training set (a pure function of `data_seed`),
the rest the test set. Training is full-batch AdamW with strong weight decay on every parameter, as
in the paper, so one step is one epoch.

    workbench train modular-addition                  # p = 53, groks in a few minutes on 2 CPU cores
    workbench train modular-addition-p113             # the paper's p = 113

What keeps a run safe is the run lifecycle it shares with the language-model trainer
(workbench.train.lifecycle): the same fresh-folder checks and run-folder lock, atomic checkpoint
folders with optimizer state (safetensors + JSON) in the newest one, Ctrl-C saving a checkpoint and
quoting the command that resumes, and a non-finite loss or gradient stopping before the optimizer
step with the last good checkpoint named. Resume is bit-identical: the data are the same every step,
and the checkpoint holds the full optimizer state.

A finished run can keep its intermediate checkpoints in float16 (`half_precision_checkpoints`):
they only serve the analyses over training, and halve the size of the shipped model. The final
model at the top of the run folder stays float32.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.artifacts import (
    CONFIG_FILE,
    LOG_FILE,
    TOKENIZER_FILE,
    append_log,
    list_checkpoints,
    read_config,
    read_weights,
    write_checkpoint,
    write_model_folder,
)
from workbench.config import check_types, from_dict
from workbench.data.modular import (
    MAX_P,
    P_LIMIT_REASON,
    TASK,
    ModularData,
    modular_data,
    modular_tokenizer,
    warn_if_not_prime,
)
from workbench.data.tokenizer import TextCodec
from workbench.errors import InputError, check_field
from workbench.model.loading import TRANSFORMER_KIND, models_dir, resolve_device
from workbench.model.modular import answer_logits_fast, evaluate, is_modular_model
from workbench.model.transformer import ModelConfig, Transformer
from workbench.train.lifecycle import (
    Run,
    check_final_weights,
    claim_folder,
    load_for_finish,
    resume_hint,
    save_final,
    start_point,
)
from workbench.train.optim import OptimizerConfig, make_optimizer, weight_norm


@dataclass(frozen=True)
class ModularConfig(OptimizerConfig):
    """A modular-addition run: the task, the paper's one-layer model and its full-batch recipe (AdamW,
    `OptimizerConfig`, with the paper's settings: weight decay 1.0 on every parameter, embeddings and
    biases too, betas (0.9, 0.98), a short warmup, then a constant learning rate)."""

    task: Literal["modular-addition"] = TASK
    """Which task this config trains (the only one: 'modular-addition')."""
    p: int = 53
    """The modulus; inputs and answers lie in [0, p). A prime, for the Fourier analysis."""
    train_fraction: float = 0.5
    """Share of all p² pairs (a, b) in the training set, in (0, 1); the rest is the test set."""
    d_model: int = 128
    """Width of the residual stream."""
    n_heads: int = 4
    """Attention heads (d_head = d_model / n_heads)."""
    d_mlp: int = 512
    """Hidden width of the ReLU MLP."""
    n_steps: int = 8000
    """Full-batch AdamW steps (one step is one epoch)."""
    warmup_steps: int = 10  # the paper's recipe, in place of OptimizerConfig's defaults
    weight_decay: float = 1.0
    beta2: float = 0.98
    eval_every: int = 20
    """Train and test loss and accuracy in log.jsonl every this many steps (and at every checkpoint)."""
    n_checkpoints: int = 24
    """Checkpoints: step 0, then log-spaced from first_checkpoint to n_steps."""
    first_checkpoint: int = 10
    """The first log-spaced checkpoint after step 0 (steps before it hold nothing to analyse)."""
    half_precision_checkpoints: bool = True
    """When the run finishes, store its intermediate checkpoints in float16 (the final model stays float32)."""
    seed: int = 0
    """Seed of the weight init."""
    data_seed: int = 0
    """Seed of the train/test split."""

    decay_every_parameter = True  # not a field (no annotation): the paper decays embeddings and biases too

    def __post_init__(self) -> None:
        check_types(self)
        own = "ModularConfig"
        check_field(self.task == TASK, own, "task", self.task, f"{TASK!r}")
        check_field(isinstance(self.p, int) and self.p >= 3, own, "p", self.p, "an integer ≥ 3 (a prime, e.g. 53)")
        check_field(self.p <= MAX_P, own, "p", self.p, f"{P_LIMIT_REASON}; use a prime such as 53 or 113")
        check_field(0 < self.train_fraction < 1, own, "train_fraction", self.train_fraction,
                    "strictly between 0 and 1 (the share of the p² pairs used for training; the rest is tested on)")
        n_train = round(self.train_fraction * self.p ** 2)
        check_field(1 <= n_train < self.p ** 2, own, "train_fraction", self.train_fraction,
                    f"large enough for one training pair and to leave one test pair of the {self.p}² pairs")
        for name in ("d_model", "n_heads", "d_mlp", "n_steps", "eval_every", "first_checkpoint"):
            value = getattr(self, name)
            check_field(value > 0, own, name, value, "a positive integer")
        check_field(self.d_model % self.n_heads == 0, own, "n_heads", self.n_heads,
                    f"a divisor of d_model={self.d_model}")
        self.check_optimizer(own, self.n_steps)
        check_field(self.n_checkpoints >= 2, own, "n_checkpoints", self.n_checkpoints,
                    "an integer ≥ 2 (the first and last step)")
        check_field(self.first_checkpoint <= self.n_steps, own, "first_checkpoint", self.first_checkpoint,
                    f"at most n_steps={self.n_steps}")
        warn_if_not_prime(self.p, "ModularConfig")

    @property
    def model(self) -> ModelConfig:
        """The one-layer, ReLU, LayerNorm-free transformer over `a b =`."""
        return ModelConfig(n_layers=1, d_model=self.d_model, n_heads=self.n_heads, d_head=self.d_model // self.n_heads,
                           d_mlp=self.d_mlp, act_fn="relu", normalization_type=None, n_ctx=3, d_vocab=self.p + 1,
                           seed=self.seed)

    @property
    def n_train(self) -> int:
        """Pairs in the training set."""
        return round(self.train_fraction * self.p ** 2)

    @property
    def checkpoint_steps(self) -> list[int]:
        """Step 0, then `n_checkpoints - 1` log-spaced steps from first_checkpoint to n_steps."""
        spaced = np.geomspace(self.first_checkpoint, self.n_steps, self.n_checkpoints - 1)
        return sorted({0, *(int(round(s)) for s in spaced), self.n_steps})

    def lr_at(self, step: int) -> float:
        """Linear warmup over warmup_steps, then constant."""
        return self.lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else self.lr

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> "ModularConfig":
        """Build from parsed JSON, naming any key that is not a field or value of the wrong type."""
        return from_dict(cls, data, where)


def load_modular_config(preset_or_path: Union[str, Path]) -> Optional[tuple[str, ModularConfig]]:
    """(name, config) when the preset or JSON file is a modular-addition task, else None (not ours to read)."""
    path = Path(preset_or_path)
    if not path.exists():
        path = models_dir() / f"{preset_or_path}.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # the language-model trainer reports the bad JSON
    if not isinstance(raw, dict) or raw.get("task") != TASK:
        return None
    raw = {k: v for k, v in raw.items() if k != "description"}
    return path.stem, ModularConfig.from_dict(raw, str(path))


def require_modular(model: Any) -> ModularConfig:
    """The ModularConfig a model was trained with, or an InputError saying what to give instead."""
    if not is_modular_model(model):
        what = type(model).__name__
        if isinstance(model, Transformer):
            what = f"a Transformer trained on {model.meta.get('train', {}).get('data', {}).get('text', 'text')!r}" \
                if model.meta else "a Transformer with no training record (config.json)"
        raise InputError(f"The grokking analysis needs a model trained on modular addition, got {what}. Use the "
                         f"shipped one (`workbench run grokking --model {TASK}`) or train one with "
                         f"`workbench train {TASK} --out runs/my-grokking`, then pass --model runs/my-grokking.")
    raw = {k: v for k, v in model.meta["train"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the analysis warns about a composite p itself
        return ModularConfig.from_dict(raw, str(model.folder) if model.folder else "the model's config")


def _compact_checkpoints(run_dir: Path) -> None:
    """Rewrite every checkpoint's weights in float16 (atomically, one folder at a time)."""
    for step, folder in list_checkpoints(run_dir):
        meta = read_config(folder)
        if meta.get("weights_dtype") == "float16":
            continue
        tensors = {k: v.half() for k, v in read_weights(folder, meta).items()}
        keep = {k: v for k, v in meta.items() if k not in ("kind", "format_version", "weights_sha256")}
        tok = (folder / TOKENIZER_FILE).read_text() if (folder / TOKENIZER_FILE).exists() else None

        def write(tmp: Path, tensors=tensors, keep=keep, tok=tok) -> None:
            write_model_folder(tmp, TRANSFORMER_KIND, tensors, {**keep, "weights_dtype": "float16"}, tok)

        write_checkpoint(run_dir, step, write)



def train_modular(cfg: ModularConfig, out: Union[str, Path], *, name: str = TASK, resume: bool = False,
                  device: Union[str, torch.device] = "auto", progress: bool = True,
                  resume_command: Optional[str] = None) -> Path:
    """Train a modular-addition model into the run folder `out` and return it (see the module docstring).

    `resume=True` continues the run in `out` from its newest checkpoint (or starts it if there is none)."""
    run_dir = Path(out)
    dev = resolve_device(device)
    hint = resume_hint(resume_command, "train_modular", run_dir)
    with claim_folder(run_dir, resume, hint):
        return _train(cfg, run_dir, name, resume, dev, progress, hint)


def _train(cfg: ModularConfig, run_dir: Path, name: str, resume: bool, dev: torch.device, progress: bool,
           hint: str) -> Path:
    mode, resume_from = start_point(run_dir, cfg, resume, name)
    data = modular_data(cfg.p, cfg.train_fraction, cfg.data_seed)
    model = Transformer(cfg.model, tokenizer=TextCodec(modular_tokenizer(cfg.p))).to(dev)
    if mode == "finish":
        load_for_finish(model, run_dir, resume_from, cfg.n_steps)
        return _finish(cfg, run_dir, name, model, data, 0.0)
    run = _ModularRun(cfg, run_dir, name, hint, model, data, dev)
    run.restore(resume_from)
    run.bar = tqdm(total=cfg.n_steps, initial=run.step, desc=f"train {name} (p={cfg.p}, full batch of {cfg.n_train} "
                   "pairs)", disable=not progress, unit="step", dynamic_ncols=True)
    model.train()
    t_start = time.perf_counter()
    run.train_loop(cfg.n_steps)
    return _finish(cfg, run_dir, name, model, data, time.perf_counter() - t_start)


def _meta(cfg: ModularConfig, name: str, step: int, data: ModularData, extra: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "train": cfg.to_dict(), "step": step, "split_sha256": data.split_sha256, **extra}


class _ModularRun(Run):
    """A modular-addition run in progress: train and test metrics every eval_every steps and at each
    checkpoint, full-batch steps on the fast answer logits."""

    def __init__(self, cfg: ModularConfig, run_dir: Path, name: str, hint: str, model: Transformer, data: ModularData,
                 dev: torch.device):
        super().__init__(run_dir, name, hint, model, make_optimizer(model, cfg))
        self.cfg, self.data = cfg, data
        self.tokens, self.labels = data.tokens_N3[data.train_idx].to(dev), data.labels_N[data.train_idx].to(dev)
        self.ckpt_steps = set(cfg.checkpoint_steps)

    def checkpoint_meta(self, extra: dict[str, Any]) -> dict[str, Any]:
        return _meta(self.cfg, self.name, self.step, self.data, extra)

    def diverged_advice(self) -> str:
        return f"Lower lr (now {self.cfg.lr:g}) or weight_decay"

    def at_step(self) -> None:
        """Train and test metrics in log.jsonl every eval_every steps and at each checkpoint."""
        step = self.step
        at_ckpt = step in self.ckpt_steps and step != self.saved_at
        if at_ckpt or step % self.cfg.eval_every == 0:
            self.check_weights()
            record = {"step": step, **evaluate(self.model, self.data), "weight_norm": weight_norm(self.model),
                      "lr": self.cfg.lr_at(step)}
            if step != self.saved_at:  # a resumed run has this record already
                append_log(self.run_dir / LOG_FILE, record)
            self.bar.set_postfix(train=f"{record['train_loss']:.2g}", test=f"{record['test_loss']:.2g}",
                                 test_acc=f"{record['test_acc']:.2f}")
            if at_ckpt:
                kept = {k: record[k] for k in ("train_loss", "test_loss", "test_acc")}
                self.last_good, self.saved_at = self.save(kept), step

    def take_step(self) -> None:
        optimizer, model = self.optimizer, self.model
        for group in optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(self.step)
        loss = F.cross_entropy(answer_logits_fast(model, self.tokens), self.labels)
        loss.backward()
        grad_ok = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        if not (bool(torch.isfinite(loss.detach())) and grad_ok):  # before the step: the weights are kept
            optimizer.zero_grad(set_to_none=True)
            raise self.diverged(f"the loss was {float(loss.detach()):g}" + ("" if grad_ok else " and a gradient "
                                                                            "was not finite"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.bar.update(1)


def _finish(cfg: ModularConfig, run_dir: Path, name: str, model: Transformer, data: ModularData,
            seconds: float) -> Path:
    """The final model (float32) at the top of the run folder; then optimizer state goes and, if asked, the
    checkpoints are stored in float16."""
    check_final_weights(run_dir, name, model, "lr")
    evals = evaluate(model, data)
    save_final(run_dir, model, _meta(cfg, name, cfg.n_steps, data, {"train_seconds": round(seconds, 1),
                                                                    "threads": torch.get_num_threads(), **evals}),
               drop_states=True)
    if cfg.half_precision_checkpoints:
        _compact_checkpoints(run_dir)
    print(f"Wrote {run_dir}: {CONFIG_FILE}, model.safetensors, {TOKENIZER_FILE}, {LOG_FILE} and "
          f"{len(list_checkpoints(run_dir))} checkpoints. Test accuracy {evals['test_acc']:.3f}, test loss "
          f"{evals['test_loss']:.3g} after {cfg.n_steps} steps ({seconds:.0f} s).")
    return run_dir
