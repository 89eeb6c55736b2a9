"""Real Flower deployments on 127.0.0.1 for tests: a ``flower-superlink`` process, one
``python -m client --site X`` SuperNode process per site, and ``flwr run`` submitting this
project's app. Every process is bounded in time and killed (with its children) on exit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from client.flower_env import FLOWER_OFFLINE_ENV
from client.socket_paths import socket_folder

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


_HANDED_OUT: set[int] = set()


def _worker_share() -> tuple[int, int]:
    """(this pytest-xdist worker's number, how many workers run); (0, 1) without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    return int(worker), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def free_port() -> int:
    """A port free now and not handed out before in this test session (the OS may offer a
    just-closed port again before the process it was meant for has bound it). Under
    pytest-xdist each worker takes only its own share of the port numbers, so two workers
    never hand out the same port, which the other has not bound yet."""
    worker, workers = _worker_share()
    for _ in range(10_000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        # Linux gives bind(0) odd ports while it has them: split on port // 2, not on parity
        if (port // 2) % workers == worker % workers and port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free port for test worker {worker} of {workers} in 10000 tries")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # flwr's -c parser does not allow escaped quotes: JSON goes in a TOML literal string
        return f"'{value}'" if '"' in value else json.dumps(value)
    return repr(value)


def run_arguments(run_config: dict[str, Any]) -> list[str]:
    """``flwr run`` arguments submitting this project with ``run_config`` overrides."""
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    return ["run", str(PROJECT_ROOT), "test", "--stream", "-c", overrides]


class Deployment:
    """One SuperLink and its SuperNodes under ``root`` (a pytest tmp dir)."""

    def __init__(self, root: Path, *, tls_dir: Path | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.tls_dir = tls_dir
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.site_names: set[str] = set()  # every site started, killed ones too
        self.cli_home = root / "home" / "cli"
        self.cli_home.mkdir(parents=True)
        connection = [f'address = "127.0.0.1:{self.port}"']
        if tls_dir is None:
            connection.append("insecure = true")
        else:
            connection.append(f'root-certificates = "{(tls_dir / "ca.crt").resolve()}"')
        (self.cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n[superlink.test]\n' + "\n".join(connection) + "\n"
        )

    def env(self, home: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            FLWR_HOME=str(self.root / "home" / home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0",
            UV_CACHE_DIR=str(self.root / "uv-cache"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(
        self,
        name: str,
        command: list[str],
        home: str,
        limit: float,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            ["timeout", str(int(limit)), *command],
            cwd=self.root,
            env=env or self.env(home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: we can kill its children too
        )
        self.processes.append((name, process))
        return process

    def start_superlink(self, *extra: str, limit: float = 900) -> subprocess.Popen:
        command = [str(BIN / "flower-superlink"), "--port", str(self.port)]
        command += ["--disable-runtime-dependency-installation", *extra]
        if self.tls_dir is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile", str(self.tls_dir / "ca.crt"),
                "--ssl-certfile", str(self.tls_dir / "server.pem"),
                "--ssl-keyfile", str(self.tls_dir / "server.key"),
            ]  # fmt: skip
        process = self._spawn("superlink", command, "superlink", limit)
        self._wait_port()
        return process

    def _wait_port(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"SuperLink did not open port {self.port}:\n{self.log('superlink')}")

    def start_site(
        self, site: str, *overrides: str, name: str | None = None, limit: float = 900
    ) -> subprocess.Popen:
        """``python -m client --site SITE`` as its own SuperNode; ``name`` runs the same config
        as another hospital (its own name, state dir and log)."""
        name = name or site
        self.site_names.add(name)
        command = [sys.executable, "-m", "client", "--site", site]
        command += [
            f"site={name}",
            f"superlink=127.0.0.1:{self.port}",
            f"supernode.port={free_port()}",
            f"state_dir={self.site_dir(name)}",
            "threads=1",  # several sites share this machine's cores
            *overrides,
        ]
        # a hospital runs the one command with no Flower variables set: the site turns
        # Flower's telemetry and update check off itself (client/flower_env.py)
        env = self.env(name)
        for variable in FLOWER_OFFLINE_ENV:
            env.pop(variable, None)
        return self._spawn(name, command, name, limit, env)

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            cwd=self.root,
            env=self.env("cli"),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def node_status(self) -> dict[str, str]:
        """Each SuperNode's status at the SuperLink (online, offline, ...) by node id."""
        result = self.flwr("supernode", "list", "test", "--format", "json", timeout=60)
        try:
            nodes = json.loads(result.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return {}
        return {str(node.get("node-id")): str(node.get("status")) for node in nodes}

    def online_nodes(self) -> int:
        return sum(1 for status in self.node_status().values() if status == "online")

    def wait_online(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.online_nodes() >= count:
                return
            time.sleep(1)
        logs = "\n".join(f"--- {name}\n{self.log(name)[-2000:]}" for name, _ in self.processes)
        raise TimeoutError(f"fewer than {count} SuperNodes came online\n{logs}")

    def run(self, run_config: dict[str, Any], timeout: float = 600) -> subprocess.CompletedProcess:
        return self.flwr(*run_arguments(run_config), timeout=timeout)

    def submit(self, run_config: dict[str, Any], limit: float = 900) -> subprocess.Popen:
        """``flwr run`` in the background (to be interrupted by a test)."""
        return self._spawn(
            "flwr-run", [str(BIN / "flwr"), *run_arguments(run_config)], "cli", limit
        )

    def kill(self, name: str) -> None:
        """SIGKILL a process and all its descendants at once, as a power cut would. Flower
        starts its SuperExec in a new session (and the ServerApp under it): a kill of the
        process group alone leaves them running for a moment, long enough for a ServerApp to
        finish a round after its SuperLink was "cut"."""
        for entry in [e for e in self.processes if e[0] == name]:
            doomed = descendants(entry[1].pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(entry[1].pid, signal.SIGKILL)
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            entry[1].wait(timeout=30)
            self.processes.remove(entry)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for _, process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for name, process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
                # not a failure of the test, but where CI's 20 s teardowns come from: named in
                # pytest's warnings summary with the end of the process's log
                warnings.warn(
                    f"{name} had not stopped 20 s after SIGTERM and was killed; its log ends: "
                    f"{self.log(name)[-1500:]}",
                    stacklevel=2,
                )
        # a site with a long state path binds its sockets in a folder under TMPDIR, which a
        # site a test killed outright leaves behind (a restarted one takes it over); the
        # sites read TMPDIR afresh, this process may hold an older temporary directory
        temp_root = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
        for name in self.site_names:
            shutil.rmtree(socket_folder(self.site_dir(name), temp_root), ignore_errors=True)


def proc_stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state, parent id, ...); the
    name may hold spaces, so they are read from its closing ')'."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux ``/proc``), whatever session it is in."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(proc_stat(entry.name)[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def command_lines(pids: list[int]) -> dict[int, str]:
    """{pid: command line} of those of ``pids`` still running when read: a short-lived
    helper (a SuperNode's own subprocess) may end between listing and reading."""
    found: dict[int, str] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    return found


def history(out_dir: Path) -> list[dict]:
    """The rounds a run has recorded in ``out_dir``'s metrics log so far."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_round(deployment: Deployment, out_dir: Path, server_round: int, timeout=600):
    """Block until the submitted run has recorded ``server_round``; raise, with its log, if
    it ends or ``timeout`` passes first."""
    deadline = time.time() + timeout
    run = dict(deployment.processes)["flwr-run"]
    while time.time() < deadline and run.poll() is None:
        if any(r["round"] >= server_round for r in history(out_dir)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"round {server_round} not reached:\n{deployment.log('flwr-run')[-3000:]}")
