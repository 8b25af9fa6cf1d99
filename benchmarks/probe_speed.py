"""Probe-sweep speed: a linear probe at every layer and position of a GPT-2-small-shaped model, with
the activations streamed once for every probe, against caching each layer separately.

    python benchmarks/probe_speed.py [--device auto|cpu|cuda] [--prompts 10000] [--quick]
                                     [--layers 12 --width 768 --heads 12 --n-ctx 64 --vocab 50257]
                                     [--dtype float32|bfloat16] [--sklearn-probes 8]

The model is a random workbench `Transformer` of GPT-2 small's shape (12 layers, d_model 768, 12
heads of 64, d_mlp 3072, vocabulary 50,257; n_ctx 64), on N random prompts of n_ctx tokens. The
label of a prompt is the side of a random hyperplane its first token's embedding lies on, so the
probes have something linear to read at position 0 and whatever attention spreads of it later. Every probe is a
logistic probe beside its control task and shuffled labels (`fit_probes`), on a 75/25 split by prompt.

1. once: `probe_activations` over every layer's `hook_resid_post` and every position in one pass,
   then `fit_probes` on all of them (L × n_ctx probes).
2. per layer: for each layer, a pass that stops after it (`run_collect(stop_early=True)`, the
   cheapest way to cache one layer) and `fit_probes` on its n_ctx probes.
The two give the same probes (max |Δ held-out accuracy| reported). Time ratio = per layer / once,
for streaming alone and in total.
3. scikit-learn: `LogisticRegression` (lbfgs, the same penalty, activations centred and scaled the
   same way) on --sklearn-probes probes spread over the grid, three fits each (labels, control task,
   shuffled) as `fit_probes` does; its seconds per probe against ours, and the largest difference
   in held-out accuracy on those probes.

--quick is a smoke test: 2 layers of width 64, n_ctx 16, 96 prompts, 2 sklearn probes.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workbench.cache.probing import probe_activations, split_prompts  # noqa: E402
from workbench.compute.probes import TASKS, ProbeConfig, control_labels, fit_probes  # noqa: E402
from workbench.model.loading import resolve_device  # noqa: E402
from workbench.model.transformer import ModelConfig, Transformer  # noqa: E402


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=positive_int, default=None, help="default 10,000 (96 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke test on a tiny model")
    parser.add_argument("--layers", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None, help="d_model (heads of 64, d_mlp 4 × d_model)")
    parser.add_argument("--heads", type=positive_int, default=None)
    parser.add_argument("--n-ctx", type=positive_int, default=None)
    parser.add_argument("--vocab", type=positive_int, default=None)
    parser.add_argument("--batch-size", type=positive_int, default=None, help="prompts per forward pass")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="how the streamed activations are stored")
    parser.add_argument("--sklearn-probes", type=int, default=None, help="probes fitted with scikit-learn (0: none)")
    parser.add_argument("--chunk-elements", type=positive_int, default=None,
                        help="activation numbers fitted at once (default 2^26 on a CPU, 2^30 on a GPU)")
    args = parser.parse_args(argv)
    if args.sklearn_probes is not None and args.sklearn_probes < 0:
        parser.error("--sklearn-probes must be 0 or more")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    quick = args.quick
    layers = args.layers or (2 if quick else 12)
    width = args.width or (64 if quick else 768)
    heads = args.heads or max(1, width // 64 if width >= 64 else 1)
    if quick and args.heads is None:
        heads = 4
    return ModelConfig(n_layers=layers, d_model=width, n_heads=heads, d_head=width // heads, d_mlp=4 * width,
                       n_ctx=args.n_ctx or (16 if quick else 64), d_vocab=args.vocab or (1000 if quick else 50257),
                       seed=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn, *a, **k):
    sync(device)
    start = time.perf_counter()
    out = fn(*a, **k)
    sync(device)
    return out, time.perf_counter() - start


def sklearn_probes(acts, labels: np.ndarray, split, cfg: ProbeConfig, picks: list[int]) -> tuple[float, np.ndarray]:
    """(seconds, held-out accuracy [len(picks)]) of scikit-learn's LogisticRegression on the probes
    `picks` (flat site × position indices), fitted as fit_probes fits them: three tasks each."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    Q = len(acts.positions)
    y = np.broadcast_to(labels, (Q, len(labels)))
    types = np.stack([np.unique(row, return_inverse=True)[1] for row in acts.tokens_QN.numpy()])  # fit_probes's
    tasks = [y, control_labels(y, types, cfg.seed),
             y[:, np.random.default_rng(cfg.seed + 2).permutation(len(labels))]]
    accuracy = []
    start = time.perf_counter()
    for p in picks:
        s, q = divmod(p, Q)
        X = acts.acts_SQND[s, q].float().cpu().numpy()
        train = X[split.train]
        mean = train.mean(0)
        scale = np.sqrt(((train - mean) ** 2).mean())
        for k in range(len(TASKS)):
            clf = LogisticRegression(C=1 / (cfg.l2 * len(split.train)), max_iter=cfg.max_iter)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit((train - mean) / scale, tasks[k][q, split.train])
            if k == 0:
                accuracy.append(float((clf.predict((X[split.test] - mean) / scale) == y[q, split.test]).mean()))
    return time.perf_counter() - start, np.array(accuracy)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cfg_model = model_config(args)
    n_prompts = args.prompts or (96 if args.quick else 10_000)
    batch_size = args.batch_size or (32 if args.quick else 256)
    dtype = getattr(torch, args.dtype)
    chunk = args.chunk_elements or (2 ** 30 if device.type == "cuda" else 2 ** 26)
    n_sklearn = args.sklearn_probes if args.sklearn_probes is not None else (2 if args.quick else 8)
    torch.manual_seed(0)
    model = Transformer(cfg_model).to(device).eval()
    L, S = cfg_model.n_layers, cfg_model.n_ctx
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg_model.d_vocab, (n_prompts, S), generator=gen)
    direction = torch.randn(cfg_model.d_model, generator=gen).to(device)
    labels = (model.W_E.detach()[tokens[:, 0].to(device)] @ direction > 0).long().cpu().numpy()
    sites = [f"blocks.{l}.hook_resid_post" for l in range(L)]
    split = split_prompts(n_prompts, 0.25, seed=0)
    probe_cfg = ProbeConfig(chunk_elements=chunk, n_bootstrap=200)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; model {L} layers, "
          f"d_model {cfg_model.d_model}, vocab {cfg_model.d_vocab}, n_ctx {S} ({n_params / 1e6:.1f}M parameters); "
          f"{n_prompts} prompts, {L * S} probes")

    # warm-up: kernels, allocator and the first LBFGS on a few prompts
    warm = probe_activations(model, tokens[:64], sites[:1], batch_size=batch_size, dtype=dtype)
    fit_probes(warm, labels[:64], split_prompts(64, 0.25), probe_cfg)

    # 1. one pass, every probe
    acts, once_stream = timed(device, probe_activations, model, tokens, sites, batch_size=batch_size, dtype=dtype)
    once, once_fit = timed(device, fit_probes, acts, labels, split, probe_cfg)
    print(f"once: stream {once_stream:.2f} s, fit {once_fit:.2f} s ({L * S} probes)")

    # 2. a pass per layer
    per_stream = per_fit = 0.0
    scores = []
    for site in sites:
        layer, seconds = timed(device, probe_activations, model, tokens, [site], batch_size=batch_size, dtype=dtype)
        per_stream += seconds
        sweep, seconds = timed(device, fit_probes, layer, labels, split, probe_cfg)
        per_fit += seconds
        scores.append(sweep.score_SQ[0])
        del layer
    per_layer_scores = np.stack(scores)
    print(f"per layer: stream {per_stream:.2f} s, fit {per_fit:.2f} s")
    once_total, per_total = once_stream + once_fit, per_stream + per_fit

    # 3. scikit-learn on a few probes
    sk = None
    if n_sklearn:
        picks = np.linspace(0, L * S - 1, min(n_sklearn, L * S)).round().astype(int).tolist()
        sk_seconds, sk_acc = sklearn_probes(acts, labels, split, probe_cfg, picks)
        ours = once.score_SQ.reshape(-1)[picks]
        sk = {"probes_timed": len(picks), "seconds_per_probe": round(sk_seconds / len(picks), 5),
              "ours_seconds_per_probe": round(once_fit / (L * S), 5),
              "ratio": round((sk_seconds / len(picks)) / (once_fit / (L * S)), 2),
              "max_accuracy_diff": round(float(np.abs(sk_acc - ours).max()), 4)}
        print(f"scikit-learn: {sk['seconds_per_probe']:.4f} s per probe against ours "
              f"{sk['ours_seconds_per_probe']:.4f} (×{sk['ratio']}); held-out accuracy within "
              f"{sk['max_accuracy_diff']}")
    best_s, best_q = np.unravel_index(np.nanargmax(once.score_SQ), once.score_SQ.shape)
    record = {
        "device": str(device), "threads": torch.get_num_threads(), "quick": args.quick, "dtype": args.dtype,
        "model": {"n_layers": L, "d_model": cfg_model.d_model, "n_heads": cfg_model.n_heads,
                  "d_vocab": cfg_model.d_vocab, "n_ctx": S, "parameters": n_params},
        "prompts": n_prompts, "probes": L * S, "train_prompts": once.n_train, "test_prompts": once.n_test,
        "activation_gb": round(acts.acts_SQND.numel() * acts.acts_SQND.element_size() / 1e9, 3),
        "once": {"stream_s": round(once_stream, 3), "fit_s": round(once_fit, 3), "total_s": round(once_total, 3)},
        "per_layer": {"stream_s": round(per_stream, 3), "fit_s": round(per_fit, 3), "total_s": round(per_total, 3)},
        "stream_ratio": round(per_stream / once_stream, 2), "total_ratio": round(per_total / once_total, 2),
        "max_score_diff_between_the_two": round(float(np.abs(per_layer_scores - once.score_SQ).max()), 4),
        "best_probe": {"site": sites[best_s], "position": int(best_q), "accuracy": round(float(once.score_SQ.max()), 4),
                       "control": round(float(once.control_SQ[best_s, best_q]), 4)},
        "mean_shuffled_accuracy": round(float(once.shuffled_SQ.mean()), 4),
        "sklearn": sk,
    }
    print(f"streaming once {once_total:.2f} s against a pass per layer {per_total:.2f} s: ×{record['total_ratio']} "
          f"(streaming alone ×{record['stream_ratio']})")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
