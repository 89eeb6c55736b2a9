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


def test_mlflow_holds_every_epoch_and_the_test_score_in_one_finished_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "server-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())  # as a team's server would be
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "refuge-study")
    cfg = {**_config(tmp_path / "out", 2), "tracking": "mlflow"}
    results = fit(cfg)
    history = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("refuge-study")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"  # closed, not left running
    assert not (tmp_path / "out" / "mlruns").exists()  # the configured server got it
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2]
    assert [m.value for m in losses] == pytest.approx([h["train"]["loss"] for h in history])
    (tested,) = client.get_metric_history(run.info.run_id, "test/soft_dice")
    assert tested.step == results["tested_epoch"]
    assert tested.value == pytest.approx(results["test"]["soft_dice"], rel=1e-6)


def test_mlflow_without_a_server_writes_beside_the_outputs_one_run_per_method(
    tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    for method, value in (("federated", 0.8), ("local", 0.6)):
        tracker = open_tracker("mlflow", tmp_path, method)
        tracker.scalars(3, {"evaluate/soft-dice/site_a": value, "note": "skipped"})
        tracker.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("mrprism-fl")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"federated", "local"}
    for method, value in (("federated", 0.8), ("local", 0.6)):
        (metric,) = client.get_metric_history(runs[method].info.run_id, "evaluate/soft-dice/site_a")
        assert (metric.step, metric.value) == (3, pytest.approx(value))
        assert set(runs[method].data.metrics) == {"evaluate/soft-dice/site_a"}
