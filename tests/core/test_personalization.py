"""Personalization phases freeze exactly what they say."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from mrprism_core.data.synthetic import make_dataset
from mrprism_core.models import build_model, split_state
from mrprism_core.personalization import head_names, phases, trainable


@pytest.fixture(scope="module")
def batch():
    data = make_dataset(2, 3, 32, seed=0)
    return default_collate([data[0], data[1]])


def _model():
    torch.manual_seed(0)
    return build_model(
        "mrprism", in_channels=3, num_classes=2, num_raters=3, image_size=32, preset="tiny"
    )


@pytest.mark.parametrize("part", ["heads", "body"])
def test_a_phase_leaves_the_other_part_bit_identical(part, batch):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = head_names(model)
    assert heads and all(
        name.startswith(("divp.heads.", "confidence.rater_identity")) for name in heads
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with trainable(model, part):
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            model.backward(batch)
            optimizer.step()
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    params = {name for name, _ in model.named_parameters()}
    trained = heads if part == "heads" else params - heads
    assert moved and moved <= trained  # only the phase's part moved...
    assert all(p.requires_grad for p in model.parameters())  # ...and everything is restored
    assert len(moved) > len(trained) // 2


def test_phase_plans():
    assert phases("fedper", 2) == [("all", 2)]
    assert phases("fedrep", 2) == [("heads", 1), ("body", 2)]
    assert phases("fedbabu", 3) == [("body", 3)]
    assert phases("ditto", 1) == [("all", 1)]
    with pytest.raises(ValueError, match="unknown personalization 'fedavg'"):
        phases("fedavg", 1)


def test_heads_are_exactly_the_site_local_parameters():
    model = _model()
    _, local = split_state(model)
    assert head_names(model) == {name for name, _ in model.named_parameters() if name in local}
