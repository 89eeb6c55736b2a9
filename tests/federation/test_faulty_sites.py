"""Faulty sites in Flower's simulation engine: one site sends NaN weights, one site's data does
not fit the federation's model. Both are left out by name, the round goes on, and the global
model is exactly what the healthy site's update makes it."""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.clientapp import ClientApp

from client.app import create_client_app
from mrprism_core.checkpoint import load_checkpoint
from mrprism_core.federated import PACKED_KEY
from mrprism_core.update_codec import UPDATE_KEY
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
            # the weights, or their float16 change (update-precision): NaN either way
            arrays = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
            key = UPDATE_KEY if UPDATE_KEY in arrays else PACKED_KEY
            arrays[key][::97] = np.nan
            reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
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
    config, record, global_state = _run(tmp_path / "quorum1", state_dirs)

    reasons = " | ".join(d["reason"] for d in record["dropped"])
    assert len(record["dropped"]) == 2, reasons
    assert {
        "site": "synthetic_b",
        "reason": f"update rejected: {PACKED_KEY} contains NaN or Inf",
    } in (record["dropped"])
    assert "site synthetic_c cannot take part" in reasons and "in_channels=1" in reasons
    assert set(record["train_sites"]) == {"synthetic_a"}
    assert record["aggregated"] is True

    # FedAvg of one update is that update: the global model is site A's, finite everywhere,
    # to within float16's precision (2**-11) of the change site A sent
    site_a = load_checkpoint(f"{state_dirs[0]}/site_model.pt")["shared_state"]
    initial = initial_arrays(RunConfig.from_mapping(config))
    for key, value in global_state.items():
        assert torch.isfinite(value).all(), key
        change = (site_a[key] - initial[key]).abs()
        rounding = site_a[key].abs() * 2**-23  # float32's, adding the change back
        assert ((value - site_a[key]).abs() <= change * 2**-11 + rounding).all(), key


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


def _out_in_round_two(state_dirs: list[str], partition: int) -> ClientApp:
    """Our ClientApp, except that ``partition`` answers round 2's training with an error."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    honest = create_client_app(state_dirs)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if (
            int(context.node_config["partition-id"]) == partition
            and msg.content["config"]["server-round"] == 2
        ):
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="power cut")
            return Message(error, reply_to=msg)
        return honest(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return honest(msg, context)

    return app


def test_a_site_out_for_a_round_keeps_its_share_of_scaffolds_server_control(tmp_path, make_site):
    """SCAFFOLD's server control variate is the weighted mean of every site's latest c_i, also
    of a site that missed the last round (its c_i of round 1 still corrects its own steps);
    the mean of the round's repliers alone would leave it out."""
    from client.state import SiteStore
    from mrprism_core.federated import StateLayout

    state_dirs = [make_site(name) for name in ("synthetic_a", "synthetic_b", "synthetic_c")]
    out_dir = tmp_path / "server"
    config = {
        "num-server-rounds": 2,
        "min-available-nodes": 3,
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
        "drift-correction": "scaffold",
    }
    history = simulate(config, state_dirs, client_app=_out_in_round_two(state_dirs, 1))
    assert [set(r["train_sites"]) for r in history] == [
        {"synthetic_a", "synthetic_b", "synthetic_c"},
        {"synthetic_a", "synthetic_c"},
    ]
    server = load_checkpoint(out_dir / "global_model.pt")
    layout = StateLayout.of(server["shared_state"])

    def own(state_dir: str) -> torch.Tensor:
        return layout.pack_padded(SiteStore(state_dir).load_control(server["control_ledger"]))

    weight = {name: float(row["num-examples"]) for name, row in history[0]["train_sites"].items()}
    controls = {
        name: own(d) for name, d in zip(("synthetic_a", "synthetic_b", "synthetic_c"), state_dirs)
    }

    def mean(names) -> torch.Tensor:
        return sum(weight[n] * controls[n] for n in names) / sum(weight[n] for n in names)

    assert server["control_weights"] == weight
    assert controls["synthetic_b"].abs().max() > 0  # its round-1 c_i, kept at the site
    assert torch.allclose(server["control_variate"], mean(weight), atol=1e-6)
    assert not torch.allclose(server["control_variate"], mean(history[1]["train_sites"]), atol=1e-4)
