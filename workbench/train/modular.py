"""Modular addition, the task of the grokking papers (Power et al. 2022; Nanda et al. 2023), and its
full-batch trainer.

The model reads `a b =` (token ids a, b in [0, p) and p for `=`) and predicts (a + b) mod p at the
last position; the loss is on that answer token only. A fixed fraction of all p² pairs is the
training set (a pure function of `data_seed`), the rest the test set. Training is full-batch AdamW
with strong weight decay on every parameter, as in the paper, so one step is one epoch.

    workbench train modular-addition                  # p = 53, groks in a few minutes on 2 CPU cores
    workbench train modular-addition-p113             # the paper's p = 113

What keeps a run safe is the language-model trainer's (workbench.train.lm): the same fresh-folder
checks and run-folder lock, atomic checkpoint folders with optimizer state (safetensors + JSON) in
the newest one, Ctrl-C saving a checkpoint and quoting the command that resumes, and a non-finite
loss or gradient stopping before the optimizer step with the last good checkpoint named. Resume is
bit-identical: the data are the same every step, and the checkpoint holds the full optimizer state.

A finished run can keep its intermediate checkpoints in float16 (`half_precision_checkpoints`):
they only serve the analyses over training, and halve the size of the shipped model. The final
model at the top of the run folder stays float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm.auto import tqdm

from workbench.artifacts import (
    CONFIG_FILE,
    LOG_FILE,
    TOKENIZER_FILE,
    append_log,
    list_checkpoints,
    read_config,
    read_state,
    read_weights,
    remove_state,
    run_lock,
    truncate_log,
    write_checkpoint,
    write_model_folder,
    write_state,
)
from workbench.config import check_types, from_dict
from workbench.data.tokenizer import TextCodec
from workbench.errors import ConfigError, InputError, TrainingDiverged, check_field
from workbench.model.loading import TRANSFORMER_KIND, models_dir, resolve_device, save_model
from workbench.model.transformer import ModelConfig, Transformer
from workbench.train.lm import _check_fresh_folder, _finite_weights, _resume_point, fused_adam
from workbench.train.runs import StopRequest, TrainingInterrupted

TASK = "modular-addition"
"""The `task` field of a modular-addition preset and of its models' config.json."""
MAX_P = 1024
"""The largest modulus: the task holds all p² pairs, and a full-batch step computes p logits for each
training pair (about p³/2 numbers, 2 GB of float32 at p = 1024, before their gradients)."""
P_LIMIT_REASON = (f"at most {MAX_P}: the task holds all p² pairs (a b =) in memory, and every full-batch step "
                  f"computes p logits for each training pair (about p³/2 numbers, 2 GB at p = {MAX_P})")


def is_prime(n: int) -> bool:
    """Whether n is a prime number."""
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def warn_if_not_prime(p: int, where: str) -> None:
    """A warning (not an error) when p is composite: the task trains, but the Fourier story assumes Z_p is a field."""
    if not is_prime(p):
        warnings.warn(f"{where}: p={p} is not prime. Training works, but the Fourier analysis of the grokking study "
                      "assumes a prime p (every non-zero frequency then generates all of Z_p); its key frequencies "
                      "and progress measures may not mean what they do for a prime. Use a prime such as 53 or 113.",
                      stacklevel=3)


@dataclass(frozen=True)
class ModularConfig:
    """A modular-addition run: the task, the paper's one-layer model and its full-batch recipe."""

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
    lr: float = 1e-3
    """Learning rate (constant after the warmup)."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr."""
    weight_decay: float = 1.0
    """AdamW weight decay, on every parameter (embeddings and biases too, as in the paper)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
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
        check_field(self.lr > 0, own, "lr", self.lr, "positive")
        check_field(0 <= self.warmup_steps < self.n_steps, own, "warmup_steps", self.warmup_steps,
                    f"in [0, n_steps={self.n_steps})")
        check_field(self.weight_decay >= 0, own, "weight_decay", self.weight_decay, "≥ 0")
        check_field(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, own, "beta1/beta2", (self.beta1, self.beta2),
                    "in [0, 1)")
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


@dataclass(frozen=True, eq=False)
class ModularData:
    """Every pair of the task, and the split. Pair index i = a * p + b."""

    p: int
    tokens_N3: torch.Tensor
    """[p², 3] `a b =` for every pair, a-major."""
    labels_N: torch.Tensor
    """[p²] (a + b) mod p."""
    train_idx: torch.Tensor
    """[n_train] pair indices of the training set."""
    test_idx: torch.Tensor
    """[p² - n_train] pair indices of the test set."""

    @property
    def split_sha256(self) -> str:
        """A fingerprint of the training set, stored with the model so an analysis can check it rebuilt the split."""
        return hashlib.sha256(np.asarray(sorted(self.train_idx.tolist()), dtype=np.int64).tobytes()).hexdigest()


def modular_data(p: int, train_fraction: float, seed: int = 0) -> ModularData:
    """All p² pairs `a b =` with their answers, and a seeded split into train and test."""
    if not 3 <= p <= MAX_P:
        raise ConfigError(f"p must be an integer from 3 to {MAX_P}, got {p!r}: {P_LIMIT_REASON}.")
    if not 0 < train_fraction < 1:
        raise ConfigError(f"train_fraction must be strictly between 0 and 1, got {train_fraction!r}: it is the share "
                          f"of the {p}² pairs used for training, and the rest is the test set.")
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = round(train_fraction * p * p)
    return ModularData(p, tokens, (a + b) % p, perm[:n_train].sort().values, perm[n_train:].sort().values)


def modular_tokenizer(p: int) -> Tokenizer:
    """Word-level tokenizer: '0' ... 'p-1' are ids 0 ... p-1, '=' is p; `model.to_tokens('3 5 =')` works."""
    vocab = {str(i): i for i in range(p)}
    vocab["="] = p
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="="))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def answer_logits(model: Transformer, tokens_N3: torch.Tensor) -> torch.Tensor:
    """Logits [N, p] of the answer, read at the `=` position (the logit of `=` itself is dropped)."""
    return model(tokens_N3)[:, -1, : model.cfg.d_vocab - 1]


def answer_logits_fast(model: Transformer, tokens_N3: torch.Tensor) -> torch.Tensor:
    """The same answer logits [N, p] as `answer_logits`, computing only what the answer position needs.

    Training uses it; analyses use the hooked forward. Exact for the task's model (one layer, no
    LayerNorm, `=` last), because of three facts. The loss reads position 2 alone, so the MLP and the
    unembedding run there only. Position 2 is always `=`, so its query is one vector for every example.
    The keys and values of `a` and `b` depend only on the token, so they are tables over the
    vocabulary ([V, H, K]), built once per step and gathered. That is 3-4x fewer FLOPs than the
    full forward; a test checks that it equals the hooked model."""
    cfg = model.cfg
    p = cfg.d_vocab - 1
    if (cfg.n_layers != 1 or cfg.normalization_type is not None or cfg.attn_only or cfg.act_fn != "relu"
            or tokens_N3.ndim != 2 or tokens_N3.shape[1] != 3 or not bool((tokens_N3[:, 2] == p).all())):
        raise InputError("answer_logits_fast is for the modular-addition model (one layer with an MLP, no LayerNorm) "
                         "on `a b =` inputs; use answer_logits for any other model.")
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    resid_eq_D = model.W_E[p] + model.W_pos[2]  # position 2 is `=` in every example
    q_HK = torch.einsum("d,hdk->hk", resid_eq_D, attn.W_Q) + attn.b_Q
    scale = 1 / math.sqrt(cfg.d_head)
    scores, values = [], []
    for pos in (0, 1):
        resid_VD = model.W_E + model.W_pos[pos]
        k_VHK = torch.einsum("vd,hdk->vhk", resid_VD, attn.W_K) + attn.b_K
        v_VHK = torch.einsum("vd,hdk->vhk", resid_VD, attn.W_V) + attn.b_V
        scores.append(((k_VHK * q_HK).sum(-1) * scale)[tokens_N3[:, pos]])  # [N, H]
        values.append(v_VHK[tokens_N3[:, pos]])  # [N, H, K]
    k_eq_HK = torch.einsum("d,hdk->hk", resid_eq_D, attn.W_K) + attn.b_K
    v_eq_HK = torch.einsum("d,hdk->hk", resid_eq_D, attn.W_V) + attn.b_V
    N = tokens_N3.shape[0]
    scores.append(((k_eq_HK * q_HK).sum(-1) * scale).expand(N, -1))
    pattern_NH3 = torch.stack(scores, -1).softmax(-1)
    z_NHK = pattern_NH3[..., 0, None] * values[0] + pattern_NH3[..., 1, None] * values[1] \
        + pattern_NH3[..., 2, None] * v_eq_HK
    resid_ND = torch.addmm(attn.b_O, z_NHK.reshape(N, -1), attn.W_O.reshape(-1, cfg.d_model)) + resid_eq_D
    post_NM = torch.relu(torch.addmm(mlp.b_in, resid_ND, mlp.W_in))
    resid_ND = resid_ND + torch.addmm(mlp.b_out, post_NM, mlp.W_out)
    return torch.addmm(model.b_U[:p], resid_ND, model.W_U[:, :p])


def loss_and_accuracy(logits_NP: torch.Tensor, labels_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (in float64, so losses near 1e-7 stay exact) and accuracy of answer logits [N, p]."""
    loss = F.cross_entropy(logits_NP.double(), labels_N)
    return loss, (logits_NP.argmax(-1) == labels_N).double().mean()


@torch.no_grad()
def evaluate(model: Transformer, data: ModularData) -> dict[str, float]:
    """Train and test loss and accuracy over the whole split."""
    device = model.W_E.device
    logits = answer_logits(model, data.tokens_N3.to(device))
    labels = data.labels_N.to(device)
    out = {}
    for name, idx in (("train", data.train_idx), ("test", data.test_idx)):
        loss, acc = loss_and_accuracy(logits[idx.to(device)], labels[idx.to(device)])
        out[f"{name}_loss"], out[f"{name}_acc"] = float(loss), float(acc)
    return out


def weight_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all parameters together."""
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters())))


def is_modular_model(model: Any) -> bool:
    """Whether `model` is a workbench Transformer trained on modular addition (its config.json says so)."""
    return isinstance(model, Transformer) and model.meta.get("train", {}).get("task") == TASK


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


def _make_optimizer(model: Transformer, cfg: ModularConfig) -> torch.optim.AdamW:
    return fused_adam(torch.optim.AdamW, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                      betas=(cfg.beta1, cfg.beta2))


def _meta(cfg: ModularConfig, name: str, step: int, data: ModularData, extra: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "train": cfg.to_dict(), "step": step, "split_sha256": data.split_sha256, **extra}


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
    hint = f"`{resume_command}`" if resume_command else f"train_modular(..., out={str(run_dir)!r}, resume=True)"
    if not resume:
        _check_fresh_folder(run_dir, hint)
    with run_lock(run_dir, "training run"):
        if not resume:
            _check_fresh_folder(run_dir, hint)
        return _train(cfg, run_dir, name, resume, dev, progress, hint)


def _train(cfg: ModularConfig, run_dir: Path, name: str, resume: bool, dev: torch.device, progress: bool,
           hint: str) -> Path:
    mode, resume_from = _resume_point(run_dir, cfg) if resume else ("start", None)  # duck-typed: to_dict, n_steps
    if resume and mode == "start":
        print(f"Nothing to resume in {run_dir} yet; starting {name} from step 0.")
    data = modular_data(cfg.p, cfg.train_fraction, cfg.data_seed)
    model = Transformer(cfg.model, tokenizer=TextCodec(modular_tokenizer(cfg.p))).to(dev)
    tokens, labels = data.tokens_N3[data.train_idx].to(dev), data.labels_N[data.train_idx].to(dev)
    if mode == "finish":
        model.load_state_dict(read_weights(resume_from, read_config(resume_from)))
        print(f"The run in {run_dir} reached step {cfg.n_steps}; writing its final model from {resume_from}.")
        return _finish(cfg, run_dir, name, model, data, 0.0)
    optimizer = _make_optimizer(model, cfg)
    step = 0
    if resume_from is not None:
        model.load_state_dict(read_weights(resume_from, read_config(resume_from)))
        state = read_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        truncate_log(run_dir / LOG_FILE, step)
        print(f"Resuming {name} from step {step} ({resume_from})")
    else:
        (run_dir / LOG_FILE).unlink(missing_ok=True)

    saved_at, last_good = (step, resume_from) if resume_from is not None else (-1, None)
    ckpt_steps = set(cfg.checkpoint_steps)

    def save(extra: dict[str, Any]) -> Path:
        def write(folder: Path) -> None:
            save_model(model, folder, _meta(cfg, name, step, data, extra))
            write_state(folder, {"optimizer": optimizer.state_dict(), "step": step})

        folder = write_checkpoint(run_dir, step, write, needed_bytes=3 * 4 * model.n_params)
        for s, old in list_checkpoints(run_dir):  # only the newest checkpoint needs optimizer state
            if s != step:
                remove_state(old)
        return folder

    bar = tqdm(total=cfg.n_steps, initial=step, desc=f"train {name} (p={cfg.p}, full batch of {cfg.n_train} pairs)",
               disable=not progress, unit="step", dynamic_ncols=True)

    def diverged(what: str) -> TrainingDiverged:
        bar.close()
        where = f"{last_good} (step {saved_at})" if last_good is not None else "none (no checkpoint was written)"
        return TrainingDiverged(f"Training stopped: {what} at step {step}. The weights were not saved past that "
                                f"point; the last good checkpoint is {where}. Lower lr (now {cfg.lr:g}) or "
                                "weight_decay, and train into a new --out.")

    model.train()
    t_start = time.perf_counter()
    try:
        with StopRequest(f"training {name}") as stop:
            while True:
                at_ckpt = step in ckpt_steps and step != saved_at
                if at_ckpt or step % cfg.eval_every == 0:
                    if not _finite_weights(model):
                        raise diverged("the weights became NaN or inf")
                    record = {"step": step, **evaluate(model, data), "weight_norm": weight_norm(model),
                              "lr": cfg.lr_at(step)}
                    if step != saved_at:  # a resumed run has this record already
                        append_log(run_dir / LOG_FILE, record)
                    bar.set_postfix(train=f"{record['train_loss']:.2g}", test=f"{record['test_loss']:.2g}",
                                    test_acc=f"{record['test_acc']:.2f}")
                    if at_ckpt:
                        kept = {k: record[k] for k in ("train_loss", "test_loss", "test_acc")}
                        last_good, saved_at = save(kept), step
                if step >= cfg.n_steps:
                    break
                if stop.requested:
                    if saved_at != step:
                        if not _finite_weights(model):
                            raise diverged("the weights became NaN or inf")
                        last_good = save({"interrupted": True})
                    bar.close()
                    raise TrainingInterrupted(step, last_good, hint)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr_at(step)
                loss = F.cross_entropy(answer_logits_fast(model, tokens), labels)
                loss.backward()
                grad_ok = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
                if not (bool(torch.isfinite(loss.detach())) and grad_ok):  # before the step: the weights are kept
                    optimizer.zero_grad(set_to_none=True)
                    raise diverged(f"the loss was {float(loss.detach()):g}" + ("" if grad_ok else " and a gradient "
                                                                               "was not finite"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
    except KeyboardInterrupt:  # a second Ctrl-C: quit now; the newest checkpoint on disk is consistent
        bar.close()
        raise TrainingInterrupted(saved_at, last_good, hint, saved=False) from None
    bar.close()
    return _finish(cfg, run_dir, name, model, data, time.perf_counter() - t_start)


def _finish(cfg: ModularConfig, run_dir: Path, name: str, model: Transformer, data: ModularData,
            seconds: float) -> Path:
    """The final model (float32) at the top of the run folder; then optimizer state goes and, if asked, the
    checkpoints are stored in float16."""
    if not _finite_weights(model):
        raise TrainingDiverged(f"The final weights of {name} are NaN or inf; nothing was saved at the top of "
                               f"{run_dir}. Lower lr and train into a new --out.")
    evals = evaluate(model, data)
    save_model(model, run_dir, _meta(cfg, name, cfg.n_steps, data, {"train_seconds": round(seconds, 1),
                                                                    "threads": torch.get_num_threads(), **evals}))
    for _, folder in list_checkpoints(run_dir):
        remove_state(folder)
    if cfg.half_precision_checkpoints:
        _compact_checkpoints(run_dir)
    print(f"Wrote {run_dir}: {CONFIG_FILE}, model.safetensors, {TOKENIZER_FILE}, {LOG_FILE} and "
          f"{len(list_checkpoints(run_dir))} checkpoints. Test accuracy {evals['test_acc']:.3f}, test loss "
          f"{evals['test_loss']:.3g} after {cfg.n_steps} steps ({seconds:.0f} s).")
    return run_dir


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
