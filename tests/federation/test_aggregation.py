"""Flower's FedAvg over packed shared weights: identity on identical updates, and the
example-weighted mean computed by hand, tensor by tensor."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from mrprism_core.federated import PACKED_KEY, StateLayout, update_problem
from server.config import RunConfig
from server.federation import RunFiles, initial_arrays
from server.strategies import build_strategy, server_optimizer_state


class _NoGrid:
    """Flower's strategies ask the grid for the connected nodes; two are enough here."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _vector(arrays: ArrayRecord) -> torch.Tensor:
    return arrays.to_torch_state_dict()[PACKED_KEY]


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


def test_a_partial_state_packs_with_zeros_where_it_has_no_entry():
    state = initial_arrays(RunConfig())
    layout = StateLayout.of(state)
    first, *rest = (name for name, _ in layout.entries)
    partial = {k: torch.ones_like(state[k]) for k in rest}  # no entry for the first tensor
    unpacked = layout.unpack(layout.pack_padded(partial))
    assert not unpacked[first].any()
    assert all(torch.equal(unpacked[k], partial[k]) for k in rest)
    with pytest.raises(ValueError, match="does not fit the layout"):
        layout.pack_padded({first: torch.zeros(3, 3, 3, 3, 3)})
    with pytest.raises(ValueError, match="does not fit the layout"):
        layout.pack_padded({"not.in.the.layout": torch.zeros(1)})


def test_fedavgm_carries_the_previous_rounds_update_forward(task_identity):
    """FedAvgM (our ``fedavgm``): the second round moves by the new mean update plus
    ``server-momentum`` times the first one, so a steady direction is followed faster."""
    torch.manual_seed(0)
    state = initial_arrays(RunConfig())
    layout = StateLayout.of(state)
    start = layout.pack(state)
    step = 1e-3 * torch.randn_like(start)
    strategy = build_strategy(RunConfig(strategy="fedavgm", server_momentum=0.5))
    strategy.current_arrays = ArrayRecord({PACKED_KEY: start})  # what start() would set
    first, _ = strategy.aggregate_train(1, [_reply(start + step, 4, 1), _reply(start + step, 4, 2)])
    after_one = first.to_torch_state_dict()[PACKED_KEY]
    assert torch.allclose(after_one, start + step, atol=1e-6)  # no history yet: plain FedAvg
    second, _ = strategy.aggregate_train(
        2, [_reply(after_one + step, 4, 1), _reply(after_one + step, 4, 2)]
    )
    after_two = second.to_torch_state_dict()[PACKED_KEY]
    assert torch.allclose(after_two, after_one + step + 0.5 * step, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimizer_moments_survive_a_restart_through_the_checkpoint(
    tmp_path, name, task_identity
):
    """The run checkpoint carries FedAvgM's momentum / FedAdam's moments: a restarted server
    aggregates the next round exactly as the uninterrupted one does."""
    torch.manual_seed(0)
    cfg = RunConfig(strategy=name, out_dir=str(tmp_path))
    files = RunFiles(tmp_path)
    layout, _, arrays, _ = files.start(cfg)
    start = _vector(arrays)
    steps = [1e-3 * torch.randn_like(start) for _ in range(2)]

    def one_round(strategy, current: ArrayRecord, step: torch.Tensor, server_round: int):
        strategy.configure_train(server_round, current, ConfigRecord(), _NoGrid())
        replies = [_reply(_vector(current) + step, 4, n) for n in (1, 2)]
        return strategy.aggregate_train(server_round, replies)[0]

    running = build_strategy(cfg)
    after_one = one_round(running, arrays, steps[0], 1)
    files.save_round(cfg, layout, after_one, 1, 0, [], server_optimizer_state(running))
    assert server_optimizer_state(running)  # there is something to keep
    expected = _vector(one_round(running, after_one, steps[1], 2))

    restarted = build_strategy(cfg)
    _, done, resumed, _ = files.start(cfg, restarted)
    assert done == 1
    got = _vector(one_round(restarted, resumed, steps[1], 2))
    # FedAdam computes in float64; the checkpoint keeps the model's float32 weights
    assert torch.allclose(got.float(), expected.float(), atol=1e-6)
    fresh = build_strategy(cfg)  # without the moments the same round lands elsewhere
    lost = _vector(one_round(fresh, resumed, steps[1], 2))
    assert (lost.float() - expected.float()).abs().max() > 1e-4
