"""Between the ClientApp and the site worker: a Unix socket, a shared key, and the messages.

Flower starts a fresh ClientApp process for every message; the site worker
(``client/worker.py``, started by ``python -m client``) stays up with torch imported and the
site's data and config loaded. The ClientApp hands it the message's config and packed shared
weights and returns what it answers. This module is all the ClientApp needs for that and
imports neither torch nor the model code.

Security: the socket is a file in a folder only the site's user can open (owner-only
permissions), and each connection must prove it holds the key in ``<state_dir>/worker.key``
(HMAC challenge of :mod:`multiprocessing.connection`). Nothing listens on the network.
Payloads are JSON and raw array bytes, never pickles.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

import numpy as np

from mrprism_core.protocol import SiteReply

__all__ = [
    "COLLECT",
    "KEY_FILE",
    "SOCKET_NODE_CONFIG",
    "TRAIN_AHEAD",
    "WORKER_START_WAIT_S",
    "RoundOutcome",
    "WorkerUnavailable",
    "ask_worker",
    "outcome_from_record",
    "outcome_record",
    "read_key",
    "receive_outcome",
    "receive_request",
    "send_outcome",
    "send_request",
    "write_key",
]

#: The node-config key through which ``python -m client`` tells the ClientApp where its
#: worker listens (absent: the ClientApp does the work itself, as in simulation).
SOCKET_NODE_CONFIG = "worker-socket"
#: The shared key's file in the site's state directory (owner-only).
KEY_FILE = "worker.key"
#: Seconds a message waits for a site worker that is being started again (``python -m client``
#: restarts a dead one after 2 s; torch and the data then take a few seconds to load) before
#: the site sits the round out with an error reply.
WORKER_START_WAIT_S = 30.0
#: A request kind beside "train" and "evaluate" (SecAgg+ rounds, ``secagg-train-ahead``):
#: train on the message's weights, but answer at once (an empty outcome) and keep the result,
#: so the key exchange's reply need not wait for the training ...
TRAIN_AHEAD = "train-ahead"
#: ... and the collect stage's request, without arrays: the kept result of that training.
COLLECT = "collect"
#: The control variate's name among an outcome's arrays (no shared weight array is named so).
_CONTROL = "control"
#: Seconds between tries to reach a worker that is starting.
_CONNECT_RETRY_S = 0.2


class WorkerUnavailable(RuntimeError):
    """The site worker could not be reached, or left in the middle of a message."""


@dataclass
class RoundOutcome:
    """What one message produced at a site: the arrays that send its shared weights, by name
    (training only: the packed float32 weights, or their encoded float16 change,
    ``mrprism_core.update_codec``; with ``drift-correction=scaffold`` also the change of the
    site's control variate, packed like the weights) and the reply; or, when the site cannot
    take part, only ``error`` (the reason)."""

    shared: dict[str, np.ndarray] | None = None
    reply: SiteReply | None = None
    error: str | None = None
    control: np.ndarray | None = None


def write_key(state_dir: str | Path, name: str = KEY_FILE) -> bytes:
    """A fresh random key in ``<state_dir>/<name>`` (the worker's by default), replaced
    atomically; mode 0600, as every file ``atomic_write_bytes`` writes (its temp file comes
    from ``mkstemp``). Called by ``python -m client`` only: the torch-free ClientApp never
    imports the checkpoint module."""
    from mrprism_core.checkpoint import atomic_write_bytes

    key = secrets.token_bytes(32)
    atomic_write_bytes(Path(state_dir) / name, key)
    return key


def read_key(state_dir: str | Path) -> bytes:
    return (Path(state_dir) / KEY_FILE).read_bytes()


def _send_arrays(
    conn: Connection, header: dict[str, Any], arrays: dict[str, np.ndarray | None]
) -> None:
    """The JSON header (naming each array's dtype and shape), then each array's raw bytes."""
    present = {name: np.ascontiguousarray(a) for name, a in arrays.items() if a is not None}
    header = {
        **header,
        "arrays": {n: [a.dtype.str, list(a.shape)] for n, a in present.items()},
    }
    conn.send_bytes(json.dumps(header).encode())
    for array in present.values():
        conn.send_bytes(memoryview(array).cast("B"))


def _receive_arrays(conn: Connection) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header = json.loads(conn.recv_bytes())
    arrays = {}
    for name, (dtype, shape) in header.pop("arrays", {}).items():
        arrays[name] = np.frombuffer(conn.recv_bytes(), dtype=np.dtype(dtype)).reshape(shape)
    return header, arrays


def send_request(
    conn: Connection,
    kind: str,
    config: dict[str, Any],
    arrays: Mapping[str, np.ndarray],
    run_id: int,
) -> None:
    """``arrays``: the message's, by name (the shared weights or their change, a control
    variate)."""
    header = {"kind": kind, "config": config, "run_id": run_id}
    _send_arrays(conn, header, dict(arrays))


def receive_request(conn: Connection) -> tuple[str, dict[str, Any], dict[str, np.ndarray], int]:
    """(kind, config, the message's arrays by name, run id)."""
    header, arrays = _receive_arrays(conn)
    if not arrays and header.get("kind") != COLLECT:
        raise ValueError("a request without arrays")
    return str(header["kind"]), dict(header["config"]), arrays, int(header["run_id"])


def outcome_record(outcome: RoundOutcome) -> dict[str, Any]:
    """An outcome's error and reply as JSON-ready values (its arrays travel apart)."""
    record: dict[str, Any] = {"error": outcome.error}
    if outcome.reply is not None:
        record["metrics"] = outcome.reply.to_metrics()
        record["site"] = outcome.reply.to_site()
    return record


def outcome_from_record(
    record: dict[str, Any], arrays: dict[str, np.ndarray] | None = None
) -> RoundOutcome:
    """Read :func:`outcome_record`'s output back, with the outcome's ``arrays`` if any."""
    shared = dict(arrays or {})
    control = shared.pop(_CONTROL, None)
    reply = None
    if "metrics" in record:
        reply = SiteReply.from_records(record["metrics"], record["site"])
    return RoundOutcome(
        shared=shared or None, reply=reply, error=record.get("error"), control=control
    )


def send_outcome(conn: Connection, outcome: RoundOutcome) -> None:
    arrays = {**(outcome.shared or {}), _CONTROL: outcome.control}
    _send_arrays(conn, outcome_record(outcome), arrays)


def receive_outcome(conn: Connection) -> RoundOutcome:
    return outcome_from_record(*_receive_arrays(conn))


def _connect(socket_path: str | Path, state_dir: str | Path, start_wait_s: float) -> Connection:
    """A connection to the worker, waiting up to ``start_wait_s`` for one that is starting
    (its socket or key not there yet, or the socket of the one that just died)."""
    deadline = time.monotonic() + start_wait_s
    while True:
        try:
            return Client(str(socket_path), family="AF_UNIX", authkey=read_key(state_dir))
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(_CONNECT_RETRY_S)


def ask_worker(
    socket_path: str | Path,
    state_dir: str | Path,
    kind: str,
    config: dict[str, Any],
    arrays: Mapping[str, np.ndarray],
    run_id: int,
    start_wait_s: float | None = None,
) -> RoundOutcome:
    """Have the site worker at ``socket_path`` run one message; waits for its answer, and up
    to ``start_wait_s`` (default :data:`WORKER_START_WAIT_S`) for a worker being started again.

    Raises:
        WorkerUnavailable: no worker listens there in time, the key does not match, or the
            worker went away before answering.
    """
    try:
        wait = WORKER_START_WAIT_S if start_wait_s is None else start_wait_s
        with _connect(socket_path, state_dir, wait) as conn:
            send_request(conn, kind, config, arrays, run_id)
            return receive_outcome(conn)
    except (OSError, EOFError) as err:
        raise WorkerUnavailable(
            f"its site worker ({socket_path}) did not answer ({type(err).__name__}: {err}); "
            "`python -m client` starts it with the SuperNode and starts it again when it exits"
        ) from err
    except AuthenticationError as err:
        raise WorkerUnavailable(
            f"its site worker ({socket_path}) refused the connection ({err}); the worker and "
            f"this ClientApp must share {Path(state_dir) / KEY_FILE}"
        ) from err
