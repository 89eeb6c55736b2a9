"""Half-precision downloads (``download-precision``): a training message brings the float16
change of the weights since those a site's worker holds; server and site then hold the very
same weights, and a site that does not hold them is told so and gets float32 next time."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client.held_weights import HeldWeights, received_weights
from client.rounds import run_message
from client.site import SiteRuntime
from mrprism_core.protocol import (
    BASE_VERSION_KEY,
    HOLDS_WEIGHTS_KEY,
    PACKED_KEY,
    WEIGHTS_VERSION_KEY,
)
from mrprism_core.update_codec import UPDATE_KEY, decode_update
from server.downloads import WeightDownloads, check_download_precision

from .conftest import train_message

NODES = (1, 2)


def _strategy_messages(weights: np.ndarray, server_round: int) -> list[Message]:
    """What a Flower strategy gives: one message per node, all with the same records."""
    arrays = ArrayRecord({PACKED_KEY: Array(weights)})
    config = ConfigRecord({"server-round": server_round})
    return [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
        )
        for node in NODES
    ]


def _reply(msg: Message, holds: str | None) -> Message:
    site = {"name": f"site{msg.metadata.dst_node_id}"}
    if holds:
        site[HOLDS_WEIGHTS_KEY] = holds
    return Message(RecordDict({"site": ConfigRecord(site)}), reply_to=msg)


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in msg.content["arrays"].items()}


def _next_global(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A round's aggregate: the weights moved by a small, uneven change."""
    return weights + (rng.normal(0, 1e-3, weights.size) * rng.uniform(0, 1, weights.size)).astype(
        np.float32
    )


def test_only_a_site_that_holds_the_last_weights_gets_their_change_and_rebuilds_them_exactly(
    task_identity,
):
    rng = np.random.default_rng(0)
    downloads = WeightDownloads(enabled=True)
    global_1 = rng.normal(0, 1, 5000).astype(np.float32)

    # round 1: no site holds anything yet, so the weights go as they are (the strategy's own
    # serialised record), each message naming their id
    sent_1 = downloads.advance(1, global_1)
    assert np.array_equal(sent_1, global_1)
    strategy_1 = _strategy_messages(global_1, 1)
    first = downloads.messages(strategy_1)
    assert [m.content["arrays"][PACKED_KEY] for m in first] == [
        m.content["arrays"][PACKED_KEY] for m in strategy_1
    ]
    version_1 = first[0].content["config"][WEIGHTS_VERSION_KEY]
    assert all(BASE_VERSION_KEY not in m.content["config"] for m in first)

    # node 1's worker keeps what came; node 2 keeps nothing (no worker)
    worker = HeldWeights()
    weights, holds = received_weights(
        "site1", first[0].content["config"], _arrays(first[0]), worker
    )
    assert holds == version_1 and np.array_equal(weights, global_1)
    downloads.learn(NODES, [_reply(first[0], holds), _reply(first[1], None)])

    # round 2: node 1 gets the float16 change, node 2 the float32 weights: the same weights
    global_2 = _next_global(global_1, rng)
    sent_2 = downloads.advance(2, global_2)
    to_holder, to_other = downloads.messages(_strategy_messages(global_2, 2))
    assert set(_arrays(to_holder)) == {UPDATE_KEY, "shared-update-exponent"}
    assert to_holder.content["config"][BASE_VERSION_KEY] == version_1
    assert _arrays(to_holder)[UPDATE_KEY].nbytes * 2 == global_2.nbytes
    assert list(_arrays(to_other)) == [PACKED_KEY]
    rebuilt, holds_2 = received_weights(
        "site1", to_holder.content["config"], _arrays(to_holder), worker
    )
    assert np.array_equal(rebuilt, sent_2)  # bit for bit what the server decodes against
    assert np.array_equal(_arrays(to_other)[PACKED_KEY], sent_2)
    assert holds_2 == to_holder.content["config"][WEIGHTS_VERSION_KEY] != version_1
    # the sent weights are the global model to within float16's precision of the change
    change = np.abs(global_2 - global_1)
    assert not np.array_equal(sent_2, global_2)
    assert np.all(np.abs(sent_2 - global_2) <= change.max() * 2.0**-11 + 1e-7)

    # a site that did not answer round 2 gets the float32 weights in round 3
    downloads.learn(NODES, [_reply(to_holder, holds_2)])
    downloads.advance(3, _next_global(global_2, rng))
    to_holder, to_silent = downloads.messages(_strategy_messages(global_2, 3))
    assert BASE_VERSION_KEY in to_holder.content["config"]
    assert BASE_VERSION_KEY not in to_silent.content["config"]


def test_the_rounding_of_the_changes_does_not_add_up_over_rounds():
    rng = np.random.default_rng(1)
    downloads = WeightDownloads(enabled=True)
    weights = rng.normal(0, 1, 20_000).astype(np.float32)
    downloads.advance(1, weights)
    errors = []
    for server_round in range(2, 40):
        downloads._holders = {1: downloads.version}  # a site that always holds the last ones
        previous = downloads.sent
        weights = _next_global(weights, rng)
        sent = downloads.advance(server_round, weights)
        # each round's error is within float16's precision of that round's change alone,
        # which also carries the previous round's rounding
        bound = np.abs(weights - previous).max() * 2.0**-11 + 1e-7
        errors.append(float(np.abs(sent - weights).max()))
        assert errors[-1] <= bound
    assert max(errors[-10:]) <= 2 * max(errors[:10])  # no drift


def test_the_change_trains_the_site_as_the_weights_would(make_site, task_identity, tmp_path):
    # a site worker that holds round 1's weights and gets round 2's as their change sends the
    # very same update as a copy of the site sent the float32 weights
    state_dir = make_site("synthetic_a")
    site = SiteRuntime.from_state_dir(state_dir)
    message, _ = train_message(server_round=1)
    global_1 = message.content["arrays"][PACKED_KEY].numpy()
    downloads = WeightDownloads(enabled=True)
    downloads.advance(1, global_1)
    [first] = downloads.messages([message])
    held = HeldWeights()
    reply_1 = run_message(
        "train", dict(first.content["config"]), _arrays(first), run_id=1, site=site, held=held
    )
    assert reply_1.error is None, reply_1.error
    holds = reply_1.reply.details[HOLDS_WEIGHTS_KEY]
    copy = tmp_path / "copy"
    shutil.copytree(state_dir, copy)

    downloads.learn([1], [_reply(first, holds)])
    second, _ = train_message(server_round=2)
    global_2 = decode_update(reply_1.shared, global_1)  # the site's own round-1 weights
    downloads.advance(2, global_2)
    [as_change] = downloads.messages([second])
    assert as_change.content["config"][BASE_VERSION_KEY] == holds
    by_change = run_message(
        "train",
        dict(as_change.content["config"]),
        _arrays(as_change),
        run_id=1,
        site=site,
        held=held,
    )
    as_weights = {PACKED_KEY: downloads.sent}
    by_weights = run_message(
        "train", dict(as_change.content["config"]), as_weights, run_id=1, state_dir=copy
    )
    assert by_change.error is None and by_weights.error is None
    assert by_change.shared.keys() == by_weights.shared.keys()
    for name in by_change.shared:
        assert np.array_equal(by_change.shared[name], by_weights.shared[name]), name
    assert by_change.reply.metrics == by_weights.reply.metrics
    # only the process that keeps weights says it holds them (the copy ran without a worker)
    assert by_change.reply.details[HOLDS_WEIGHTS_KEY] == downloads.version
    assert HOLDS_WEIGHTS_KEY not in by_weights.reply.details


def test_a_change_from_weights_the_site_does_not_hold_is_an_error_reply(make_site, task_identity):
    # a worker that started since its last training message holds nothing
    downloads = WeightDownloads(enabled=True)
    message, _ = train_message(server_round=1)
    weights = message.content["arrays"][PACKED_KEY].numpy()
    downloads.advance(1, weights)
    [first] = downloads.messages([message])
    downloads.learn([1], [_reply(first, first.content["config"][WEIGHTS_VERSION_KEY])])
    downloads.advance(2, weights + np.float32(1e-3))
    [change] = downloads.messages([train_message(server_round=2)[0]])
    site = SiteRuntime.from_state_dir(make_site("synthetic_a"))
    config = dict(change.content["config"])
    outcome = run_message("train", config, _arrays(change), run_id=1, site=site, held=HeldWeights())
    assert outcome.error is not None and outcome.shared is None
    assert "does not hold (it holds none" in outcome.error
    assert first.content["config"][WEIGHTS_VERSION_KEY] in outcome.error
    # nor can a process without a worker use a change
    with pytest.raises(ValueError, match="does not hold"):
        received_weights("site1", config, _arrays(change))


def test_off_the_strategys_messages_go_unchanged(task_identity):
    downloads = WeightDownloads(enabled=False)
    weights = np.ones(10, np.float32)
    downloads.advance(1, weights)
    messages = _strategy_messages(weights, 1)
    assert downloads.messages(messages) == messages
    downloads.learn(NODES, [_reply(messages[0], "anything")])
    assert np.array_equal(downloads.advance(2, weights + 1), weights + 1)  # the global model
    assert (
        downloads.messages(_strategy_messages(weights, 2))[0]
        .content["config"]
        .get(WEIGHTS_VERSION_KEY)
        is None
    )
    with pytest.raises(ValueError, match="download-precision=int8: unknown download precision"):
        check_download_precision("int8", "download-precision")
