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


# a local Ray started as the simulation starts its own (address="local"), after
# require_ray_token() when asked to; prints its GCS address, then waits for stdin to close
OWN_RAY = """
import sys
from simulation.methods import require_ray_token
if sys.argv[1] == "token":
    assert require_ray_token()
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
"""
# a stranger on the network: another driver, with no token, calls the Ray and runs a task
STRANGER = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print("ran", ray.get(ray.remote(lambda: 42).remote(), timeout=30))
"""


def _stranger_runs_code_on(mode: str) -> bool:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    own = subprocess.Popen(
        [sys.executable, "-c", OWN_RAY, mode],
        cwd=PROJECT_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        line = own.stdout.readline()
        assert line.startswith("GCS "), line
        stranger = subprocess.run(
            [sys.executable, "-c", STRANGER, line.split()[1]],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return stranger.returncode == 0 and "ran 42" in stranger.stdout
    finally:
        own.stdin.close()
        own.wait(timeout=60)


def test_the_simulations_own_ray_runs_no_code_for_a_caller_without_its_token():
    # Ray's services listen on every interface; without the token anyone reaching them can
    # run code (the first call shows the check below can tell)
    assert _stranger_runs_code_on("plain")
    assert not _stranger_runs_code_on("token")
