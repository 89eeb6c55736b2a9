"""`federation.ray_address`: the simulation joins a Ray cluster that is already running
(`ray start --head`, a real one on 127.0.0.1) instead of starting its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..federation.deploy import PROJECT_ROOT, free_port

RAY = str(Path(sys.executable).with_name("ray"))

# the jobs (drivers) the cluster has seen, read from its GCS by a driver of its own
JOBS = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
print(json.dumps([{"pid": j["DriverPid"], "alive": not j["IsDead"]} for j in state.jobs()]))
"""


def _cluster_jobs(address: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", JOBS, address], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_simulation_joins_a_running_ray_cluster(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = (tmp_path / "ray-head.log").open("w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2"]
        + ["--include-dashboard=false", "--disable-usage-stats"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # the head and everything it starts form one process group
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # the head is up once a driver can connect
            try:
                before = _cluster_jobs(address)
                break
            except AssertionError:
                assert head.poll() is None, (tmp_path / "ray-head.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "the Ray head did not come up in 180 s"
                time.sleep(2)
        out = tmp_path / "run"
        # a file, not a pipe: a Ray that the run started itself (the failure this test looks
        # for) would keep a pipe open after the run ends
        with (tmp_path / "run.log").open("w") as run_log:
            run = subprocess.Popen(
                [sys.executable, "-m", "simulation.run", "preset=smoke", "methods=[federated]"]
                + [f"out_dir={out}", "progress=false", f"federation.ray_address={address}"],
                cwd=PROJECT_ROOT,
                stdout=run_log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            run.wait(timeout=900)
        assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
        results = json.loads((out / "results.json").read_text())
        federated = results["methods"]["federated"]
        assert len(federated["sites"]) == 3 and len(federated["round_seconds"]) == 2
        # the run was a driver of this cluster (a simulation that started its own Ray would
        # leave no trace here), and it has finished
        drivers = {job["pid"] for job in _cluster_jobs(address)} - {j["pid"] for j in before}
        assert run.pid in drivers, (run.pid, drivers)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        # `ray start` recorded this head as the machine's current cluster; a head killed
        # without `ray stop` leaves that record behind
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
        head.wait(timeout=120)
        log.close()
