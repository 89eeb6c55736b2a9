from __future__ import annotations

import pytest
import tomllib

from server.config import RunConfig
from server.strategies import STRATEGY_NAMES, build_strategy

from .deploy import PROJECT_ROOT


def test_pyproject_run_config_matches_the_dataclass_defaults():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_mapping(declared) == RunConfig()
    assert set(declared) == set(RunConfig().as_run_config())


def test_run_config_coerces_and_rejects():
    cfg = RunConfig.from_mapping({"num-server-rounds": "4", "resume": "false", "lr": 1})
    assert (cfg.num_server_rounds, cfg.resume, cfg.lr) == (4, False, 1.0)
    with pytest.raises(ValueError, match="unknown run-config key 'rounds'"):
        RunConfig.from_mapping({"rounds": 3})
    with pytest.raises(ValueError, match="must be int"):
        RunConfig.from_mapping({"local-epochs": 1.5})
    spec = RunConfig(local_modules="divp, confidence.rater_identity").model_spec()
    assert spec["options"]["local_modules"] == ["divp", "confidence.rater_identity"]


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_builds(name):
    assert type(build_strategy(RunConfig(strategy=name))).__name__.lower() == name


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="choose one of"):
        build_strategy(RunConfig(strategy="fedsgd"))
