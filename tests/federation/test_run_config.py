from __future__ import annotations

import pytest
import tomllib

from server.config import RunConfig
from server.federation import user_level_privacy
from server.strategies import DP_MODES, STRATEGY_NAMES, build_strategy

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


@pytest.mark.parametrize("mode", [m for m in DP_MODES if m != "none"])
def test_dp_modes_wrap_the_chosen_strategy_in_flowers_dp_strategy(mode):
    strategy = build_strategy(RunConfig(dp_mode=mode))
    kind = mode.split("-")[0].capitalize() + "Side" + mode.split("-")[1].capitalize()
    assert type(strategy).__name__ == f"DifferentialPrivacy{kind}Clipping"
    assert type(strategy.strategy).__name__ == "FedAvg"
    with pytest.raises(ValueError, match="unknown dp-mode"):
        build_strategy(RunConfig(dp_mode="local"))


def test_user_level_epsilon_grows_with_rounds_and_shrinks_with_noise():
    cfg = RunConfig(dp_mode="server-fixed", dp_noise_multiplier=1.0)
    one, ten = (user_level_privacy(cfg, r)["epsilon"] for r in (1, 10))
    assert 0 < one < ten < float("inf")
    louder = user_level_privacy(RunConfig(dp_mode="server-fixed", dp_noise_multiplier=2.0), 10)
    assert louder["epsilon"] < ten
    assert user_level_privacy(RunConfig(dp_mode="server-adaptive"), 3)["epsilon"] is None
    assert user_level_privacy(RunConfig(), 3) == {}
