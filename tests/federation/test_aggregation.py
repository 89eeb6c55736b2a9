"""Flower's FedAvg over packed shared weights: identity on identical updates, and the
example-weighted mean computed by hand, tensor by tensor."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from mrprism_core.federated import PACKED_KEY, StateLayout, update_problem
from server.config import RunConfig
from server.federation import initial_arrays


def _reply(vector: torch.Tensor, examples: int, node: int) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({PACKED_KEY: vector}),
            "metrics": MetricRecord({"train-loss": 1.0, "num-examples": examples}),
        }
    )
    return Message(content, reply_to=instruction)


def test_fedavg_of_identical_updates_is_that_update(task_identity):
    state = initial_arrays(RunConfig())
    layout = StateLayout.of(state)
    vector = layout.pack(state)
    arrays, _ = FedAvg().aggregate_train(1, [_reply(vector, 5, 1), _reply(vector, 11, 2)])
    result = layout.unpack(arrays.to_torch_state_dict()[PACKED_KEY])
    for key, value in state.items():
        assert torch.allclose(result[key], value, atol=1e-7), key


def test_two_site_fedavg_is_the_example_weighted_mean(task_identity):
    torch.manual_seed(0)
    state = initial_arrays(RunConfig())
    layout = StateLayout.of(state)
    site_a = {k: v + torch.randn_like(v) for k, v in state.items()}
    site_b = {k: v - 2 * torch.rand_like(v) for k, v in state.items()}
    replies = [_reply(layout.pack(site_a), 3, 1), _reply(layout.pack(site_b), 9, 2)]
    arrays, metrics = FedAvg().aggregate_train(1, replies)
    result = layout.unpack(arrays.to_torch_state_dict()[PACKED_KEY])
    for key in state:
        by_hand = (3 * site_a[key] + 9 * site_b[key]) / 12
        assert torch.allclose(result[key], by_hand, atol=1e-5), key
    assert metrics["train-loss"] == 1.0


def test_layout_round_trip_and_update_checks():
    state = initial_arrays(RunConfig())
    layout = StateLayout.of(state)
    vector = layout.pack(state)
    assert vector.shape == (layout.size,)
    assert all(torch.equal(v, state[k]) for k, v in layout.unpack(vector).items())
    reference = {PACKED_KEY: vector.numpy()}
    assert update_problem({PACKED_KEY: vector.numpy()}, reference) is None
    broken = vector.clone()
    broken[7] = float("nan")
    assert "NaN" in update_problem({PACKED_KEY: broken.numpy()}, reference)
    assert "shape" in update_problem({PACKED_KEY: vector[:-1].numpy()}, reference)
    assert "keys differ" in update_problem({"other": vector.numpy()}, reference)
