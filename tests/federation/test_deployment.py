"""A real deployment: flower-superlink + three SuperNodes started with `python -m client`
(3, 4 and 5 raters) on 127.0.0.1, two rounds submitted with `flwr run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.fab_install import RECORD_DIR
from mrprism_core.checkpoint import load_checkpoint
from mrprism_core.models import build_model, split_state
from mrprism_core.protocol import EVALUATED_BEFORE_KEY
from mrprism_core.update_codec import UPDATE_KEY, UPDATE_SCALE_KEY

from .deploy import Deployment

SITES = {"synthetic_a": 3, "synthetic_b": 4, "synthetic_c": 5}
SMALL = ["data.splits.train=8", "data.splits.val=4", "data.splits.test=4", "data.image_size=32"]


@pytest.fixture
def deployment(tmp_path):
    deploy = Deployment(tmp_path)
    yield deploy
    deploy.stop()


def test_two_rounds_over_superlink_and_three_supernodes(deployment, tmp_path):
    deployment.start_superlink()
    for site in SITES:
        deployment.start_site(site, *SMALL)
    deployment.wait_online(len(SITES))
    out_dir = tmp_path / "out"
    result = deployment.run(
        {"num-server-rounds": 2, "min-available-nodes": 3, "out-dir": str(out_dir)}, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the global checkpoint holds exactly the shared weights of the run's model, and loads
    checkpoint = load_checkpoint(out_dir / "global_model.pt")
    assert checkpoint["round"] == 2
    model = build_model("mrprism", in_channels=3, num_classes=2, num_raters=4, image_size=32)
    shared, _ = split_state(model)
    assert {k: tuple(v.shape) for k, v in checkpoint["shared_state"].items()} == {
        k: tuple(v.shape) for k, v in shared.items()
    }
    model.load_state_dict(checkpoint["shared_state"], strict=False)

    # every site kept its own rater heads, one per rater
    for site, raters in SITES.items():
        snapshot = load_checkpoint(deployment.site_dir(site) / "site_model.pt")
        assert snapshot["round"] == 2 and snapshot["site"] == site
        assert snapshot["local_state"]["confidence.rater_identity.weight"].shape[0] == raters
        heads = snapshot["local_state"]["divp.heads.qkv.weight"]
        assert heads.shape[0] == 3 * raters * model.arch.rater_head_dim

    # metrics of every round were logged, per site; what each site sent was one vector of
    # the shared size, whatever its rater count
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in history] == [1, 2]
    size = sum(v.numel() for v in shared.values())
    for record in history:
        assert set(record["evaluate_sites"]) == set(SITES)
        assert set(record["train_sites"]) == set(SITES)
        assert 0.0 <= record["evaluate"]["soft-dice"] <= 1.0
        for site, row in record["train_sites"].items():
            # (its float16 change, update-precision's default: half the bytes of the weights)
            assert row["reply-arrays"] == {UPDATE_KEY: [size], UPDATE_SCALE_KEY: [1]}, site
        # download-precision: round 1 brought every site the weights; each site's worker kept
        # them, so round 2 brought only their float16 change (the weights rebuilt from it
        # trained: the replies above decoded against them)
        kind = "float32" if record["round"] == 1 else "float16-change"
        assert record["train_downloads"] == dict.fromkeys(SITES, kind)
        assert all(row["holds-weights"] for row in record["train_sites"].values())
        for site, row in record["evaluate_sites"].items():
            assert len(row["per-rater-dice-list"]) == SITES[site]
            # round 2's training went out with round 1's evaluation (pipeline-rounds), yet
            # every site evaluated with the heads of the round being evaluated
            assert row["heads-from-round"] == record["round"], site
            # round 1 was evaluated by round 2's training message (evaluate-in-training); the
            # last round, with no training after it, by its own evaluation message
            evaluated_by = row.get(EVALUATED_BEFORE_KEY)
            assert evaluated_by == (record["round"] + 1 if record["round"] < 2 else None), site
    assert json.loads((out_dir / "summary.json").read_text())["rounds"] == 2

    # each site's ClientApps (five messages: two rounds' trainings and their evaluations, the
    # last one its own message) had Flower install the run's bundle once, the first of them
    for site in SITES:
        [record] = (tmp_path / "home" / site / RECORD_DIR).iterdir()
        assert Path(record.read_text()).parent.name == "apps", site
