"""Run the site's ``flower-supernode`` (and start it again when the SuperLink refuses to
activate it) and the site worker next to it (started again whenever it exits).

Under SuperNode authentication a hospital whose SuperNode crashed and is started again at once
(by systemd, or by an operator) is refused: the SuperLink still holds the old session as online
until it misses two heartbeats (Flower's interval is 30 s), and Flower's SuperNode then exits at
once with ``Failed to activate SuperNode`` instead of waiting. This supervisor waits with
backoff, says why, and tries again until ``supernode.activation_wait_s`` has passed (or
``supernode.max_retries`` attempts). Everything else the SuperNode prints passes through, and
SIGTERM/SIGINT go to it, so a service manager stops the site as before.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .supernode_launch import FLOWER_HEARTBEAT_S
from .worker_protocol import WORKER_START_WAIT_S

__all__ = [
    "ACTIVATION_REFUSED",
    "DEFAULT_STOP_WAIT_S",
    "SiteWorker",
    "run_supernode",
    "stop_process",
]

#: What Flower's SuperNode prints when the SuperLink refuses to activate it (code 2004).
ACTIVATION_REFUSED = "Failed to activate SuperNode"

#: Seconds before the first retry; doubled each time up to ``_MAX_DELAY``.
_FIRST_DELAY = 5.0
_MAX_DELAY = 30.0

#: A site worker that exits sooner than this after a restart is restarted after a longer wait.
_QUICK_EXIT_S = 30.0

#: Seconds to wait for the last lines of an exited SuperNode's output.
_DRAIN_S = 10.0

#: A worker ended by SIGTERM/SIGINT (or leaving with 0, its own Ctrl-C exit) is not restarted
#: if a stop signal reaches this process within this many seconds: the whole site is stopping
#: (Ctrl-C, systemd, ``timeout``).
_SIGNAL_GRACE_S = 2.0

#: Set when SIGTERM or SIGINT reaches this process while the SuperNode runs.
_STOP_SIGNALLED = threading.Event()

#: Seconds a SuperNode gets to stop after the stop signal is passed on before it is killed
#: (``supernode.stop_wait_s``): Flower's SuperNode can hang in its own exit handler.
DEFAULT_STOP_WAIT_S = 15.0
#: A second stop signal this many seconds after the first or later kills the SuperNode at once.
_SAME_STOP_S = 1.0


def _run_once(
    command: Sequence[str],
    out: TextIO,
    stop_wait_s: float = DEFAULT_STOP_WAIT_S,
    own_session: bool = False,
) -> tuple[int, bool]:
    """Run the SuperNode to its end, passing its output through; (exit code, was it refused
    activation). SIGTERM and SIGINT received meanwhile are passed on to it; one that has not
    stopped ``stop_wait_s`` seconds later, or when a second stop signal comes, is killed. A
    SuperNode ended by a signal gives 128 + its number, as a shell reports it (the first stop
    signal's when we killed it).

    The SuperNode is reaped as soon as it exits, not when its output ends: its SuperExec child
    holds the same pipe and leaves only once it sees its parent gone, which an unreaped
    (zombie) parent never is.

    With ``own_session`` the SuperNode runs in a session of its own, so that a stop sent to
    the site's process group (Ctrl-C in a terminal, ``timeout``, ``kill -TERM -PGID``) reaches
    it once, passed on by us, and not also directly: Flower's SuperNode often hangs in its exit
    handler when a second signal interrupts it. Only for a SuperNode that ends by itself when
    this process dies (``client.supernode_launch`` watches its parent); a group SIGKILL no
    longer reaches it."""
    child = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=own_session,
    )
    seen: dict[str, Any] = {"refused": False, "stop_signal": None, "stop_at": 0.0}

    def relay() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            out.write(line)
            out.flush()
            seen["refused"] = seen["refused"] or ACTIVATION_REFUSED in line

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()

    def forward(signum: int, _frame: object) -> None:
        _STOP_SIGNALLED.set()
        now = time.monotonic()
        if seen["stop_signal"] is None:
            seen["stop_signal"], seen["stop_at"] = signum, now
            child.send_signal(signum)
            print(
                f"stopping the site: waiting up to {stop_wait_s:g} s for its SuperNode "
                "(Ctrl-C again to stop it at once)",
                file=sys.stderr,
                flush=True,
            )
        elif now - seen["stop_at"] > _SAME_STOP_S:  # asked again: wanted gone now
            _kill_supernode(child, "a second stop signal came")
        # sooner, it is the same stop arriving twice: `timeout` passes on the signal its
        # process group got, so Ctrl-C on `timeout ... python -m client` reaches us twice

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                stopping = seen["stop_signal"] is not None
                if stopping and time.monotonic() - seen["stop_at"] > stop_wait_s:
                    _kill_supernode(child, f"it had not stopped {stop_wait_s:g} s after the signal")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reader.join(timeout=_DRAIN_S)  # what it printed last (its SuperExec then leaves too)
    if code == -signal.SIGKILL and seen["stop_signal"] is not None:
        code = -seen["stop_signal"]  # killed by us for that stop
    return (128 - code if code < 0 else code), seen["refused"]


def stop_process(process: subprocess.Popen | None, wait_s: float) -> None:
    """SIGTERM a helper process still running, and SIGKILL it if it has not ended within
    ``wait_s`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _kill_supernode(child: subprocess.Popen[str], why: str) -> None:
    if child.poll() is None:
        print(
            f"stopping the site: killed its SuperNode ({why}); the site's state is on disk, "
            "written after each message",
            file=sys.stderr,
            flush=True,
        )
        child.kill()


def run_supernode(
    command: Sequence[str],
    activation_wait_s: float = 180.0,
    max_retries: int | None = None,
    out: TextIO | None = None,
    first_delay: float = _FIRST_DELAY,
    stop_wait_s: float = DEFAULT_STOP_WAIT_S,
    heartbeat_s: float = FLOWER_HEARTBEAT_S,
    own_session: bool = False,
) -> int:
    """Run ``command`` (``flower-supernode ...``); while the SuperLink refuses to activate it,
    wait and start it again, for at most ``activation_wait_s`` seconds (and ``max_retries``
    retries when given), the waits doubling from ``first_delay`` up to 30 s (or one
    heartbeat, ``heartbeat_s``, when shorter). A SuperNode that
    has not stopped ``stop_wait_s`` seconds after SIGTERM/SIGINT is killed. Returns the
    SuperNode's last exit code. ``heartbeat_s`` is the SuperNode's heartbeat interval, which
    the refusal message quotes (an old session expires after two of them); ``own_session``:
    see :func:`_run_once`."""
    out = out or sys.stdout
    started = time.monotonic()
    deadline = started + activation_wait_s
    delay, attempt = first_delay, 0
    while True:
        code, refused = _run_once(command, out, stop_wait_s, own_session)
        if code == 0 or not refused or _STOP_SIGNALLED.is_set():  # stopping: no retry
            return code
        attempt += 1
        left = deadline - time.monotonic()
        if left <= 0 or (max_retries is not None and attempt > max_retries):
            print(
                f"error: the SuperLink refused to activate this SuperNode {attempt} time(s) in "
                f"{time.monotonic() - started:.0f} s: is this site's public key registered "
                "(flwr supernode register KEY.pub ...), and is it the key in "
                "supernode.auth_private_key?",
                file=sys.stderr,
                flush=True,
            )
            return code
        wait = min(delay, left)
        print(
            "the SuperLink refused to activate this SuperNode. If the site was restarted right "
            "after a crash, its old session has not expired yet (the SuperLink drops it after "
            f"two missed heartbeats, about {2 * heartbeat_s:.0f} s): retrying in {wait:.0f} s "
            f"(attempt {attempt}; "
            f"giving up {left:.0f} s from now, supernode.activation_wait_s). An unregistered "
            "key is refused the same way.",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(wait)
        # an old session ends within two heartbeats: no need to wait longer than one
        delay = min(2 * delay, _MAX_DELAY, heartbeat_s)


class SiteWorker:
    """The site worker (``python -m client.worker``) for the SuperNode's lifetime: started
    before it (ready once its socket exists), started again whenever it exits, stopped with it.

    Use as a context manager around :func:`run_supernode`.
    """

    def __init__(
        self,
        state_dir: Path,
        socket_path: Path,
        out: TextIO | None = None,
        ready_timeout_s: float = 900.0,
        restart_delay_s: float = 2.0,
    ) -> None:
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.out = out or sys.stdout
        self.ready_timeout_s = ready_timeout_s
        self.restart_delay_s = restart_delay_s
        self.process: subprocess.Popen[str] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and the final stop do not interleave
        self._keeper: threading.Thread | None = None

    def _spawn(self) -> subprocess.Popen[str]:
        self.socket_path.unlink(missing_ok=True)  # ready = the new worker's socket exists
        command = [sys.executable, "-m", "client.worker", "--state-dir", str(self.state_dir)]
        child = subprocess.Popen(
            [*command, "--socket", str(self.socket_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

        def relay() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                self.out.write(line)
                self.out.flush()

        threading.Thread(target=relay, daemon=True).start()
        return child

    def _wait_ready(self, child: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.socket_path.exists():
            if child.poll() is not None:
                raise RuntimeError(f"the site worker exited with code {child.returncode}")
            if time.monotonic() > deadline:
                child.kill()
                raise RuntimeError(f"the site worker was not ready in {self.ready_timeout_s} s")
            time.sleep(0.1)

    def _keep(self) -> None:
        delay = self.restart_delay_s
        while not self._stopping.is_set():
            assert self.process is not None
            spawned = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            # a stop signal sent to the whole site also ends the worker: not a crash (0: the
            # worker's own way out of Ctrl-C)
            signalled = code in (0, -signal.SIGTERM, -signal.SIGINT)
            if signalled and _STOP_SIGNALLED.wait(_SIGNAL_GRACE_S):
                return
            # a worker that keeps dying at once (bad data, no memory) is retried ever less often
            quick = self.restarts > 0 and time.monotonic() - spawned < _QUICK_EXIT_S
            delay = min(2 * delay, _MAX_DELAY) if quick else self.restart_delay_s
            print(
                f"the site worker exited with code {code}: starting it again in {delay:g} s "
                f"(a message meanwhile waits up to {WORKER_START_WAIT_S:g} s for it, then is "
                "answered with an error and the round goes on without this site)",
                file=sys.stderr,
                flush=True,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.restarts += 1
                self.process = self._spawn()

    def __enter__(self) -> SiteWorker:
        from .worker_protocol import write_key

        write_key(self.state_dir)
        self.process = self._spawn()
        self._wait_ready(self.process)
        self._keeper = threading.Thread(target=self._keep, daemon=True)
        self._keeper.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._stopping.set()
        stop_process(self.process, _DRAIN_S)
        self.socket_path.unlink(missing_ok=True)
