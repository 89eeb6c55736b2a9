"""``python -m client.worker --state-dir DIR --socket PATH``: the site worker.

A long-lived process, started (and restarted when it exits) by ``python -m client`` next to
the SuperNode, that keeps torch imported and the site's config and data loaded, and runs the
messages the ClientApp hands it over a Unix socket (``client/worker_protocol.py``). Flower
starts a fresh ClientApp process per message; without the worker each of them would import
torch, compose the config and build the data sets again.

What it keeps in memory is only what can be rebuilt from the state directory: the rater heads,
the snapshot, the optimizer state and the privacy ledger are written back atomically after
every message, so a killed worker loses nothing but the message in flight (whose ClientApp
then answers with an error and the round goes on without the site). The snapshot and the
optimizer state are written behind the reply and read back from memory while their files are
unchanged (``SiteStore(write_behind=True)``): the next message, and a stop by SIGTERM or
Ctrl-C, first wait for the write; a worker killed outright within that second or so keeps the
previous round's files, as if killed during the round.

SecAgg+ rounds (``secagg-train-ahead``): the ClientApp of the round's first message (the setup
or share-keys stage) hands over the round's weights as a ``train-ahead`` request, which is
answered at once and then trained; the collect stage's ClientApp, one or two messages later,
asks for that training's result (``collect``), waiting on the socket until it is done. A worker
started again in between has none, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import numpy as np

from .held_weights import HeldWeights
from .parent_watch import exit_with_parent
from .rounds import run_message
from .site import SiteRuntime
from .site_config import SiteDataError
from .worker_protocol import (
    COLLECT,
    TRAIN_AHEAD,
    RoundOutcome,
    read_key,
    receive_request,
    send_outcome,
)

__all__ = ["serve"]

log = logging.getLogger("mrprism.worker")


def _warm(site: SiteRuntime) -> None:
    """Build what every message needs once: the data sets (decoded, cached) and their facts."""
    _ = site.info  # the training split, its raters and classes
    for split in ("val", "test"):
        with contextlib.suppress(ValueError):  # an empty split: its message will say so
            site.dataset(split)


def serve(state_dir: str | Path, socket_path: str | Path, max_messages: int | None = None) -> None:
    """Open the site in ``state_dir``, listen on ``socket_path`` (owner-only) and run the
    messages that come, one at a time; returns after ``max_messages`` messages (default: never).
    """
    site = SiteRuntime.from_state_dir(state_dir, write_behind=True)
    _warm(site)
    socket_path = Path(socket_path)
    socket_path.unlink(missing_ok=True)  # left by a worker that was killed
    old_umask = os.umask(0o177)  # the socket file is created owner-only (0600)
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=read_key(state_dir))
    finally:
        os.umask(old_umask)
    print(
        f"site worker of {site.name} ready after {time.process_time():.1f} s of CPU "
        f"(pid {os.getpid()}, {socket_path})",
        flush=True,
    )
    try:
        with listener:
            _serve_messages(site, listener, max_messages)
    finally:  # a stop, or the last message: the state written behind its reply reaches disk
        site.store.flush()


def _serve_messages(site: SiteRuntime, listener: Listener, max_messages: int | None) -> None:
    served = 0
    held = HeldWeights()  # the last training message's weights: the next may bring a change
    # a SecAgg+ round's training, started at its first message: ((run id, round), outcome)
    ahead: tuple[tuple[int, int], RoundOutcome] | None = None
    while max_messages is None or served < max_messages:
        try:
            conn = listener.accept()
        except (AuthenticationError, OSError, EOFError) as err:
            log.warning("refused a connection: %s", err)
            continue
        with conn:
            try:
                kind, config, arrays, run_id = receive_request(conn)
            except (EOFError, OSError, ValueError, KeyError) as err:
                log.warning("dropped a malformed request: %s", err)
                continue
            started = time.perf_counter()
            if kind == TRAIN_AHEAD:
                # the key exchange's reply goes now; the collect stage's request, queued on
                # the socket meanwhile, is answered once this training is done
                _answer(conn, kind, RoundOutcome())
                conn.close()
                outcome = _run(site, held, "train", config, arrays, run_id)
                ahead = (_round_of(config, run_id), outcome)
            elif kind == COLLECT:
                outcome = _collect(site.name, ahead, config, run_id)
                ahead = None
            else:
                ahead = None  # a plain message: no SecAgg+ round is waiting for it
                outcome = _run(site, held, kind, config, arrays, run_id)
            served += 1
            print(
                f"{kind} message {served} in {time.perf_counter() - started:.1f} s"
                + (f": {outcome.error}" if outcome.error else ""),
                flush=True,
            )
            if kind != TRAIN_AHEAD:
                _answer(conn, kind, outcome)


def _answer(conn: Connection, kind: str, outcome: RoundOutcome) -> None:
    try:
        send_outcome(conn, outcome)
    except OSError as err:  # the ClientApp gave up (timeout, SuperNode stopped)
        log.warning("could not answer the %s message: %s", kind, err)


def _round_of(config: dict[str, Any], run_id: int) -> tuple[int, int]:
    return run_id, int(config.get("server-round", 0))


def _collect(
    site_name: str,
    ahead: tuple[tuple[int, int], RoundOutcome] | None,
    config: dict[str, Any],
    run_id: int,
) -> RoundOutcome:
    """The training started at this SecAgg+ round's first message, or why there is none."""
    wanted = _round_of(config, run_id)
    if ahead is not None and ahead[0] == wanted:
        return ahead[1]
    return RoundOutcome(
        error=f"site {site_name}: the training of run {wanted[0]} round {wanted[1]} that began "
        "with the round's first SecAgg+ message is not in this site worker (it was started "
        "again since, or another message came between): the site sits this round out"
    )


def _run(
    site: SiteRuntime,
    held: HeldWeights,
    kind: str,
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    run_id: int,
) -> RoundOutcome:
    site.forget_saved_state()
    try:
        site.store.flush()  # the previous message's state, written behind its reply
    except OSError as err:  # a full or failing disk: this round would start from stale state
        return RoundOutcome(error=f"the site's state could not be written: {err}")
    try:
        return run_message(kind, config, arrays, run_id=run_id, site=site, held=held)
    except Exception as err:  # a bug, not a site fault: say it, keep serving
        log.exception("the %s message failed", kind)
        return RoundOutcome(error=f"the site worker failed: {type(err).__name__}: {err}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__)
    parser.add_argument("--state-dir", required=True, help="the site's state directory")
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument(
        "--max-messages", type=int, default=None, help="exit after this many messages (tests)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="site worker: %(message)s")
    socket_path = Path(args.socket)

    def leave() -> None:  # the main thread waits in accept() or trains: leave from here
        socket_path.unlink(missing_ok=True)
        os._exit(0)

    exit_with_parent(leave)  # python -m client was killed outright: no orphaned worker
    # python -m client stops its worker with SIGTERM: leave through serve's cleanup, which
    # waits for the state written behind the last reply
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.state_dir, args.socket, args.max_messages)
    except (SiteDataError, FileNotFoundError) as err:
        print(f"error: site worker: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        socket_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
