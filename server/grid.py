"""Collecting replies without Flower's 3 s steps.

Flower 1.41's deployment grid (``HttpGrid.send_and_receive``) sleeps 3 s between its looks for
replies, so every phase of a round (and each of SecAgg+'s four stages) could end up to 3 s after
the last reply arrived. :func:`collect_replies` looks every :data:`REPLY_POLL_S` seconds;
:class:`PromptGrid` gives Flower's own workflows (SecAgg+) the same through the ``Grid`` API.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

__all__ = [
    "REPLY_POLL_S",
    "PendingReplies",
    "PromptGrid",
    "collect_replies",
    "readdressed",
    "wait_for_replies",
]

#: Seconds between the server's looks for replies (a local call to the SuperLink).
REPLY_POLL_S = 0.2


def readdressed(msg: Message, content: Mapping[str, Any]) -> Message:
    """A new message of ``msg``'s type to its node with ``content`` (its records by name): a
    strategy gives all its messages one set of records, so one node's must be a copy."""
    return Message(
        content=RecordDict(dict(content)),
        message_type=msg.metadata.message_type,
        dst_node_id=msg.metadata.dst_node_id,
        group_id=msg.metadata.group_id,
    )


class PendingReplies:
    """The replies to a set of pushed messages, as they are pulled."""

    def __init__(self, message_ids: Iterable[str]) -> None:
        self.pending = {message_id for message_id in message_ids if message_id}
        self.replies: list[Message] = []

    def take(self, arrived: Iterable[Message]) -> None:
        """Keep those of ``arrived`` that answer one of these messages."""
        for msg in arrived:
            if msg.metadata.reply_to_message_id in self.pending:
                self.pending.discard(msg.metadata.reply_to_message_id)
                self.replies.append(msg)


def wait_for_replies(
    grid: Grid,
    wanted: PendingReplies,
    timeout: float | None,
    meanwhile: Iterable[PendingReplies] = (),
) -> list[Message]:
    """Pull until every reply ``wanted`` has arrived, or ``timeout`` seconds (None: no limit);
    returns them. Replies to the messages ``meanwhile`` that arrive in that time are pulled
    too and kept there (a later phase's replies, pulled while waiting for this one's)."""
    others = [box for box in meanwhile if box is not wanted]
    deadline = None if timeout is None else time.monotonic() + timeout
    while wanted.pending:
        asked = wanted.pending.union(*(box.pending for box in others))
        arrived = list(grid.pull_messages(asked))
        for box in (wanted, *others):
            box.take(arrived)
        if not wanted.pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(REPLY_POLL_S)
    return wanted.replies


def collect_replies(grid: Grid, message_ids: Iterable[str], timeout: float | None) -> list[Message]:
    """The replies to ``message_ids`` that arrive within ``timeout`` seconds (None: all)."""
    return wait_for_replies(grid, PendingReplies(message_ids), timeout)


class PromptGrid(Grid):
    """``grid`` with :func:`collect_replies` as its ``send_and_receive``; all else passes on."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return collect_replies(self, self.push_messages(list(messages)), timeout)
