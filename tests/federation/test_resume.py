"""A restarted ServerApp continues after the last completed round: no round counted twice."""

from __future__ import annotations

import json

import pytest
import torch

from mrprism_core.checkpoint import load_checkpoint

from .conftest import simulate


def _run(out_dir, rounds, state_dirs, seen):
    config = {
        "num-server-rounds": rounds,
        "min-available-nodes": 2,
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
    }
    simulate(config, state_dirs, on_round=lambda r: seen.append(r["round"]))


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


def test_a_resumed_scaffold_run_sends_the_control_variate_it_saved(tmp_path, make_site):
    from mrprism_core.protocol import CONTROL_KEY
    from server.config import RunConfig
    from server.federation import RunFiles

    out_dir = tmp_path / "server"
    config = {
        "num-server-rounds": 1,
        "min-available-nodes": 2,
        "out-dir": str(out_dir),
        "model-options": json.dumps({"recurrences": 1}),
        "drift-correction": "scaffold",
    }
    simulate(config, [make_site("synthetic_a"), make_site("synthetic_b")])
    checkpoint = load_checkpoint(out_dir / "global_model.pt")
    saved = checkpoint["control_variate"]
    assert saved.abs().max() > 0  # the sites' mean gradients of round 1
    files = RunFiles(out_dir)
    _, done, arrays, _ = files.start(RunConfig.from_mapping(config))
    assert done == 1
    assert torch.equal(arrays.to_torch_state_dict()[CONTROL_KEY], saved)
    # the same ledger, so that the sites' control variates still count as held in it
    assert files.control_ledger == checkpoint["control_ledger"] != ""
    assert files.control_weights == {"synthetic_a": 4.0, "synthetic_b": 4.0}


def test_a_round_saved_behind_reaches_disk_and_a_failed_write_is_not_lost(tmp_path):
    from mrprism_core.federated import PACKED_KEY
    from server.config import RunConfig
    from server.federation import RunFiles

    cfg = RunConfig(out_dir=str(tmp_path / "run"), num_raters=2)
    files = RunFiles(cfg.out_dir)
    layout, _, arrays, _ = files.start(cfg)
    files.save_round(cfg, layout, arrays, 1, 7, [{"round": 1}], behind=True)
    files.write_summary(cfg)  # waits for the round's files
    saved = load_checkpoint(files.checkpoint)
    assert saved["round"] == 1 and saved["run_id"] == 7
    sent = layout.unpack(arrays.to_torch_state_dict()[PACKED_KEY])
    assert all(torch.equal(saved["shared_state"][k], v) for k, v in sent.items())
    assert files.history() == [{"round": 1}]

    # a write that fails in the background (the run folder is a file) fails the next wait
    (tmp_path / "blocked").write_text("not a folder")
    blocked = RunFiles(tmp_path / "blocked")
    blocked.save_round(cfg, layout, arrays, 1, 7, [{"round": 1}], behind=True)
    with pytest.raises(OSError):
        blocked.flush()
