"""Flower's telemetry and update check are off wherever our entry points start Flower
(client/flower_env.py); an operator who sets them keeps their choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from client.flower_env import FLOWER_OFFLINE_ENV

# what Flower itself will do: its telemetry module reads the switch when it is imported
PROBE = (
    "import os, {package}\n"
    "import flwr.supercore.telemetry as telemetry\n"
    "print(telemetry.FLWR_TELEMETRY_ENABLED, os.environ['FLWR_DISABLE_UPDATE_CHECK'])\n"
)


def _probe(package: str, **preset: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in FLOWER_OFFLINE_ENV}
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(package=package)],
        env={**env, **preset},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("package", ["client", "simulation", "benchmarks"])
def test_our_entry_points_turn_flowers_telemetry_and_update_check_off(package):
    assert _probe(package) == ["0", "1"]


def test_an_operator_who_wants_flowers_telemetry_keeps_it():
    assert _probe("simulation", FLWR_TELEMETRY_ENABLED="1") == ["1", "1"]
