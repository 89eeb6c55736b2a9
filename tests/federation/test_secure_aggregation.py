"""SecAgg+: the server only ever sees masked vectors, yet the global model equals plain FedAvg
of what the sites trained, within quantization error; in Flower's simulation engine, and in a
deployment whose site workers train during the key exchange (``secagg-train-ahead``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from mrprism_core.checkpoint import load_checkpoint
from mrprism_core.protocol import LEGACY_WEIGHTS_RECORD, TRAIN_AHEAD_KEY

from .conftest import simulate
from .deploy import Deployment, history

SITES = {"synthetic_a": 3, "synthetic_b": 5, "synthetic_c": 7}  # site -> training cases


def _run_config(out_dir: Path, rounds: int, **extra: object) -> dict:
    """SecAgg+ over the three sites, every one training each round."""
    return {
        "num-server-rounds": rounds,
        "min-available-nodes": 3,
        "min-train-nodes": 3,
        "secure-aggregation": True,
        "secagg-max-weight": 10.0,  # >= every site's example count; sets the quantization step
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
        **extra,
    }


def test_secagg_plus_aggregate_equals_fedavg_of_the_site_updates(tmp_path, make_site):
    """Two rounds; the first site answers as a site whose worker trains during the key
    exchange. The weights come with the setup stage to every site in round 1 and then only to
    that one, and with the collect stage only to the sites that did not say they train."""
    state_dirs = [make_site(site, f"data.splits.train={n}") for site, n in SITES.items()]
    out_dir = tmp_path / "server"
    notes = tmp_path / "notes"
    notes.mkdir()
    app = _first_site_trains_ahead(state_dirs, notes)
    rounds = simulate(_run_config(out_dir, rounds=2), state_dirs, client_app=app)
    assert all(record["secure_aggregation"] is True for record in rounds)
    assert [set(record["train_sites"]) for record in rounds] == [set(SITES)] * 2
    seen = sorted(tuple(json.loads(line)) for line in (notes / "stages").read_text().splitlines())
    # (site, stage, weight arrays the message brought, marked as trained ahead), both rounds
    ahead = [(0, "collect_masked_vectors", 0, True), (0, "setup", 1, False)] * 2
    declined = [(site, "collect_masked_vectors", 1, False) for site in (1, 2)] * 2
    declined += [(site, "setup", weights, False) for site in (1, 2) for weights in (0, 1)]
    assert seen == sorted(ahead + declined)
    global_state = load_checkpoint(out_dir / "global_model.pt")["shared_state"]
    _assert_fedavg_of_trained(global_state, state_dirs, [float(n) for n in SITES.values()])


def _first_site_trains_ahead(state_dirs: list[str], notes: Path):  # noqa: ANN202
    """Our ClientApp (no site worker in simulation); the first site plays one whose worker
    trains ahead: it keeps the weights its setup message brings, marks its setup reply, and
    puts them back into its collect message, which brings none. Every site notes, per SecAgg+
    stage of training, the weight arrays and the mark its message brought."""
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from client.app import create_client_app

    honest = create_client_app(state_dirs)
    app = ClientApp()
    kept = notes / "weights.npz"

    @app.train()
    def train(msg, context):  # noqa: ANN001, ANN202
        site = int(context.node_config["partition-id"])
        stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        weights = msg.content.array_records.get(LEGACY_WEIGHTS_RECORD, ArrayRecord())
        marked = TRAIN_AHEAD_KEY in msg.content.config_records
        if stage in ("setup", "collect_masked_vectors"):
            with (notes / "stages").open("a") as out:
                out.write(json.dumps([site, stage, len(weights), marked]) + "\n")
        if site != 0:
            return honest(msg, context)
        if stage == "setup":
            np.savez(kept, **{name: array.numpy() for name, array in weights.items()})
            reply = honest(msg, context)
            reply.content.config_records[TRAIN_AHEAD_KEY] = ConfigRecord({"started": True})
            return reply
        if marked:
            with np.load(kept) as saved:
                restored = {name: Array(saved[name]) for name in saved.files}
            msg.content.array_records[LEGACY_WEIGHTS_RECORD] = ArrayRecord(restored)
            del msg.content.config_records[TRAIN_AHEAD_KEY]
        return honest(msg, context)

    return app


def _assert_fedavg_of_trained(global_state: dict, state_dirs: list, weights: list[float]) -> None:
    """The global weights are the example-weighted mean of what each site trained (kept in its
    own snapshot), within SecAgg+'s quantization: 2**22 levels over [-8, 8] of weight x
    examples / max-weight."""
    trained = [load_checkpoint(f"{d}/site_model.pt")["shared_state"] for d in state_dirs]
    total = sum(weights)
    for key, value in global_state.items():
        by_hand = sum(w * t[key] for w, t in zip(weights, trained)) / total
        assert value.dtype == by_hand.dtype, key
        assert float((value - by_hand).abs().max()) < 1e-4, key
    # and it is an aggregate, not one site's weights passed through
    assert any(not torch.allclose(global_state[k], trained[0][k], atol=1e-3) for k in global_state)


def test_in_a_deployment_site_workers_train_during_the_key_exchange(tmp_path):
    """Three SuperNodes with their site workers: each round's weights come with the setup
    stage, every worker trains on them then (not in the collect stage, whose message brings
    none), and the masked sum is still FedAvg of what the sites trained."""
    deployment = Deployment(tmp_path)
    small = ["data.splits.val=2", "data.image_size=32"]
    try:
        deployment.start_superlink()
        for site, cases in SITES.items():
            deployment.start_site(site, *small, f"data.splits.train={cases}")
        deployment.wait_online(3, timeout=300)
        out_dir = tmp_path / "server"
        result = deployment.run(_run_config(out_dir, rounds=2), timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        deployment.stop()  # the workers write the snapshots they kept behind their replies
    rounds = history(out_dir)
    assert [set(r["train_sites"]) for r in rounds] == [set(SITES)] * 2
    for site in SITES:
        log = deployment.log(site)
        # "<kind> message <n> in <s> s", as the site worker prints each request
        served = re.findall(r"^([a-z-]+) message \d+ in", log, re.MULTILINE)
        assert served == ["train-ahead", "collect"] * 2, log[-3000:]
    global_state = load_checkpoint(out_dir / "global_model.pt")["shared_state"]
    state_dirs = [deployment.site_dir(site) for site in SITES]
    _assert_fedavg_of_trained(global_state, state_dirs, [float(n) for n in SITES.values()])


def test_scaffold_under_secagg_plus_folds_the_masked_mean_change_into_the_server_control(
    tmp_path, make_site
):
    """With SCAFFOLD the sites' control-variate changes are masked and summed with their
    weights; the server folds the unmasked mean into its control variate, which after two rounds
    is the example-weighted mean of every site's own c_i (kept at the site). Taking the mean
    change for the control variate itself, or sites sending their whole c_i, would miss it."""
    from client.state import SiteStore
    from mrprism_core.federated import StateLayout

    state_dirs = [make_site(site, f"data.splits.train={n}") for site, n in SITES.items()]
    out_dir = tmp_path / "server"
    config = _run_config(out_dir, rounds=2, **{"drift-correction": "scaffold"})
    noted = tmp_path / "dtypes"  # the ClientApps run in the simulation's worker processes
    history = simulate(config, state_dirs, client_app=_noting_dtypes(state_dirs, noted))
    assert [set(r["train_sites"]) for r in history] == [set(SITES)] * 2
    # every round, the first included, sends the model's float32, not SecAgg+'s float64
    received = noted.read_text().split()
    assert len(received) >= 2 * len(SITES) and set(received) == {"float32"}, received
    server = load_checkpoint(out_dir / "global_model.pt")
    layout = StateLayout.of(server["shared_state"])
    controls = [
        layout.pack_padded(SiteStore(d).load_control(server["control_ledger"])) for d in state_dirs
    ]
    weights = [float(n) for n in SITES.values()]
    by_hand = sum(w * c for w, c in zip(weights, controls)) / sum(weights)
    assert server["control_weights"] == dict(zip(SITES, weights))
    assert by_hand.abs().max() > 1e-3  # the sites' mean gradients are not nothing
    error = float((server["control_variate"] - by_hand).abs().max())
    assert error < 1e-4, error  # SecAgg+'s quantization, as for the weights
    # the weights are still FedAvg of what the sites trained in round 2
    _assert_fedavg_of_trained(server["shared_state"], state_dirs, weights)


def _noting_dtypes(state_dirs: list[str], noted: Path):  # noqa: ANN202
    """Our ClientApp, noting in ``noted`` the dtype of every array the server sends it."""
    from flwr.clientapp import ClientApp
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    from client.app import create_client_app

    honest = create_client_app(state_dirs)
    app = ClientApp()

    @app.train()
    def train(msg, context):  # noqa: ANN001, ANN202
        if LEGACY_WEIGHTS_RECORD in msg.content:  # SecAgg+ speaks Flower's legacy records
            instruction = recorddict_to_fitins(msg.content, keep_input=True)
            with noted.open("a") as out:
                arrays = parameters_to_ndarrays(instruction.parameters)
                out.writelines(f"{array.dtype}\n" for array in arrays)
        return honest(msg, context)

    return app
