"""A restarted ServerApp continues after the last completed round: no round counted twice."""

from __future__ import annotations

import json

from flwr.simulation import run_simulation

from client.app import create_client_app
from mrprism_core.checkpoint import load_checkpoint
from server.app import create_server_app

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


def _run(out_dir, rounds, state_dirs, seen):
    config = {
        "num-server-rounds": rounds,
        "min-available-nodes": 2,
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
    }
    run_simulation(
        server_app=create_server_app(config, on_round=lambda r: seen.append(r["round"])),
        client_app=create_client_app(state_dirs),
        num_supernodes=2,
        backend_config=BACKEND,
    )


def test_restart_resumes_after_the_last_completed_round(tmp_path, make_site):
    state_dirs = [make_site("synthetic_a"), make_site("synthetic_b")]
    out_dir = tmp_path / "server"
    seen: list[int] = []
    _run(out_dir, 1, state_dirs, seen)
    assert seen == [1]
    first = load_checkpoint(out_dir / "global_model.pt")
    round_one = (out_dir / "metrics.jsonl").read_text().splitlines()[0]
    _run(out_dir, 3, state_dirs, seen)  # the coordinator comes back and asks for 3 rounds
    assert seen == [1, 2, 3]  # round 1 was not run again
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in history] == [1, 2, 3]
    assert history[0] == json.loads(round_one)  # the log continues, round 1 untouched
    final = load_checkpoint(out_dir / "global_model.pt")
    assert final["round"] == 3
    assert any(
        not (first["shared_state"][k] == final["shared_state"][k]).all()
        for k in first["shared_state"]
    )
    site = load_checkpoint(f"{state_dirs[0]}/site_model.pt")
    assert site["round"] == 3
