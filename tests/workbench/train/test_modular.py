"""The modular-addition task's config: a modulus too large for its tables is refused up front."""

from __future__ import annotations

import json

import pytest

from workbench.cli import main
from workbench.errors import ConfigError
from workbench.train.modular import MAX_P, ModularConfig, modular_data


def test_a_modulus_too_large_for_the_tables_is_a_config_error():
    with pytest.raises(ConfigError, match=r"ModularConfig\.p must be .*at most 1024.*p² pairs"):
        ModularConfig(p=10_000_019)
    with pytest.raises(ConfigError, match="at most 1024"):
        modular_data(10_000_019, 0.5)
    assert ModularConfig(p=MAX_P - 3).p == 1021  # the largest prime allowed


def test_train_with_a_huge_p_is_an_error_line(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"task": "modular-addition", "p": 10_000_019, "n_steps": 20}))
    assert main(["train", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ModularConfig.p must be") and "10000019" in err
    assert not (tmp_path / "run").exists()
