"""TensorBoard tracking from the ServerApp (run config ``tracking``): per round, the aggregated
and per-site numbers of ``metrics.jsonl``."""

from __future__ import annotations

import json

import pytest

from ..core.test_tracking import scalars
from .conftest import simulate


def test_the_server_app_writes_each_rounds_aggregate_and_site_scores(tmp_path, make_site):
    state_dirs = [make_site("synthetic_a"), make_site("synthetic_b")]
    out_dir = tmp_path / "server"
    config = {
        "num-server-rounds": 2,
        "tracking": "tensorboard",
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
        "lr-schedule": "cosine",
    }
    rounds = simulate(config, state_dirs)
    logged = scalars(out_dir / "tensorboard")
    for site in ("synthetic_a", "synthetic_b"):
        expected = [r["evaluate_sites"][site]["soft-dice"] for r in rounds]
        assert [step for step, _ in logged[f"evaluate/soft-dice/{site}"]] == [1, 2]
        assert [v for _, v in logged[f"evaluate/soft-dice/{site}"]] == pytest.approx(expected)
        loss = [r["train_sites"][site]["train-loss"] for r in rounds]
        assert [v for _, v in logged[f"train/train-loss/{site}"]] == pytest.approx(loss)
    assert [v for _, v in logged["evaluate/soft-dice"]] == pytest.approx(
        [r["evaluate"]["soft-dice"] for r in rounds]
    )
    assert [v for _, v in logged["round/dropped_sites"]] == [0.0, 0.0]
    assert [v for _, v in logged["round/lr"]] == pytest.approx([1e-2, 5e-3])  # tiny, cosine
