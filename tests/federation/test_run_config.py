from __future__ import annotations

import pytest
import tomllib
import torch

from mrprism_core.checkpoint import save_checkpoint
from mrprism_core.data.factory import DatasetInfo
from mrprism_core.federated import StateLayout
from mrprism_core.models import build_model_for_data, split_state
from mrprism_core.models.config import get_preset
from server.config import RunConfig
from server.federation import initial_arrays, round_instructions, user_level_privacy
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
    with pytest.raises(
        ValueError, match=r"run-config num-server-rounds=0 is refused: must be >= 1"
    ):
        RunConfig.from_mapping({"num-server-rounds": 0})
    with pytest.raises(
        ValueError, match=r"run-config dp-clipping-norm=0.0 is refused: must be > 0"
    ):
        RunConfig.from_mapping({"dp-clipping-norm": 0})
    # zero where zero means something: no evaluation, no server momentum, no DP noise
    zeros = {"fraction-evaluate": 0, "min-evaluate-nodes": 0, "server-momentum": 0, "lr": 0}
    assert RunConfig.from_mapping({**zeros, "dp-noise-multiplier": 0}).fraction_evaluate == 0
    spec = RunConfig(local_modules="divp, confidence.rater_identity").model_spec()
    assert spec["options"]["local_modules"] == ["divp", "confidence.rater_identity"]


def test_site_learning_rate_is_the_presets_unless_set():
    assert RunConfig(preset="paper").site_lr() == get_preset("paper").lr
    assert RunConfig(preset="tiny").site_lr() == get_preset("tiny").lr
    assert get_preset("paper").lr != get_preset("tiny").lr  # the lookup is by preset
    assert RunConfig(preset="paper", lr=0.02).site_lr() == 0.02


def test_an_unknown_lr_schedule_is_refused_with_its_run_config_key():
    cfg = RunConfig(lr_schedule="linear")
    layout = StateLayout.of(initial_arrays(cfg))
    with pytest.raises(ValueError, match="run-config lr-schedule=linear: unknown"):
        round_instructions(cfg, layout)


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


def _centralized_checkpoint(path, in_channels: int):
    """A centralized-style checkpoint (build_args + model_state) of a model trained elsewhere."""
    spec = {**RunConfig().model_spec(), "in_channels": in_channels}
    torch.manual_seed(123)
    model = build_model_for_data(spec, DatasetInfo(in_channels, 2, 5, image_size=32))
    save_checkpoint(path, {"build_args": model.build_args, "model_state": model.state_dict()})
    return split_state(model)[0]


def test_initial_checkpoint_supplies_the_shared_weights(tmp_path):
    trained = _centralized_checkpoint(tmp_path / "last.pt", in_channels=3)
    fresh = initial_arrays(RunConfig())
    started = initial_arrays(RunConfig(initial_checkpoint=str(tmp_path / "last.pt")))
    assert set(started) == set(fresh)  # the rater heads of the 5-rater model are not taken
    assert all(torch.equal(started[key], trained[key]) for key in fresh)
    assert not all(torch.equal(started[key], fresh[key]) for key in fresh)


def test_initial_checkpoint_of_another_architecture_is_refused_naming_both_shapes(tmp_path):
    grey = _centralized_checkpoint(tmp_path / "grey.pt", in_channels=1)
    expected = initial_arrays(RunConfig())
    key = next(k for k in expected if grey[k].shape != expected[k].shape)
    with pytest.raises(ValueError) as err:
        initial_arrays(RunConfig(initial_checkpoint=str(tmp_path / "grey.pt")))
    message = str(err.value)
    assert key in message
    assert str(tuple(grey[key].shape)) in message and str(tuple(expected[key].shape)) in message
    assert "'in_channels': 1" in message  # what the checkpoint was written for
