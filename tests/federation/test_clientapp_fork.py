"""The ClientApp fork server: the ``flwr-clientapp`` launcher hands its arguments to it and a
forked copy of a process with Flower imported runs Flower's entry point; without the fork
server the launcher runs Flower's own command."""

from __future__ import annotations

import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

from client.clientapp_fork import COMMAND, write_launcher


def _launcher(tmp_path: Path, real: str) -> tuple[Path, Path, Path]:
    socket_path, key_file = tmp_path / "fork.sock", tmp_path / "fork.key"
    key_file.write_bytes(secrets.token_bytes(32))
    key_file.chmod(0o600)
    return write_launcher(tmp_path / "bin", socket_path, key_file, real), socket_path, key_file


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
    server = subprocess.Popen(
        [sys.executable, "-m", "client.clientapp_fork", "--socket", str(socket_path),
         "--key-file", str(key_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not socket_path.exists():
            assert server.poll() is None and time.monotonic() < deadline, "no fork server"
            time.sleep(0.1)
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
        output, _ = server.communicate(timeout=60)
    # the forked child was Flower's flwr-clientapp, reading the launcher's arguments
    assert "usage: flwr-clientapp" in output, output
    assert output.count("started ClientApp process") == 1, output
    assert "refused a connection" in output, output
