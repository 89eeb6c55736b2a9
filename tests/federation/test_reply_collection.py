"""The server's reply collection: a later phase's replies pulled while waiting for an earlier
phase's are kept for that later phase, never lost or handed to the wrong one."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from server.grid import PendingReplies, wait_for_replies


class _Link:
    """Answers pulls from a queue of replies that "arrive" one per pull."""

    def __init__(self, arrivals: list[Message]) -> None:
        self.arrivals = arrivals
        self.asked: list[set[str]] = []

    def pull_messages(self, message_ids):
        self.asked.append(set(message_ids))
        if not self.arrivals:
            return []
        msg = self.arrivals.pop(0)
        return [msg] if msg.metadata.reply_to_message_id in self.asked[-1] else []


def _sent(node: int) -> Message:
    msg = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    msg.metadata.__dict__["_message_id"] = f"m{node}"  # the SuperLink gives it when pushed
    return msg


def test_replies_to_the_next_phase_pulled_meanwhile_wait_in_its_box(task_identity, monkeypatch):
    monkeypatch.setattr("server.grid.REPLY_POLL_S", 0.0)
    evaluation, training = [_sent(1)], [_sent(2), _sent(3)]
    ids = lambda messages: [m.metadata.message_id for m in messages]  # noqa: E731
    eval_box, train_box = PendingReplies(ids(evaluation)), PendingReplies(ids(training))
    reply = lambda msg: Message(RecordDict(), reply_to=msg)  # noqa: E731
    # the training replies come first, the evaluation's last
    link = _Link([reply(training[0]), reply(training[1]), reply(evaluation[0])])

    got = wait_for_replies(link, eval_box, timeout=5, meanwhile=[train_box])

    assert [m.metadata.reply_to_message_id for m in got] == ids(evaluation)
    assert {m.metadata.reply_to_message_id for m in train_box.replies} == set(ids(training))
    assert not train_box.pending and not eval_box.pending
    assert link.asked[0] == set(ids(evaluation)) | set(ids(training))  # one pull for both
    # the training's own collection then has nothing left to pull
    assert wait_for_replies(link, train_box, timeout=5) == train_box.replies
    assert len(link.asked) == 3
