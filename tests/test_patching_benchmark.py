"""benchmarks/patching_speed.py at smoke-test size: every figure is there, every time finite and
positive, and ours agrees with TransformerLens's patching to 1e-5."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("patching_speed_benchmark", ROOT / "benchmarks" / "patching_speed.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up there
_spec.loader.exec_module(bench)

MODELS = ("attn-only-2l", "gelu-2l", "facts", "gpt2_small_random")
SWEEPS = ("resid_pre_by_position", "z_by_head", "z_by_head_position")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_reports_every_figure(capsys):
    returned = bench.main(["--quick", "--full", "--device", "cpu", "--gpt2-layers", "2", "--gpt2-width", "64"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(last)
    assert out == json.loads(json.dumps(returned))
    assert out["all_agree"] is True and out["full"] is True and out["agreement_tolerance"] == 1e-5
    assert sorted(out["models"]) == sorted(MODELS)
    for name in MODELS:
        figures = out["models"][name]
        assert figures["prompts"] >= 1 and figures["tokens"] >= 2 and figures["rounds"] == 1
        for key in SWEEPS:
            sweep = figures[key]
            assert sweep["tl_error"] is None, (name, key, sweep["tl_error"])
            assert all(positive(sweep[f]) for f in ("ours_s", "tl_s", "tl_cache_s", "ratio")), (name, key, sweep)
            assert sweep["patches"] > 0 and sweep["agree"] is True
            assert 0 <= sweep["max_abs_diff"] <= 1e-5, (name, key, sweep["max_abs_diff"])
        attribution = figures["attribution_z_by_head_position"]
        assert attribution["patches"] == figures["z_by_head_position"]["patches"]
        assert all(positive(attribution[f]) for f in ("exact_s", "attribution_s", "ratio")), (name, attribution)
        assert -1 <= attribution["correlation"] <= 1
    gpt2 = out["models"]["gpt2_small_random"]
    assert (gpt2["layers"], gpt2["width"], gpt2["parameters"] > 0) == (2, 64, True)
    eap = gpt2["eap"]
    assert "error" not in eap, eap.get("error")
    assert eap["edges"] > 0 and positive(eap["cold_s"]) and positive(eap["seconds"])


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--prompts", "0"], ["--gpt2-width", "-1"], ["--device"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "error" in capsys.readouterr().err
