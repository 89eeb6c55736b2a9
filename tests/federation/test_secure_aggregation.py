"""SecAgg+ in Flower's simulation engine: the server only ever sees masked vectors, yet the
global model equals plain FedAvg of what the sites trained, within quantization error."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mrprism_core.checkpoint import load_checkpoint

from .conftest import simulate

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
    state_dirs = [make_site(site, f"data.splits.train={n}") for site, n in SITES.items()]
    out_dir = tmp_path / "server"
    record = simulate(_run_config(out_dir, rounds=1), state_dirs)[0]
    assert record["secure_aggregation"] is True and set(record["train_sites"]) == set(SITES)
    global_state = load_checkpoint(out_dir / "global_model.pt")["shared_state"]

    # what each site trained (kept in its own snapshot), averaged by hand
    trained = [load_checkpoint(f"{d}/site_model.pt")["shared_state"] for d in state_dirs]
    weights = torch.tensor([float(n) for n in SITES.values()])
    worst = 0.0
    for key, value in global_state.items():
        by_hand = sum(w * t[key] for w, t in zip(weights, trained)) / weights.sum()
        assert value.dtype == by_hand.dtype, key
        worst = max(worst, float((value - by_hand).abs().max()))
    # quantization: 2**22 levels over [-8, 8] of weight x examples / max-weight
    assert worst < 1e-4, worst
    # and it is an aggregate, not one site's weights passed through
    assert any(not torch.allclose(global_state[k], trained[0][k], atol=1e-3) for k in global_state)


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
    trained = [load_checkpoint(f"{d}/site_model.pt")["shared_state"] for d in state_dirs]
    for key, value in server["shared_state"].items():
        mean = sum(w * t[key] for w, t in zip(weights, trained)) / sum(weights)
        assert float((value - mean).abs().max()) < 1e-4, key


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
        if "fitins.parameters" in msg.content:  # SecAgg+ speaks Flower's legacy records
            instruction = recorddict_to_fitins(msg.content, keep_input=True)
            with noted.open("a") as out:
                arrays = parameters_to_ndarrays(instruction.parameters)
                out.writelines(f"{array.dtype}\n" for array in arrays)
        return honest(msg, context)

    return app
