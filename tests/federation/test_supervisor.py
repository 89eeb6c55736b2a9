"""``python -m client``'s hold on its SuperNode: under node authentication a refused
activation is retried, with the reason printed, until it succeeds or the wait is over; a
SuperNode that does not stop after SIGTERM/Ctrl-C is killed. Stand-ins for
``flower-supernode`` (a script that is refused a set number of times, one that ignores the
stop signal) make counts and timings exact; the real SuperNode is exercised in
``test_security.py`` and ``test_failures.py``."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from client import supervisor
from client.supervisor import ACTIVATION_REFUSED, run_supernode

STAND_IN = f"""
import pathlib, sys
tries = pathlib.Path(sys.argv[1])
count = int(tries.read_text()) if tries.exists() else 0
tries.write_text(str(count + 1))
if count < int(sys.argv[2]):
    print("ERROR: [code: 2004] {ACTIVATION_REFUSED}.", flush=True)
    sys.exit(1)
print("SuperNode serving", flush=True)
"""


def _command(tmp_path, refusals: int) -> list[str]:
    script = tmp_path / "supernode.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script), str(tmp_path / "tries"), str(refusals)]


def test_a_refused_activation_is_retried_until_the_old_session_is_gone(tmp_path, capsys):
    out = io.StringIO()
    code = run_supernode(
        _command(tmp_path, 2), activation_wait_s=30, out=out, first_delay=0.05, heartbeat_s=12
    )
    assert code == 0
    assert (tmp_path / "tries").read_text() == "3"  # refused twice, then served
    assert out.getvalue().count(ACTIVATION_REFUSED) == 2 and "serving" in out.getvalue()
    err = capsys.readouterr().err
    assert err.count("its old session has not expired yet") == 2
    assert err.count("two missed heartbeats, about 24 s") == 2  # this SuperNode's heartbeat


def test_an_unregistered_key_ends_after_the_retries_with_the_likely_cause(tmp_path, capsys):
    out = io.StringIO()
    code = run_supernode(_command(tmp_path, 99), 30, max_retries=2, out=out, first_delay=0.05)
    assert code == 1
    assert (tmp_path / "tries").read_text() == "3"  # the first try and two retries
    assert "is this site's public key registered" in capsys.readouterr().err


def test_other_failures_are_not_retried(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import sys; print('CERTIFICATE_VERIFY_FAILED'); sys.exit(1)")
    out = io.StringIO()
    assert run_supernode([sys.executable, str(script)], 30, out=out, first_delay=0.05) == 1
    assert out.getvalue().count("CERTIFICATE_VERIFY_FAILED") == 1


# a SuperNode that prints once it ignores SIGTERM/SIGINT, then never stops by itself (as
# Flower's can hang in its exit handler): only a kill ends it
DEAF = """
import signal, time
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
print("SuperNode serving", flush=True)
time.sleep(120)
"""


def _stop_a_deaf_supernode(
    tmp_path, signals: list[int], stop_wait_s: float, gap_s: float = 1.5
) -> tuple[int, float]:
    """Run the deaf stand-in under ``run_supernode``, send this process ``signals`` (``gap_s``
    apart) once it serves; (exit code, seconds from the first signal to the return). A
    watchdog kills the stand-in after 60 s, so a supervisor that never kills it fails
    instead of hanging."""
    script = tmp_path / "deaf.py"
    script.write_text(DEAF)
    out = io.StringIO()
    sent: list[float] = []

    def stop_when_serving() -> None:
        deadline = time.monotonic() + 60
        while "serving" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        for signum in signals:
            sent.append(time.monotonic())
            os.kill(os.getpid(), signum)
            time.sleep(gap_s)
        time.sleep(60)
        subprocess.run(["pkill", "-9", "-f", str(script)], check=False)

    threading.Thread(target=stop_when_serving, daemon=True).start()
    try:
        code = run_supernode(
            [sys.executable, str(script)], 30, out=out, first_delay=0.05, stop_wait_s=stop_wait_s
        )
    finally:
        supervisor._STOP_SIGNALLED.clear()  # this process goes on running other tests
    return code, time.monotonic() - sent[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_supernode_that_does_not_stop_after_the_signal_is_killed(tmp_path, capsys, signum):
    code, seconds = _stop_a_deaf_supernode(tmp_path, [signum], stop_wait_s=1.0)
    assert code == 128 + signum  # reported as a shell reports a stop by that signal
    assert 1.0 <= seconds < 30  # given its second, then killed; without the kill: 60 s
    assert "had not stopped 1 s after the signal" in capsys.readouterr().err


def test_a_second_ctrl_c_kills_the_supernode_at_once(tmp_path, capsys):
    code, seconds = _stop_a_deaf_supernode(
        tmp_path, [signal.SIGINT, signal.SIGINT], stop_wait_s=45.0
    )
    assert code == 128 + signal.SIGINT
    assert seconds < 30  # the second Ctrl-C, not the 45 s wait (nor the 60 s watchdog)
    assert "a second stop signal came" in capsys.readouterr().err


def test_one_stop_arriving_twice_at_once_is_not_a_second_ctrl_c(tmp_path, capsys):
    # Ctrl-C on `timeout ... python -m client`: the group's SIGINT and the one `timeout`
    # passes on come together; the SuperNode still gets its stop_wait_s to leave cleanly
    code, seconds = _stop_a_deaf_supernode(
        tmp_path, [signal.SIGINT, signal.SIGINT], stop_wait_s=3.0, gap_s=0.1
    )
    assert code == 128 + signal.SIGINT
    assert 3.0 <= seconds < 30
    err = capsys.readouterr().err
    assert "had not stopped 3 s after the signal" in err and "second stop" not in err


# a SuperNode that notes its session and every stop signal it gets, and leaves a second after
# the last one
COUNTING = """
import os, pathlib, signal, sys, time
log = pathlib.Path(sys.argv[1])
pathlib.Path(sys.argv[2]).write_text(str(os.getsid(0)))
def note(signum, frame):
    with log.open("a") as notes:
        notes.write(f"{signum}\\n")
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, note)
print("SuperNode serving", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if log.exists() and time.time() - log.stat().st_mtime > 1.0:
        break
    time.sleep(0.05)
"""

SITE = """
import sys
from client.supervisor import run_supernode
command = [sys.executable, *sys.argv[1:4]]
sys.exit(run_supernode(command, 30, own_session=sys.argv[4] == "own"))
"""


@pytest.mark.parametrize("session", ["own", "shared"])
def test_a_supernode_in_its_own_session_is_stopped_by_the_signal_passed_on(tmp_path, session):
    """``kill -TERM -PGID`` (or Ctrl-C in a terminal) to a site: a SuperNode in the site's
    process group gets the signal from the group and again from ``python -m client``, which
    passes it on (two signals close together may merge into one, so the count is not a
    test). In a session of its own the group's signal misses it, and the one passed on still
    stops it."""
    (tmp_path / "supernode.py").write_text(COUNTING)
    (tmp_path / "site.py").write_text(SITE)
    notes, sid = tmp_path / "signals", tmp_path / "sid"
    site = subprocess.Popen(
        [sys.executable, str(tmp_path / "site.py"), str(tmp_path / "supernode.py"), str(notes),
         str(sid), session],
        cwd=Path(__file__).resolve().parents[2],  # the project: `client` importable
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a session (and group) of its own, as a site in a terminal
    )  # fmt: skip
    try:
        assert site.stdout is not None
        for line in site.stdout:  # its SuperNode is up and has its handlers
            if "serving" in line:
                break
        os.killpg(site.pid, signal.SIGTERM)
        assert site.wait(timeout=60) == 0  # the SuperNode left by itself after its signal
    finally:
        if site.poll() is None:
            os.killpg(site.pid, signal.SIGKILL)
    assert (int(sid.read_text()) == site.pid) == (session == "shared")
    assert str(int(signal.SIGTERM)) in notes.read_text().split()
