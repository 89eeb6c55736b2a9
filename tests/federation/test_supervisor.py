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
