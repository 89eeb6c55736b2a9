"""``python -m client`` under node authentication: a refused activation is retried, with the
reason printed, until it succeeds or the wait is over. A stand-in for ``flower-supernode``
(a script that is refused a set number of times) makes the count exact; the real SuperNode
is exercised in ``test_security.py``."""

from __future__ import annotations

import io
import sys

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
    code = run_supernode(_command(tmp_path, 2), activation_wait_s=30, out=out, first_delay=0.05)
    assert code == 0
    assert (tmp_path / "tries").read_text() == "3"  # refused twice, then served
    assert out.getvalue().count(ACTIVATION_REFUSED) == 2 and "serving" in out.getvalue()
    assert capsys.readouterr().err.count("its old session has not expired yet") == 2


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
