"""benchmarks/probe_speed.py at smoke-test size: both ways of sweeping give the same probes, every
time is positive, scikit-learn agrees on the probes it fits, and the last line is the JSON record."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("probe_speed_benchmark", ROOT / "benchmarks" / "probe_speed.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_both_sweeps_and_scikit_learn(capsys):
    returned = bench.main(["--quick", "--device", "cpu", "--prompts", "80"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == json.loads(json.dumps(returned))
    assert out["quick"] is True and out["prompts"] == 80 and out["probes"] == 2 * 16
    assert out["train_prompts"] + out["test_prompts"] == 80
    for way in ("once", "per_layer"):
        assert all(positive(out[way][k]) for k in ("stream_s", "fit_s", "total_s")), out[way]
    assert positive(out["stream_ratio"]) and positive(out["total_ratio"])
    assert out["max_score_diff_between_the_two"] <= 0.05  # the same probes, fitted in other batches
    assert out["best_probe"]["position"] == 0 and out["best_probe"]["accuracy"] >= 0.8  # the label is read there
    sk = out["sklearn"]
    assert sk["probes_timed"] == 2 and positive(sk["seconds_per_probe"]) and sk["max_accuracy_diff"] <= 0.1


@pytest.mark.parametrize("argv", [["--prompts", "0"], ["--layers", "-1"], ["--dtype", "float16"],
                                  ["--sklearn-probes", "-2"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err
