"""Flower's Ray backend, shut down only once no message is in flight.

After Ctrl-C, Flower's simulation runtime shuts Ray down (``RayBackend.terminate``) while its
worker threads may still wait on a ClientApp's result. A thread that then calls into Ray's
stopped core worker ends the whole process at once (exit code 1, "The core worker has already
been shutdown"), not with Ctrl-C's 130: seen once in CI. :func:`drain_before_shutdown` makes
the backend's shut-down first wait (at most :data:`IN_FLIGHT_WAIT_S`) for the messages in
flight to return, and answers a message that comes after it has begun with an error reply.
A run that ends normally has none in flight and does not wait.
"""

from __future__ import annotations

import threading
from typing import Any

#: Seconds a shut-down waits for the messages in flight: below the simulation's grace time
#: after Ctrl-C (``simulation.run.INTERRUPT_GRACE_S``), so that Ray is still shut down cleanly.
IN_FLIGHT_WAIT_S = 20.0


class InFlightGate:
    """Counts the messages in flight; once closed, admits no more."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._in_flight = 0
        self._closed = False

    def enter(self) -> bool:
        """Admit a message (True), or refuse it once the gate is closed (False)."""
        with self._changed:
            if self._closed:
                return False
            self._in_flight += 1
            return True

    def leave(self) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def close(self, timeout: float) -> bool:
        """Admit no more messages and wait up to ``timeout`` seconds for those in flight;
        whether they all returned."""
        with self._changed:
            self._closed = True
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout=timeout)


def _gate(backend: Any) -> InFlightGate:
    """The backend's own gate (each simulation builds a new backend), made on first use."""
    gate = backend.__dict__.get("_in_flight_gate")
    if gate is None:  # setdefault: two threads' first messages still share one gate
        gate = backend.__dict__.setdefault("_in_flight_gate", InFlightGate())
    return gate


def drain_before_shutdown() -> None:
    """Wrap Flower's ``RayBackend.process_message`` and ``terminate`` with a gate (once per
    process)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    if getattr(RayBackend, "_drains_before_shutdown", False):
        return
    process_message, terminate = RayBackend.process_message, RayBackend.terminate

    def gated_process_message(self: Any, message: Message, context: Any) -> tuple[Message, Any]:
        gate = _gate(self)
        if not gate.enter():  # shutting down: answer without touching Ray
            error = Error(code=ErrorCode.UNKNOWN, reason="the simulation is shutting down")
            return Message(error, reply_to=message), context
        try:
            return process_message(self, message, context)
        finally:
            gate.leave()

    def terminate_when_drained(self: Any) -> None:
        _gate(self).close(IN_FLIGHT_WAIT_S)
        terminate(self)

    RayBackend.process_message = gated_process_message  # type: ignore[method-assign]
    RayBackend.terminate = terminate_when_drained  # type: ignore[method-assign]
    RayBackend._drains_before_shutdown = True  # type: ignore[attr-defined]
