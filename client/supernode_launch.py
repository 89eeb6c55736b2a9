"""``python -m client.supernode_launch --idle-poll-s S [flower-supernode options]``: Flower's
SuperNode with a shorter wait between empty polls.

Flower 1.41's SuperNode asks the SuperLink for a message and, when none is waiting, sleeps a
fixed 3 s before asking again (``time.sleep(3)`` in ``flwr/supernode/start_client_internal.py``;
no option or environment variable sets it). It asks right after sending each reply, usually
before the server has aggregated and sent the next message, so each round's messages waited up
to 3 s for nothing. This module runs the same ``flower-supernode`` entry point in this process
after pointing that one wait (and only that one) at ``--idle-poll-s``; every other option goes
to Flower unchanged. When the installed Flower no longer has that wait (its source changed),
the SuperNode runs unchanged and a notice says so. An idle SuperNode then asks ``1 / S`` times a
second instead of a third: one small gRPC call each, negligible for a few hospitals.
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
    "DEFAULT_IDLE_POLL_S",
    "FLOWER_IDLE_WAIT_S",
    "ShortIdleWait",
    "main",
    "pin_app",
    "shorten_idle_wait",
]

#: The fixed wait of Flower 1.41's SuperNode after a poll that found no message (seconds).
FLOWER_IDLE_WAIT_S = 3
#: Ours (``supernode.idle_poll_s``): a message waits at most this long to be picked up.
DEFAULT_IDLE_POLL_S = 0.5


class ShortIdleWait:
    """The ``time`` module as the SuperNode's loop sees it, with its idle wait shortened.

    Only ``sleep(FLOWER_IDLE_WAIT_S)`` changes; every other call (its 0.5 s waits for a reply
    and for an object, ``time.time``, ...) goes to :mod:`time` as before."""

    def __init__(self, idle_poll_s: float) -> None:
        if not idle_poll_s > 0:
            raise ValueError(f"idle_poll_s must be > 0 seconds, got {idle_poll_s!r}")
        self.idle_poll_s = float(idle_poll_s)

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_poll_s if seconds == FLOWER_IDLE_WAIT_S else seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def shorten_idle_wait(idle_poll_s: float) -> bool:
    """Point the SuperNode loop's idle wait at ``idle_poll_s``; False (nothing changed) when
    the installed Flower's loop is not the one this was written for."""
    from flwr.supernode import start_client_internal as loop

    waits = inspect.getsource(loop).count(f"time.sleep({FLOWER_IDLE_WAIT_S})")
    if waits != 1 or not isinstance(getattr(loop, "time", None), types.ModuleType):
        return False
    loop.time = ShortIdleWait(idle_poll_s)  # type: ignore[assignment]
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
        description="Flower's flower-supernode with a shorter wait between empty polls; every "
        "option but --idle-poll-s is flower-supernode's.",
    )
    parser.add_argument(
        "--idle-poll-s",
        type=positive_float,
        required=True,
        help=f"seconds between polls that find no message (Flower's: {FLOWER_IDLE_WAIT_S})",
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
    from flwr.supernode.cli import flower_supernode

    from .parent_watch import exit_with_parent

    exit_with_parent()  # python -m client was killed outright: no orphaned SuperNode
    sys.argv = ["flower-supernode", *supernode_args]  # Flower's CLI parses sys.argv
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
