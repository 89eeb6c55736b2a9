"""SecAgg+ in Flower's simulation engine: the server only ever sees masked vectors, yet the
global model equals plain FedAvg of what the sites trained, within quantization error."""

from __future__ import annotations

import json

import torch

from mrprism_core.checkpoint import load_checkpoint

from .conftest import simulate

SITES = {"synthetic_a": 3, "synthetic_b": 5, "synthetic_c": 7}  # site -> training cases


def test_secagg_plus_aggregate_equals_fedavg_of_the_site_updates(tmp_path, make_site):
    state_dirs = [make_site(site, f"data.splits.train={n}") for site, n in SITES.items()]
    out_dir = tmp_path / "server"
    config = {
        "num-server-rounds": 1,
        "min-available-nodes": 3,
        "min-train-nodes": 3,
        "secure-aggregation": True,
        "secagg-max-weight": 10.0,  # >= every site's example count; sets the quantization step
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
    }
    record = simulate(config, state_dirs)[0]
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
