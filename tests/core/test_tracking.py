"""TensorBoard tracking of centralized training and of the simulation's local method: the event
files hold the numbers the runs also wrote to their own logs."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mrprism_core.tracking import check_tracking, open_tracker
from mrprism_core.train import fit

from .test_train import _config


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_centralized_training_writes_every_epoch_and_the_test_score(tmp_path):
    cfg = {**_config(tmp_path, 2), "tracking": "tensorboard"}
    results = fit(cfg)
    logged = scalars(tmp_path / "tensorboard")
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in logged["train/loss"]] == [1, 2]
    assert [v for _, v in logged["train/loss"]] == pytest.approx(
        [h["train"]["loss"] for h in history], rel=1e-6
    )
    assert [v for _, v in logged["val/soft_dice"]] == pytest.approx(
        [h["val"]["soft_dice"] for h in history], rel=1e-6
    )
    assert logged["test/soft_dice"] == [
        (results["tested_epoch"], pytest.approx(results["test"]["soft_dice"], rel=1e-6))
    ]


def test_no_tracking_writes_nothing_and_unknown_kinds_are_named(tmp_path):
    tracker = open_tracker("none", tmp_path)
    tracker.scalars(1, {"a": 1.0})
    tracker.close()
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ValueError, match="unknown tracking 'wandb'"):
        check_tracking("wandb")
