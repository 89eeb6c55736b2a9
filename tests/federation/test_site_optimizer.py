"""A site's Adam state survives rounds and restarts, stays in its state dir, and is dropped
(not crashed on) when the model changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site import SiteRuntime
from client.state import OPTIMIZER_FILE, SiteStore
from server.config import RunConfig


def _round(state_dir: str, spec: dict, server_round: int, lr: float = 1e-3, **options) -> None:
    site = SiteRuntime.from_state_dir(state_dir)  # a fresh process every round, as in Flower
    model = site.build_model(spec)
    site.train(
        model, local_epochs=1, lr=lr, seed=server_round, server_round=server_round, **options
    )


def _steps(state_dir: str) -> int:
    return int(SiteStore(state_dir).load_optimizer()["state"][0]["step"])


def test_optimizer_state_round_trips_and_a_restarted_site_continues_with_it(make_site):
    state_dir = make_site("synthetic_a")
    spec = RunConfig().model_spec()
    _round(state_dir, spec, server_round=1)
    first = _steps(state_dir)
    assert first >= 1
    moments = SiteStore(state_dir).load_optimizer()["state"][0]["exp_avg"].clone()
    _round(state_dir, spec, server_round=2, lr=5e-4)
    saved = SiteStore(state_dir).load_optimizer()
    assert _steps(state_dir) == 2 * first  # continued, not restarted
    assert saved["param_groups"][0]["lr"] == 5e-4  # this round's learning rate
    assert not saved["state"][0]["exp_avg"].equal(moments)


def test_without_persistence_nothing_is_written(make_site):
    state_dir = make_site("synthetic_a")
    _round(state_dir, RunConfig().model_spec(), server_round=1, persist_optimizer=False)
    assert not (Path(state_dir) / OPTIMIZER_FILE).exists()


def test_state_of_another_model_gives_a_fresh_optimizer(make_site, caplog):
    state_dir = make_site("synthetic_a")
    _round(state_dir, RunConfig().model_spec(), server_round=1)
    _round(state_dir, RunConfig(model="unet_mv").model_spec(), server_round=2)
    assert "belongs to another model" in caplog.text
    assert _steps(state_dir) == 1  # one batch of 4 cases, started afresh


def test_a_site_trains_at_the_rate_its_round_instructions_schedule(make_site, task_identity):
    from client.app import create_client_app
    from tests.federation.conftest import node_context, train_message

    replies = {}
    for schedule in ("constant", "cosine"):
        state_dir = make_site("synthetic_a", name=f"site_{schedule}")
        cfg = RunConfig(lr=0.01, num_server_rounds=4, lr_schedule=schedule)
        message, _ = train_message(cfg, server_round=3)
        reply = create_client_app()(message, node_context(state_dir))
        assert not reply.has_error(), reply.error
        replies[schedule] = SiteStore(state_dir).load_optimizer()["param_groups"][0]["lr"]
    # round 3 of 4: 0.01 x (1 + cos(pi / 2)) / 2 under cosine, 0.01 unchanged
    assert replies == {"constant": 0.01, "cosine": pytest.approx(0.005)}
