"""Start each message's ClientApp process from a copy of a process that has Flower imported.

Flower 1.41's SuperExec starts ``flwr-clientapp`` (found on ``PATH``) for every message, and
a fresh interpreter spends 0.5 s here importing Flower before it can ask for its message, 1.2 s
and more while the SuperNode is busy pulling the same message's weights on the same cores.
``python -m client`` therefore starts this module's *fork server* next to the site worker: it
imports Flower's ``flwr-clientapp`` entry point once and then waits. The ``flwr-clientapp`` the
SuperExec finds first on the SuperNode's ``PATH`` is a small launcher (:func:`write_launcher`,
standard library only) that hands its arguments, environment and working directory to the fork
server, which forks a child that runs Flower's entry point with them: the same process Flower
would start, minus the imports. Our ClientApp module is not imported in advance: Flower loads
it from the app bundle, as without the fork server. The children unpack a run's bundle once,
not for every message (:mod:`client.fab_install`).

When the fork server cannot be reached (not started, crashed, a wrong key), the launcher
replaces itself with Flower's own ``flwr-clientapp`` (``os.execv``), so a message never fails
for want of it. Security: the socket sits in an owner-only folder and each connection must
prove it holds the key in ``<state_dir>/clientapp_fork.key`` (HMAC challenge of
:mod:`multiprocessing.connection`); what passes is JSON (the launcher's arguments, environment
and working directory), never a pickle. Nothing listens on the network.

A forked ClientApp ends at the latest :data:`ORPHAN_GRACE_S` after the SuperExec that asked for
it (its ``--parent-pid``): Flower's own monitor cannot stop one whose main thread is blocked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path

from .parent_watch import exit_after_process, exit_with_parent

__all__ = ["COMMAND", "KEY_FILE", "ORPHAN_GRACE_S", "ForkServer", "main", "serve", "write_launcher"]

#: The command the SuperExec starts for a ClientApp (Flower's ``TASK_TYPE_TO_COMMAND``).
COMMAND = "flwr-clientapp"
#: The fork server's key, in the site's state directory (owner-only).
KEY_FILE = "clientapp_fork.key"
#: How long a ClientApp may take to stop after its SuperExec is gone before it is ended: Flower's
#: own shutdown (its parent monitor polls every 0.2 s, its forced exit comes after 5 s) fits.
ORPHAN_GRACE_S = 10.0
#: This checkout's packages, which the fork server imports itself and its children forget.
_OWN_PACKAGES = ("client", "mrprism_core", "server", "simulation")

# The launcher: standard library only (``python -I``), so that it starts in a few
# milliseconds. Any failure to reach the fork server runs Flower's own command instead.
_LAUNCHER = """#!{python} -I
# Written by `python -m client` (client/clientapp_fork.py): asks the site's fork server for
# this ClientApp process; without one, runs Flower's own {command}.
import json, os, sys
try:
    from multiprocessing.connection import Client
    with open({key!r}, "rb") as key_file:
        key = key_file.read()
    with Client({socket!r}, family="AF_UNIX", authkey=key) as server:
        request = {{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}
        server.send_bytes(json.dumps(request).encode())
        server.recv_bytes()  # the child's pid: it runs
except Exception as err:
    reason = "%s: %s" % (type(err).__name__, err)
    print("clientapp fork server unavailable (" + reason + "); starting {command}",
          file=sys.stderr, flush=True)
    os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


def write_launcher(bin_dir: Path, socket_path: Path, key_file: Path, real_command: str) -> Path:
    """Write the ``flwr-clientapp`` launcher into ``bin_dir`` (owner-only), to be put first on
    the SuperNode's ``PATH``; ``real_command`` is Flower's own, run when the fork server
    cannot be reached. Returns the launcher's path."""
    bin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    launcher = bin_dir / COMMAND
    text = _LAUNCHER.format(
        python=sys.executable,
        command=COMMAND,
        key=str(key_file),
        socket=str(socket_path),
        real=real_command,
    )
    temporary = launcher.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.chmod(stat.S_IRWXU)
    temporary.replace(launcher)
    return launcher


def _checked_request(request: object) -> dict:
    """The launcher's request: its arguments, environment and working directory, as strings
    (JSON: nothing is unpickled); anything else is a ValueError."""
    if not isinstance(request, dict) or set(request) != {"argv", "env", "cwd"}:
        raise ValueError("not a launcher's request")
    argv, env, cwd = request["argv"], request["env"], request["cwd"]
    if not isinstance(argv, list) or not isinstance(env, dict):
        raise ValueError("a launcher's request holds a list of arguments and an environment")
    if not all(isinstance(s, str) for s in [*argv, *env, *env.values(), cwd]):
        raise ValueError("a launcher's request holds strings only")
    return request


def _end_after_superexec(argv: list[str]) -> None:
    """End this ClientApp :data:`ORPHAN_GRACE_S` after the SuperExec of its ``--parent-pid``:
    Flower's own monitor cannot stop one whose main thread is blocked (see
    :mod:`client.parent_watch`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--parent-pid", type=int)
    parent_pid = parser.parse_known_args(argv)[0].parent_pid
    if parent_pid is not None:
        exit_after_process(parent_pid, ORPHAN_GRACE_S)


def _run_child(request: dict) -> None:
    """In the forked child: become the process Flower would have started, and never return."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [COMMAND, *request["argv"]]
        _end_after_superexec(request["argv"])
        # Flower imports the app from its bundle only if its modules are not imported yet:
        # forget this checkout's, so that an app that is not the site's own code (with
        # supernode.pin_app false) runs as sent, as in a fresh flwr-clientapp process
        for name in [n for n in sys.modules if n.partition(".")[0] in _OWN_PACKAGES]:
            del sys.modules[name]
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        flwr_clientapp()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then the child ends like a crashed process
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(socket_path: Path, key: bytes) -> None:
    """Fork one ClientApp process per request on ``socket_path``, until killed."""
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401 - the import each child saves

    from .fab_install import use_for_clientapps

    # every child inherits it: the run's bundle is unpacked once, not for every message
    if not use_for_clientapps():
        print("clientapp fork server: each ClientApp installs the app bundle itself", flush=True)
    # children are reaped by the kernel: this process never waits for them
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    socket_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    os.chmod(socket_path, stat.S_IRUSR | stat.S_IWUSR)
    server.listen(16)
    print(f"clientapp fork server: listening on {socket_path}", flush=True)
    while True:
        accepted, _ = server.accept()
        with Connection(accepted.detach()) as connection:
            try:  # both ways, as multiprocessing's Listener and Client do
                deliver_challenge(connection, key)
                answer_challenge(connection, key)
                request = _checked_request(json.loads(connection.recv_bytes()))
            except (AuthenticationError, EOFError, OSError, ValueError) as err:
                print(f"clientapp fork server: refused a connection: {err}", flush=True)
                continue
            pid = os.fork()
            if pid == 0:
                server.close()  # the child holds no copy of the listening socket
                connection.close()
                _run_child(request)
            connection.send_bytes(str(pid).encode())
        print(f"clientapp fork server: started ClientApp process {pid}", flush=True)


class ForkServer:
    """``with ForkServer(state_dir, socket_path):`` the fork server runs, and the launcher
    that reaches it is first on this process's ``PATH`` (which the SuperNode and its SuperExec
    inherit); afterwards it is stopped. Without Flower's ``flwr-clientapp`` on ``PATH``
    nothing starts (there would be nothing to fall back on)."""

    def __init__(self, state_dir: Path, socket_path: Path) -> None:
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.process: subprocess.Popen | None = None
        self.launcher: Path | None = None

    def __enter__(self) -> ForkServer:
        bin_dir = self.state_dir / "bin"
        others = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != bin_dir]
        real = shutil.which(COMMAND, path=os.pathsep.join(others))
        if real is None:
            print(f"fork server: not started ({COMMAND} is not on PATH)", flush=True)
            return self
        from .worker_protocol import write_key

        write_key(self.state_dir, KEY_FILE)  # owner-only, new every start
        key_file = self.state_dir / KEY_FILE
        self.launcher = write_launcher(bin_dir, self.socket_path, key_file, real)
        os.environ["PATH"] = f"{self.launcher.parent}{os.pathsep}{os.environ.get('PATH', '')}"
        command = [sys.executable, "-m", "client.clientapp_fork"]
        command += ["--socket", str(self.socket_path), "--key-file", str(key_file)]
        # its own session, as the SuperNode's: a Ctrl-C to the site's process group reaches
        # python -m client, which stops it, and not the ClientApp it may be running
        self.process = subprocess.Popen(command, start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        from .supervisor import stop_process

        stop_process(self.process, 5.0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    parser.add_argument("--key-file", required=True, help="file holding the shared key")
    args = parser.parse_args(argv)
    exit_with_parent(lambda: os._exit(0))  # python -m client is gone: so is this
    with contextlib.suppress(KeyboardInterrupt):
        serve(Path(args.socket), Path(args.key_file).read_bytes())


if __name__ == "__main__":
    main()
