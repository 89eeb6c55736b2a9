"""``python -m client.supernode_launch --idle-poll-s S [--heartbeat-s H] [flower-supernode
options]``: Flower's SuperNode with a shorter wait between empty polls and, optionally, a shorter
heartbeat.

Flower 1.41's SuperNode asks the SuperLink for a message and, when none is waiting, sleeps a
fixed 3 s before asking again (``time.sleep(3)`` in ``flwr/supernode/start_client_internal.py``;
no option or environment variable sets it). It asks right after sending each reply, usually
before the server has aggregated and sent the next message, so each round's messages waited up
to 3 s for nothing; and while its ClientApp works it looks for the reply every 0.5 s, so each
reply waited up to 0.5 s more. This module runs the same ``flower-supernode`` entry point in
this process after pointing those waits (and only those) at shorter ones
(:class:`ShortIdleWait`: ``--idle-poll-s``, less right after a message); every other option
goes to Flower unchanged. When the installed Flower no longer has those waits (its source
changed), the SuperNode runs unchanged and a notice says so. An idle SuperNode then asks
``1 / S`` times a second instead of a third: one small request each, negligible for a few
hospitals.

Its heartbeat is Flower's fixed 30 s too (``HEARTBEAT_DEFAULT_INTERVAL``, no option), and the
SuperLink takes a SuperNode for gone after two intervals without one: a site that lost power
held its round for a minute, and under node authentication a site restarted at once was refused
for as long (its old session still counted as online). ``--heartbeat-s`` sets the interval the
SuperNode announces and keeps; the SuperLink accepts 10-1800 s.
"""

from __future__ import annotations

import argparse
import base64
import inspect
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path

from mrprism_core.cli_types import positive_float

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_IDLE_POLL_S",
    "FIRST_IDLE_POLL_S",
    "FLOWER_HEARTBEAT_S",
    "FLOWER_IDLE_WAIT_S",
    "FLOWER_REPLY_WAIT_S",
    "HEARTBEAT_RANGE_S",
    "REPLY_POLL_S",
    "ShortIdleWait",
    "main",
    "pin_app",
    "set_heartbeat",
    "shorten_idle_wait",
]

#: The fixed wait of Flower 1.41's SuperNode after a poll that found no message (seconds).
FLOWER_IDLE_WAIT_S = 3
#: Ours (``supernode.idle_poll_s``): a message waits at most this long to be picked up.
DEFAULT_IDLE_POLL_S = 0.5
#: Right after a message the SuperNode asks for the next one after this, doubling up to
#: ``idle_poll_s`` (the next SecAgg+ stage, or round, may be on its way).
FIRST_IDLE_POLL_S = 0.05
#: Flower 1.41's SuperNode looks for its ClientApp's reply (and a reply's objects) every 0.5 s.
FLOWER_REPLY_WAIT_S = 0.5
#: Ours: a reply is sent at most this long after the ClientApp stored it.
REPLY_POLL_S = 0.05
#: Flower 1.41's SuperNode heartbeat interval (seconds); gone after two without a heartbeat.
FLOWER_HEARTBEAT_S = 30
#: Ours (``supernode.heartbeat_s``): a site that crashed is seen gone after about 20 s, not 60 s.
DEFAULT_HEARTBEAT_S = 10.0
#: The heartbeat intervals Flower's SuperLink accepts (``HEARTBEAT_MIN/MAX_INTERVAL``), seconds.
HEARTBEAT_RANGE_S = (10.0, 1800.0)


class ShortIdleWait:
    """The ``time`` module as the SuperNode's loop sees it, with its polling waits shortened.

    - ``sleep(FLOWER_IDLE_WAIT_S)``, after a poll that found no message, waits
      ``idle_poll_s``; right after a message it waits only :data:`FIRST_IDLE_POLL_S`,
      doubling from poll to poll up to ``idle_poll_s``: a SecAgg+ stage's next message comes
      a fraction of a second after the reply, while an idle SuperNode still asks at its usual
      pace (a few more small requests per message);
    - ``sleep(FLOWER_REPLY_WAIT_S)``, the loop's wait while its ClientApp works on a message
      (it looks for the reply, and for a reply's object, in its own memory), waits
      :data:`REPLY_POLL_S`: every reply otherwise sat up to 0.5 s before it was sent.

    With ``idle_poll_s`` at Flower's own wait or above, every wait stays Flower's. Every other
    call (``time.time``, ...) goes to :mod:`time` as before."""

    def __init__(self, idle_poll_s: float) -> None:
        if not idle_poll_s > 0:
            raise ValueError(f"idle_poll_s must be > 0 seconds, got {idle_poll_s!r}")
        self.idle_poll_s = float(idle_poll_s)
        self.prompt = self.idle_poll_s < FLOWER_IDLE_WAIT_S
        self._next_idle = self.idle_poll_s  # no message yet: the idle pace

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_WAIT_S:
            wait = self._next_idle
            self._next_idle = min(2 * wait, self.idle_poll_s)
        elif seconds == FLOWER_REPLY_WAIT_S and self.prompt:
            wait = REPLY_POLL_S
            self._next_idle = min(FIRST_IDLE_POLL_S, self.idle_poll_s)  # a message in hand
        else:
            wait = seconds
        time.sleep(wait)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def shorten_idle_wait(idle_poll_s: float) -> bool:
    """Point the SuperNode loop's polling waits at :class:`ShortIdleWait`; False (nothing
    changed) when the installed Flower's loop is not the one this was written for."""
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    waits = source.count(f"time.sleep({FLOWER_IDLE_WAIT_S})")
    reply_waits = source.count(f"time.sleep({FLOWER_REPLY_WAIT_S})")
    if (
        waits != 1
        or reply_waits != 2
        or not isinstance(getattr(loop, "time", None), types.ModuleType)
    ):
        return False
    loop.time = ShortIdleWait(idle_poll_s)  # type: ignore[assignment]
    return True


def set_heartbeat(seconds: float) -> bool:
    """Make the SuperNode announce and keep a heartbeat every ``seconds``; False (nothing
    changed) when the installed Flower does not read Flower 1.41's fixed interval where this
    expects it.

    Raises:
        ValueError: ``seconds`` outside the interval Flower's SuperLink accepts.
    """
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection as connection

    low, high = HEARTBEAT_RANGE_S
    if not low <= seconds <= high:
        raise ValueError(
            f"heartbeat_s must be {low:g}-{high:g} seconds (Flower's SuperLink refuses any "
            f"other), got {seconds!r}"
        )
    # the interval sent when activating and with every heartbeat, and the sender's own loop
    modules = (connection, heartbeat)
    if any(getattr(m, "HEARTBEAT_DEFAULT_INTERVAL", None) != FLOWER_HEARTBEAT_S for m in modules):
        return False
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]
    return True


def pin_app(root: Path) -> bool:
    """Make the SuperNode refuse every app that is not the site's own code (see
    :mod:`client.app_check`); False (nothing changed) when the installed Flower's loop is not
    the one this was written for.

    Flower refuses an app that none of its ``trusted_entities`` signed, with its own error
    reply to the server. The open-source SuperLink signs nothing, so this process makes a key
    of its own, trusts only that key, and signs an app when, and only when, it matches."""
    import hashlib
    import json

    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from flwr.supercore.fab import Fab
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign
    from flwr.supernode import start_client_internal as loop

    from .app_check import app_differences

    pull = getattr(loop, "_pull_and_store_message", None)
    if pull is None or "trusted_entities" not in inspect.signature(pull).parameters:
        return False
    key = ed25519.Ed25519PrivateKey.generate()
    key_id = "fpk_mrprism_site"
    trusted = {
        key_id: key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    }

    def site_checked(get_fab):  # noqa: ANN001, ANN202 - Flower's callable
        def get_checked_fab(fab_hash: str, run_id: int) -> Fab:
            fab = get_fab(fab_hash, run_id)
            problems = app_differences(fab.content, root)
            if problems:
                print(
                    f"refusing run {run_id}: its app is not this site's code ({root}): "
                    + "; ".join(problems[:5])
                    + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""),
                    file=sys.stderr,
                    flush=True,
                )
                # a licence flag but no signature: Flower refuses it with "FAB verification
                # failed" (with no flag at all it would blame the SuperLink for not supporting
                # verification, which is not the reason)
                return Fab(fab.hash_str, fab.content, {"valid_license": "Valid"})
            signed_at = int(time.time())
            digest = hashlib.sha256(fab.content).digest()
            signature = key.sign(create_message_to_sign(digest, signed_at))
            encoded = base64.urlsafe_b64encode(signature).decode().rstrip("=")
            verification = json.dumps({"signature": encoded, "signed_at": signed_at})
            return Fab(fab.hash_str, fab.content, {"valid_license": "Valid", key_id: verification})

        return get_checked_fab

    def pull_own_apps_only(**kwargs):  # noqa: ANN003, ANN202 - Flower's arguments
        kwargs["get_fab"] = site_checked(kwargs["get_fab"])
        kwargs["trusted_entities"] = trusted
        return pull(**kwargs)

    loop._pull_and_store_message = pull_own_apps_only  # type: ignore[assignment]
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.supernode_launch",
        description="Flower's flower-supernode with a shorter wait between empty polls (and "
        "heartbeat); every option but --idle-poll-s, --heartbeat-s and --pin-app is "
        "flower-supernode's.",
    )
    parser.add_argument(
        "--idle-poll-s",
        type=positive_float,
        required=True,
        help=f"seconds between polls that find no message (Flower's: {FLOWER_IDLE_WAIT_S})",
    )
    parser.add_argument(
        "--heartbeat-s",
        type=positive_float,
        default=None,
        help=f"seconds between the SuperNode's heartbeats (Flower's: {FLOWER_HEARTBEAT_S}); "
        "the SuperLink takes it for gone after two without one",
    )
    parser.add_argument(
        "--pin-app",
        metavar="DIR",
        default=None,
        help="run only apps whose Python files are this checkout's (client/app_check.py)",
    )
    args, supernode_args = parser.parse_known_args(argv)
    if args.pin_app and not pin_app(Path(args.pin_app)):
        print(
            "error: this Flower's SuperNode cannot be made to refuse apps that are not this "
            "site's code; not starting it",
            file=sys.stderr,
            flush=True,
        )
        return 2
    if not shorten_idle_wait(args.idle_poll_s):
        print(
            f"notice: this Flower's SuperNode has no fixed {FLOWER_IDLE_WAIT_S} s idle wait to "
            "shorten; running it unchanged",
            file=sys.stderr,
            flush=True,
        )
    try:
        heartbeat_set = args.heartbeat_s is None or set_heartbeat(args.heartbeat_s)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if not heartbeat_set:
        print(
            f"notice: this Flower's SuperNode has no fixed {FLOWER_HEARTBEAT_S} s heartbeat to "
            f"change; it keeps its own (not {args.heartbeat_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
    from flwr.supernode.cli import flower_supernode

    from .parent_watch import exit_with_parent

    exit_with_parent()  # python -m client was killed outright: no orphaned SuperNode
    sys.argv = ["flower-supernode", *supernode_args]  # Flower's CLI parses sys.argv
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
