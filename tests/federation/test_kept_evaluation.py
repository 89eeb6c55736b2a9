"""Pipelined rounds' evaluations done by the next round's training message
(``evaluate-in-training``): the messages the server sends, and the kept result against the
evaluation message that carries the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.app import create_client_app
from client.kept_evaluation import KEPT_EVALUATION_FILE, kept_evaluation
from mrprism_core.protocol import EVALUATED_BEFORE_KEY, KEEP_EVALUATION_KEY, KEPT_EVALUATION_KEY
from server.federation import evaluation_in_training

from .conftest import node_context, train_message


class _ThreeNodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _evaluation_of(training: Message, evaluated_round: int) -> Message:
    """The evaluation message of ``evaluated_round`` that carries ``training``'s weights."""
    config = ConfigRecord({**training.content["config"], "server-round": evaluated_round})
    content = RecordDict({"arrays": training.content["arrays"], "config": config})
    return Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)


def test_only_sites_that_get_both_messages_evaluate_in_training_and_lose_the_weights(
    task_identity,
):
    message, _ = train_message(server_round=2)
    arrays, config = message.content["arrays"], message.content["config"]
    strategy = FedAvg()
    training = list(strategy.configure_train(2, arrays, ConfigRecord(dict(config)), _ThreeNodes()))
    training = [msg for msg in training if msg.metadata.dst_node_id != 3]  # not sampled
    evaluation = list(
        strategy.configure_evaluate(1, arrays, ConfigRecord(dict(config)), _ThreeNodes())
    )

    new_training, new_evaluation = evaluation_in_training(training, evaluation)

    assert sorted(m.metadata.dst_node_id for m in new_training) == [1, 2]
    for msg in new_training:
        assert msg.metadata.message_type == MessageType.TRAIN
        assert msg.content["config"][KEEP_EVALUATION_KEY] is True
        assert msg.content["config"]["server-round"] == 2
        assert msg.content["arrays"].object_id == arrays.object_id  # the same weights
    by_node = {m.metadata.dst_node_id: m for m in new_evaluation}
    for node in (1, 2):  # trained next round: asks for the kept result, carries no weights
        content = by_node[node].content
        assert by_node[node].metadata.message_type == MessageType.EVALUATE
        assert list(content.array_records) == []
        assert content["config"][KEPT_EVALUATION_KEY] is True
        assert content["config"]["server-round"] == 1
    # node 3 does not train next round: its evaluation carries the weights, as before
    assert by_node[3].content["arrays"].object_id == arrays.object_id
    assert KEPT_EVALUATION_KEY not in by_node[3].content["config"]
    # the strategy gave all its messages one record: it is left as it was
    assert KEEP_EVALUATION_KEY not in training[0].content["config"]
    assert KEPT_EVALUATION_KEY not in evaluation[0].content["config"]


def test_the_kept_evaluation_is_the_one_the_weights_would_have_got_before_training(
    make_site, task_identity, tmp_path
):
    app = create_client_app()
    state_dir = make_site("synthetic_b")
    context = node_context(state_dir)
    first, _ = train_message(server_round=1)
    assert not app(first, context).has_error()  # the site now holds round 1's rater heads
    second, _ = train_message(server_round=2)
    evaluation = _evaluation_of(second, 1)

    # round 1's evaluation message with the weights, at a copy of the site
    copy = tmp_path / "copy"
    shutil.copytree(state_dir, copy)
    own = app(evaluation, node_context(str(copy)))
    assert not own.has_error(), own.error

    [training], [by_reference] = evaluation_in_training([second], [evaluation])
    trained = app(training, context)
    assert not trained.has_error(), trained.error
    kept = app(by_reference, context)
    assert not kept.has_error(), kept.error

    assert dict(kept.content["metrics"]) == dict(own.content["metrics"])
    site = kept.content["site"]
    assert site["heads-from-round"] == 1 and site[EVALUATED_BEFORE_KEY] == 2
    # round 2's training changed the heads: evaluated after it, the numbers differ
    after = app(_evaluation_of(second, 2), context)
    assert dict(after.content["metrics"]) != dict(own.content["metrics"])
    assert after.content["site"]["heads-from-round"] == 2

    # the evaluation shared the training's model and left it as it was: the copy, trained
    # from the same state without evaluating first, sends the very same update
    unflagged = app(second, node_context(str(copy)))
    assert not unflagged.has_error(), unflagged.error
    assert dict(trained.content["metrics"]) == dict(unflagged.content["metrics"])
    ours, theirs = trained.content["arrays"], unflagged.content["arrays"]
    assert list(ours) == list(theirs)
    for name in ours:
        assert np.array_equal(ours[name].numpy(), theirs[name].numpy()), name


def test_a_kept_evaluation_of_another_round_or_run_or_none_is_an_error_reply(
    make_site, task_identity
):
    app = create_client_app()
    state_dir = make_site("synthetic_a")
    context = node_context(state_dir)  # run 1
    second, _ = train_message(server_round=2)
    [training], [by_reference] = evaluation_in_training([second], [_evaluation_of(second, 1)])

    missing = app(by_reference, context)  # round 2's training never ran here
    assert missing.has_error()
    assert "no evaluation of round 1 kept" in missing.error.reason
    assert "site synthetic_a cannot take part" in missing.error.reason

    assert not app(training, context).has_error()
    assert not kept_evaluation(state_dir, 1, 1).error
    assert "it holds round 1" in str(kept_evaluation(state_dir, 1, 2).error)
    assert "no evaluation of round 1" in str(kept_evaluation(state_dir, 7, 1).error)
    (Path(state_dir) / KEPT_EVALUATION_FILE).write_text("{not json")
    assert "cannot be read" in str(kept_evaluation(state_dir, 1, 1).error)
