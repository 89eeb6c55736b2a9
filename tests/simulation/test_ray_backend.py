"""Flower's Ray backend is shut down only once no message is in flight
(``simulation/ray_backend.py``): after Ctrl-C, a worker thread still waiting on Ray when Ray
was shut down ended the process with exit code 1 instead of 130."""

from __future__ import annotations

import threading
import time

import pytest

from simulation.ray_backend import InFlightGate, _gate, drain_before_shutdown
from tests.federation.conftest import _task_identity


def test_a_closing_gate_waits_for_the_message_in_flight_and_admits_no_more():
    gate = InFlightGate()
    assert gate.enter()  # a site's message is being processed
    returned = threading.Event()
    closed: list[tuple[bool, bool]] = []

    def shut_down() -> None:
        drained = gate.close(timeout=30)
        closed.append((drained, returned.is_set()))

    closer = threading.Thread(target=shut_down)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive()  # still waiting: the message has not returned
    assert not gate.enter()  # meanwhile a new message is refused
    returned.set()
    gate.leave()
    closer.join(timeout=10)
    assert closed == [(True, True)]  # it went on only after the message had returned


def test_a_message_that_never_returns_holds_the_shut_down_only_until_the_timeout():
    gate = InFlightGate()
    assert gate.enter()
    start = time.monotonic()
    assert gate.close(timeout=0.2) is False
    assert time.monotonic() - start < 5


def test_flowers_ray_backend_is_wrapped_once_and_refuses_messages_while_shutting_down():
    from flwr.app import Context, Message, RecordDict
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    drain_before_shutdown()
    wrapped = RayBackend.process_message
    drain_before_shutdown()  # a second simulation in the same process: not wrapped twice
    assert RayBackend.process_message is wrapped
    backend = object.__new__(RayBackend)  # never built: no Ray, no actors
    backend.pool = None
    with _task_identity():
        message = Message(RecordDict(), dst_node_id=1, message_type="train")
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), {})
    # open: Flower's own code runs (and, unbuilt, refuses), and the message leaves the gate
    with pytest.raises(ValueError, match="actor pool is empty"):
        backend.process_message(message, context)
    assert _gate(backend).close(timeout=0)  # nothing left in flight
    # closed: answered with an error reply, Ray untouched
    reply, returned = backend.process_message(message, context)
    assert reply.has_error() and reply.error.reason == "the simulation is shutting down"
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert returned is context
