"""The learning rate over a run: known values of the schedules, and centralized training
that really steps with them."""

from __future__ import annotations

import json
import math

import pytest

from mrprism_core.lr_schedule import check_lr_schedule, scheduled_lr
from mrprism_core.protocol import RoundInstructions
from mrprism_core.train import fit
from tests.core.test_train import _config


def test_constant_keeps_the_base_rate_and_cosine_halves_it_midway():
    assert [scheduled_lr(0.01, step, 4) for step in (1, 2, 3, 4)] == [0.01] * 4
    cosine = [scheduled_lr(0.01, step, 4, "cosine") for step in (1, 2, 3, 4)]
    # 0.01 * (1 + cos(pi * k / 4)) / 2 for k = 0..3, by hand
    expected = [0.01, 0.01 * (1 + math.sqrt(0.5)) / 2, 0.005, 0.01 * (1 - math.sqrt(0.5)) / 2]
    assert cosine == pytest.approx(expected)
    assert cosine[-1] > 0  # the last round still trains
    # a run resumed past its plan keeps the last rate; one step planned keeps the base rate
    assert scheduled_lr(0.01, 6, 4, "cosine") == pytest.approx(expected[-1])
    assert scheduled_lr(0.01, 1, 1, "cosine") == 0.01


def test_an_unknown_schedule_is_named_with_its_key():
    with pytest.raises(
        ValueError, match="federation.lr_schedule=linear: unknown .* constant, cosine"
    ):
        check_lr_schedule("linear", "federation.lr_schedule")
    with pytest.raises(ValueError, match="lr_schedule=step"):
        scheduled_lr(0.01, 1, 4, "step")


def test_a_site_reads_its_rounds_rate_from_the_instructions_it_is_sent():
    sent = RoundInstructions(
        model_spec={}, layout="x", lr=0.02, seed=0, num_server_rounds=3, lr_schedule="cosine"
    )
    received = RoundInstructions.from_config({**sent.to_config(), "server-round": 2})
    assert received.round_lr() == pytest.approx(0.02 * 0.75)  # (1 + cos(pi / 3)) / 2
    # a server that predates the schedule sends no key: the site keeps the constant rate
    legacy = {k: v for k, v in sent.to_config().items() if k != "lr-schedule"}
    assert RoundInstructions.from_config({**legacy, "server-round": 2}).round_lr() == 0.02


def test_centralized_training_steps_each_epoch_at_its_scheduled_rate(tmp_path):
    cfg = _config(tmp_path, 3)
    cfg["train"]["lr_schedule"] = "cosine"
    fit(cfg)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the rate each epoch's optimizer held: 1e-3 x (1, 0.75, 0.25)
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 7.5e-4, 2.5e-4])
