"""Faulty sites in Flower's simulation engine: one site sends NaN weights, one site's data does
not fit the federation's model. Both are left out by name, the round goes on, and the global
model is exactly what the healthy site's update makes it."""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp

from client.app import create_client_app
from mrprism_core.checkpoint import load_checkpoint
from mrprism_core.federated import PACKED_KEY
from server.config import RunConfig
from server.federation import initial_arrays

from .conftest import simulate

NAN_PARTITION = 1


def _with_a_nan_sender(state_dirs: list[str]) -> ClientApp:
    """Our ClientApp, except that partition 1 poisons its (otherwise honest) update."""
    honest = create_client_app(state_dirs)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = honest(msg, context)
        if int(context.node_config["partition-id"]) == NAN_PARTITION:
            vector = reply.content["arrays"].to_torch_state_dict()[PACKED_KEY].clone()
            vector[::97] = float("nan")
            reply.content["arrays"] = ArrayRecord({PACKED_KEY: vector})
        return reply

    @app.evaluate()
    def evaluate(msg, context):
        return honest(msg, context)

    return app


def _run(out_dir, state_dirs, **overrides):
    config = {
        "num-server-rounds": 1,
        "min-available-nodes": 3,
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
        **overrides,
    }
    history = simulate(config, state_dirs, client_app=_with_a_nan_sender(state_dirs))
    return config, history[-1], load_checkpoint(out_dir / "global_model.pt")["shared_state"]


def test_nan_update_and_unfit_site_are_left_out_by_name(tmp_path, make_site):
    state_dirs = [
        make_site("synthetic_a"),
        make_site("synthetic_b"),  # sends NaN
        make_site("synthetic_c", "data.style.channels=1"),  # grey images: cannot take part
    ]
    _, record, global_state = _run(tmp_path / "quorum1", state_dirs)

    reasons = " | ".join(d["reason"] for d in record["dropped"])
    assert len(record["dropped"]) == 2, reasons
    assert {
        "site": "synthetic_b",
        "reason": f"update rejected: {PACKED_KEY} contains NaN or Inf",
    } in (record["dropped"])
    assert "site synthetic_c cannot take part" in reasons and "in_channels=1" in reasons
    assert set(record["train_sites"]) == {"synthetic_a"}
    assert record["aggregated"] is True

    # FedAvg of one update is that update: the global model is site A's, finite everywhere
    site_a = load_checkpoint(f"{state_dirs[0]}/site_model.pt")["shared_state"]
    for key, value in global_state.items():
        assert torch.isfinite(value).all(), key
        assert torch.allclose(value, site_a[key], atol=1e-6), key


def test_too_few_usable_updates_keep_the_global_model(tmp_path, make_site):
    state_dirs = [
        make_site("synthetic_a"),
        make_site("synthetic_b"),
        make_site("synthetic_c", "data.style.channels=1"),
    ]
    overrides = {"min-train-replies": 2}
    config, record, global_state = _run(tmp_path / "quorum2", state_dirs, **overrides)
    assert record["aggregated"] is False
    assert set(record["train_sites"]) == {"synthetic_a"}
    initial = initial_arrays(RunConfig.from_mapping(config))
    for key, value in initial.items():
        assert torch.equal(global_state[key], value), key
