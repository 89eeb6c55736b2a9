"""The ClientApp fork server: the ``flwr-clientapp`` launcher hands its arguments to it and a
forked copy of a process with Flower imported runs Flower's entry point; without the fork
server the launcher runs Flower's own command."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.clientapp_fork import COMMAND, ORPHAN_GRACE_S, write_launcher
from client.parent_watch import process_exists


def _launcher(tmp_path: Path, real: str) -> tuple[Path, Path, Path]:
    socket_path, key_file = tmp_path / "fork.sock", tmp_path / "fork.key"
    key_file.write_bytes(secrets.token_bytes(32))
    key_file.chmod(0o600)
    return write_launcher(tmp_path / "bin", socket_path, key_file, real), socket_path, key_file


def _start_fork_server(socket_path: Path, key_file: Path, log: Path) -> subprocess.Popen:
    """The fork server, its output in ``log``, once it listens on ``socket_path``."""
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "client.clientapp_fork", "--socket", str(socket_path),
             "--key-file", str(key_file)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while not socket_path.exists():
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return server


def test_without_a_fork_server_the_launcher_runs_flowers_own_command(tmp_path):
    launcher, _, _ = _launcher(tmp_path, shutil.which("echo"))
    assert launcher.name == COMMAND
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o700  # the site's user only
    done = subprocess.run(
        [str(launcher), "--token", "abc"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout == "--token abc\n"  # the real command, with the same arguments
    assert "fork server unavailable" in done.stderr and COMMAND in done.stderr


def test_the_fork_server_runs_flowers_clientapp_with_the_launchers_arguments(tmp_path):
    # the real fallback would print the same help: make it fail loudly instead
    launcher, socket_path, key_file = _launcher(tmp_path, shutil.which("false"))
    log = tmp_path / "fork.log"
    server = _start_fork_server(socket_path, key_file, log)
    try:
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        done = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr  # the fork server answered: no fallback
        assert "unavailable" not in done.stderr
        # a launcher without the site's key is refused (and then runs the fallback)
        wrong_key = tmp_path / "wrong.key"
        wrong_key.write_bytes(secrets.token_bytes(32))
        intruder = write_launcher(tmp_path / "other", socket_path, wrong_key, shutil.which("true"))
        refused = subprocess.run([str(intruder)], capture_output=True, text=True, timeout=60)
        assert "fork server unavailable" in refused.stderr
    finally:
        server.terminate()
        server.wait(timeout=60)
    output = log.read_text()
    # the forked child was Flower's flwr-clientapp, reading the launcher's arguments
    assert "usage: flwr-clientapp" in output, output
    assert output.count("started ClientApp process") == 1, output
    assert "refused a connection" in output, output


def test_a_clientapp_blocked_on_its_supernode_ends_after_its_superexec(tmp_path):
    """A ClientApp whose SuperNode accepted its request and never answers (one that is going
    away) cannot run Flower's SIGINT handler when its SuperExec ends: Flower's path takes the
    30 s HTTP read timeout and more. Ours ends it ORPHAN_GRACE_S after the SuperExec."""
    launcher, socket_path, key_file = _launcher(tmp_path, shutil.which("false"))
    log = tmp_path / "fork.log"
    server = _start_fork_server(socket_path, key_file, log)
    silent_runtime_api = socket.socket()  # accepts connections (backlog), never answers
    silent_runtime_api.bind(("127.0.0.1", 0))
    silent_runtime_api.listen(16)
    superexec = subprocess.Popen(["sleep", "600"])
    child = None
    try:
        address = f"127.0.0.1:{silent_runtime_api.getsockname()[1]}"
        arguments = ["--runtime-api-address", address, "--token", "t", "--insecure"]
        arguments += ["--parent-pid", str(superexec.pid)]
        done = subprocess.run([str(launcher), *arguments], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 60
        while (found := re.search(r"started ClientApp process (\d+)", log.read_text())) is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        child = int(found.group(1))
        while "Start `flwr-clientapp` process" not in log.read_text():  # blocked in its pull
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)
        assert process_exists(child)  # the SuperExec lives: so does its ClientApp
        superexec.kill()
        superexec.wait()  # reaped: gone, not a zombie
        ended = time.monotonic()
        while process_exists(child):
            assert time.monotonic() - ended < ORPHAN_GRACE_S + 10, log.read_text()
            time.sleep(0.2)
        assert time.monotonic() - ended >= ORPHAN_GRACE_S - 1  # Flower's own shutdown had time
        assert f"process {superexec.pid}, which it serves, ended" in log.read_text()
    finally:
        if child is not None and process_exists(child):
            os.kill(child, signal.SIGKILL)
        superexec.kill()
        silent_runtime_api.close()
        server.terminate()
        server.wait(timeout=60)


def _bundle(project: Path, version: str) -> bytes:
    """A real Flower app bundle (``flwr build``'s format) of a one-module app."""
    project.mkdir(parents=True, exist_ok=True)
    (project / "pyproject.toml").write_text(
        "[build-system]\nrequires = ['hatchling']\nbuild-backend = 'hatchling.build'\n"
        f"[project]\nname = 'tinyapp'\nversion = '{version}'\nlicense = 'Apache-2.0'\n"
        "dependencies = []\n[tool.flwr.app]\npublisher = 'tests'\n"
        "[tool.flwr.app.components]\nserverapp = 'tinyapp.apps:server'\n"
        "clientapp = 'tinyapp.apps:client'\n[tool.flwr.app.config]\nrounds = 1\n"
    )
    (project / "tinyapp").mkdir(exist_ok=True)
    (project / "tinyapp" / "__init__.py").write_text("")
    (project / "tinyapp" / "apps.py").write_text("client = server = None\n")
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(project)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec's, in Flower's build
def test_a_sites_clientapps_unpack_the_apps_bundle_once(tmp_path, monkeypatch):
    """Flower's flwr-clientapp installs the run's bundle for every message (unpacks it and
    checks every file's hash, then keeps the folder it installed before). Wrapped, Flower's
    own install runs once per bundle: again only for other bytes or when its folder is gone."""
    from flwr.cli.install import install_from_fab

    from client.fab_install import RECORD_DIR, install_once

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    unpacked: list[bytes] = []

    def flowers_install(fab, install_dir=None, skip_prompt=False):  # Flower's, counted
        unpacked.append(fab)
        return install_from_fab(fab, install_dir, skip_prompt)

    install = install_once(flowers_install)
    first, second = (
        _bundle(tmp_path / "v1" / "tinyapp", "1.0.0"),
        _bundle(tmp_path / "v2" / "tinyapp", "2.0.0"),
    )
    folder = install(first, skip_prompt=True)
    assert (folder / "tinyapp" / "apps.py").read_text() == "client = server = None\n"
    assert folder == install_from_fab(first, skip_prompt=True)  # where Flower puts it
    assert install(first, skip_prompt=True) == folder
    assert install(first, skip_prompt=True) == folder
    assert len(unpacked) == 1  # the next messages' ClientApps did not unpack it again
    assert len(list((tmp_path / "home" / RECORD_DIR).iterdir())) == 1

    other = install(second, skip_prompt=True)
    assert other != folder and len(unpacked) == 2  # other bytes: Flower installs them

    shutil.rmtree(folder)  # someone cleaned Flower's apps folder
    assert install(first, skip_prompt=True) == folder
    assert (folder / "tinyapp" / "apps.py").exists() and len(unpacked) == 3
