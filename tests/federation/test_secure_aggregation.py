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
    exchange, the third fails its collect stage in round 1. Round 1's unmask messages have the
    sites make round 2's keys, so round 2 sends no setup message to the two sites that were
    unmasked, only to the third; the weights come with each site's first message of a round
    while it trains ahead, and with the collect stage to the sites that did not say they train.
    The keys made ahead are the ones used: round 2's masked sum is FedAvg of all three."""
    state_dirs = [make_site(site, f"data.splits.train={n}") for site, n in SITES.items()]
    out_dir = tmp_path / "server"
    notes = tmp_path / "notes"
    notes.mkdir()
    app = _scripted_sites(state_dirs, notes)
    rounds = simulate(_run_config(out_dir, rounds=2), state_dirs, client_app=app)
    assert all(record["secure_aggregation"] is True for record in rounds)
    assert [set(record["train_sites"]) for record in rounds] == [
        set(SITES) - {"synthetic_c"},
        set(SITES),
    ]
    assert [record["secagg_keys_made_ahead"] for record in rounds] == [0, 2]
    seen = sorted(tuple(json.loads(line)) for line in (notes / "stages").read_text().splitlines())
    # (round, site, stage, weight arrays the message brought, marked) where the mark is the
    # train-ahead record, or at the unmask stage the record asking for the next round's keys
    setup, share, collect, unmask = "setup", "share_keys", "collect_masked_vectors", "unmask"
    expected = [
        (1, 0, setup, 1, False), (1, 0, share, 0, False), (1, 0, collect, 0, True),
        (1, 0, unmask, 0, True),
        (2, 0, share, 1, False), (2, 0, collect, 0, True), (2, 0, unmask, 0, False),
        (1, 1, setup, 1, False), (1, 1, share, 0, False), (1, 1, collect, 1, False),
        (1, 1, unmask, 0, True),
        (2, 1, share, 0, False), (2, 1, collect, 1, False), (2, 1, unmask, 0, False),
        (1, 2, setup, 1, False), (1, 2, share, 0, False), (1, 2, collect, 1, False),
        (2, 2, setup, 0, False), (2, 2, share, 0, False), (2, 2, collect, 1, False),
        (2, 2, unmask, 0, False),
    ]  # fmt: skip
    assert seen == sorted(expected)
    global_state = load_checkpoint(out_dir / "global_model.pt")["shared_state"]
    _assert_fedavg_of_trained(global_state, state_dirs, [float(n) for n in SITES.values()])


def test_a_site_that_lost_its_keys_made_ahead_sits_that_round_out(tmp_path, make_site):
    """A site whose SecAgg+ state is gone between its unmask stage, which made the next
    round's keys, and that round's share-keys stage (as when its SuperNode was started again)
    fails the share-keys stage; SecAgg+ leaves it out and aggregates the other two, and the
    round after sends it a setup message again, so it takes part once more."""
    state_dirs = [make_site(site, f"data.splits.train={n}") for site, n in SITES.items()]
    out_dir = tmp_path / "server"
    app = _site_forgetting_its_keys(state_dirs, site=1, server_round=2)
    rounds = simulate(_run_config(out_dir, rounds=3), state_dirs, client_app=app)
    everyone = set(SITES)
    assert [set(r["train_sites"]) for r in rounds] == [
        everyone,
        everyone - {"synthetic_b"},
        everyone,
    ]
    # round 3: the two sites unmasked in round 2 made their keys ahead, the third got a setup
    assert [r["secagg_keys_made_ahead"] for r in rounds] == [0, 3, 2]
    assert all(r["aggregated"] for r in rounds)
    global_state = load_checkpoint(out_dir / "global_model.pt")["shared_state"]
    _assert_fedavg_of_trained(global_state, state_dirs, [float(n) for n in SITES.values()])


def test_a_round_secagg_plus_halts_is_logged_as_not_aggregated(tmp_path, make_site):
    """Two of three sites fail round 1's collect stage, fewer than the two SecAgg+ needs to
    unmask: the round is halted, the weights stay, and its record says so; round 2 records its
    own three sites (they were once filed under the count of rounds that aggregated)."""
    state_dirs = [make_site(site, f"data.splits.train={n}") for site, n in SITES.items()]
    out_dir = tmp_path / "server"
    app = _sites_failing(
        state_dirs, {(1, 1, "collect_masked_vectors"), (2, 1, "collect_masked_vectors")}
    )
    rounds = simulate(_run_config(out_dir, rounds=2), state_dirs, client_app=app)
    assert [r["aggregated"] for r in rounds] == [False, True]
    assert [set(r["train_sites"]) for r in rounds] == [set(), set(SITES)]
    # no round-1 unmask, so no keys made ahead: round 2 began with a setup stage
    assert [r["secagg_keys_made_ahead"] for r in rounds] == [0, 0]


def _sites_failing(state_dirs: list[str], at: set[tuple[int, int, str]]):  # noqa: ANN202
    """Our ClientApp; each (site, round, SecAgg+ stage) in ``at`` is answered with an error."""
    from flwr.app import Error, Message
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from client.app import create_client_app

    honest = create_client_app(state_dirs)
    app = ClientApp()

    @app.train()
    def train(msg, context):  # noqa: ANN001, ANN202
        stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        site = int(context.node_config["partition-id"])
        if (site, int(msg.metadata.group_id), stage) in at:
            return Message(Error(code=0, reason="scripted failure"), reply_to=msg)
        return honest(msg, context)

    return app


def _site_forgetting_its_keys(state_dirs: list[str], site: int, server_round: int):  # noqa: ANN202
    """Our ClientApp; ``site`` loses its SecAgg+ state just before ``server_round``'s
    share-keys stage."""
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        RECORD_KEY_STATE,
        Key,
    )

    from client.app import create_client_app

    honest = create_client_app(state_dirs)
    app = ClientApp()

    @app.train()
    def train(msg, context):  # noqa: ANN001, ANN202
        stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        if (
            int(context.node_config["partition-id"]) == site
            and int(msg.metadata.group_id) == server_round
            and stage == "share_keys"
        ):
            del context.state.config_records[RECORD_KEY_STATE]
        return honest(msg, context)

    return app


def _scripted_sites(state_dirs: list[str], notes: Path):  # noqa: ANN202
    """Our ClientApp (no site worker in simulation), with two sites scripted. The first plays
    one whose worker trains ahead: it keeps the weights the round's first message brings, marks
    that reply, and puts them back into its collect message, which brings none. The third
    answers its round-1 collect stage with an error, as a site that fails there. Every site
    notes each SecAgg+ message: round, stage, the weight arrays it brought and its mark."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from client.app import create_client_app
    from mrprism_core.protocol import KEYS_AHEAD_KEY

    honest = create_client_app(state_dirs)
    app = ClientApp()
    kept = notes / "weights.npz"

    @app.train()
    def train(msg, context):  # noqa: ANN001, ANN202
        site = int(context.node_config["partition-id"])
        server_round = int(msg.metadata.group_id)
        stage = msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        weights = msg.content.array_records.get(LEGACY_WEIGHTS_RECORD, ArrayRecord())
        mark = KEYS_AHEAD_KEY if stage == "unmask" else TRAIN_AHEAD_KEY
        marked = mark in msg.content.config_records
        with (notes / "stages").open("a") as out:
            out.write(json.dumps([server_round, site, stage, len(weights), marked]) + "\n")
        if site == 2 and server_round == 1 and stage == "collect_masked_vectors":
            return Message(Error(code=0, reason="scripted failure"), reply_to=msg)
        if site != 0:
            return honest(msg, context)
        if len(weights) and stage != "collect_masked_vectors":
            np.savez(kept, **{name: array.numpy() for name, array in weights.items()})
            reply = honest(msg, context)
            reply.content.config_records[TRAIN_AHEAD_KEY] = ConfigRecord({"started": True})
            return reply
        if marked and stage == "collect_masked_vectors":
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
    """Three SuperNodes with their site workers: each round's weights come with its first
    message to a site (round 1's setup stage; round 2's share-keys stage, its keys having been
    made with round 1's unmasking), every worker trains on them then (not in the collect
    stage, whose message brings none), and the masked sum is still FedAvg of what the sites
    trained."""
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
    # round 2 sent no setup message: every site made its keys with round 1's unmasking
    assert [r["secagg_keys_made_ahead"] for r in rounds] == [0, 3]
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
