"""Differential privacy: record-level DP-SGD at a site (Opacus) and Flower's user-level DP on
the shared update. The epsilon is reported, grows with rounds, is enforced as a budget, and the
noise and clipping really change what is sent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from client.app import create_client_app
from mrprism_core.checkpoint import load_checkpoint
from server.config import RunConfig
from server.federation import initial_arrays

from .conftest import node_context, reply_weights, simulate, train_message

FAST = RunConfig(model_options=json.dumps({"recurrences": 1}), num_server_rounds=2)


def test_dp_sgd_epsilon_grows_with_rounds_and_the_noise_changes_the_update(
    make_site, task_identity
):
    app = create_client_app()
    noisy = make_site("synthetic_a", "privacy.enabled=true", "privacy.noise_multiplier=1.0")
    epsilons = []
    for server_round in (1, 2):
        reply = app(train_message(FAST, server_round)[0], node_context(noisy))
        metrics = reply.content.metric_records["metrics"]
        epsilons.append(metrics["dp-epsilon"])
        assert metrics["dp-delta"] == 1e-5 and metrics["dp-noise-multiplier"] == 1.0
    assert 0 < epsilons[0] < epsilons[1] and math.isfinite(epsilons[1])
    ledger = json.loads((Path(noisy) / "privacy_ledger.json").read_text())
    assert ledger["epsilon"] == epsilons[1]
    assert sum(steps for _, _, steps in ledger["history"]) == 2  # one noisy step per round

    # same seed, same clipping and sampling: only the noise differs between these two sites
    updates = {}
    for name, noise in (("quiet", 0.0), ("quiet_again", 0.0), ("loud", 1.0)):
        options = ("privacy.enabled=true", f"privacy.noise_multiplier={noise}")
        state_dir = make_site("synthetic_b", *options, name=name)
        message = train_message(FAST)[0]
        updates[name] = reply_weights(app(message, node_context(state_dir)), message)
    jitter = np.abs(updates["quiet"] - updates["quiet_again"]).max()  # float round-off only
    noise = np.abs(updates["quiet"] - updates["loud"]).max()
    assert jitter < 1e-6 and noise > 1e-4, (jitter, noise)


def test_a_spent_privacy_budget_stops_the_site(make_site, task_identity):
    app = create_client_app()
    cfg = RunConfig(model_options=json.dumps({"recurrences": 1}), num_server_rounds=1)
    state_dir = make_site("synthetic_a", "privacy.enabled=true", "privacy.target_epsilon=3.0")
    first = app(train_message(cfg, 1)[0], node_context(state_dir))
    spent = first.content.metric_records["metrics"]["dp-epsilon"]
    assert 2.0 < spent <= 3.0  # calibrated to the budget for the one planned round
    second = app(train_message(cfg, 2)[0], node_context(state_dir))  # one round too many
    assert second.has_error() and "privacy budget spent" in second.error.reason


def test_user_level_dp_clips_each_site_update_before_aggregation(tmp_path, make_site):
    """Flower's client-side fixed clipping with a tiny bound and no noise: every update is
    clipped to (almost) nothing at the site, so the global model stays where it was."""
    state_dirs = [make_site("synthetic_a"), make_site("synthetic_b")]
    out_dir = tmp_path / "server"
    config = {
        "num-server-rounds": 1,
        "dp-mode": "client-fixed",
        "dp-clipping-norm": 1e-6,
        "dp-noise-multiplier": 0.0,
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
    }
    record = simulate(config, state_dirs)[0]
    assert set(record["train_sites"]) == {"synthetic_a", "synthetic_b"}
    assert record["user_level_dp"]["mode"] == "client-fixed"
    initial = initial_arrays(RunConfig.from_mapping(config))
    final = load_checkpoint(out_dir / "global_model.pt")["shared_state"]
    trained = load_checkpoint(f"{state_dirs[0]}/site_model.pt")["shared_state"]
    moved = max(float((final[k] - initial[k]).abs().max()) for k in initial)
    trained_moved = max(float((trained[k] - initial[k]).abs().max()) for k in initial)
    assert moved < 1e-5 < trained_moved  # the sites did train; their updates were clipped
    assert all(torch.isfinite(v).all() for v in final.values())
