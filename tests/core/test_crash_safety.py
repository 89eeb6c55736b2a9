"""Writers killed mid-save never cost the previous state: a real process is SIGKILLed while it
rewrites a checkpoint in a loop, and the file left behind always loads and is consistent."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import torch

from mrprism_core.checkpoint import STALE_TEMP_SECONDS, load_checkpoint, save_checkpoint

WRITER = """
import sys, torch
from mrprism_core.checkpoint import save_checkpoint
path, start = sys.argv[1], int(sys.argv[2])
for step in range(start, start + 10_000):
    # 16 MB per save: long enough that a kill often lands inside a write
    save_checkpoint(path, {"step": step, "weights": torch.full((4_000_000,), float(step))})
"""


def _wait_for_step(path, at_least: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and load_checkpoint(path)["step"] >= at_least:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the writer did not reach step {at_least}")


def test_a_writer_killed_mid_save_leaves_a_loadable_consistent_file(tmp_path):
    path = tmp_path / "site_model.pt"
    rng = random.Random(0)
    step = 0
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(step + 1)])
        try:
            _wait_for_step(path, step + 1)
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(writer.pid, signal.SIGKILL)
        finally:
            writer.kill()
            writer.wait(timeout=30)
        state = load_checkpoint(path)  # never raises: the rename is the only visible change
        assert state["step"] > step
        assert torch.equal(state["weights"], torch.full((4_000_000,), float(state["step"])))
        step = state["step"]


def test_a_partial_temp_file_is_ignored_and_cleaned_once_stale(tmp_path):
    path = tmp_path / "site_model.pt"
    save_checkpoint(path, {"step": 1})
    half = path.read_bytes()
    torn = tmp_path / f".{path.name}.dead.tmp"  # what a killed writer leaves
    torn.write_bytes(half[: len(half) // 2])
    assert load_checkpoint(path)["step"] == 1

    recent = tmp_path / f".{path.name}.busy.tmp"  # maybe another writer's, still at work
    recent.write_bytes(b"partial")
    old = time.time() - 2 * STALE_TEMP_SECONDS
    os.utime(torn, (old, old))
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 2
    assert not torn.exists() and recent.exists()
