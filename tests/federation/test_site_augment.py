"""A site trains on randomly flipped and turned cases when its config says
``train.augment: true`` (off by default); the switch reaches its round's training."""

from __future__ import annotations

import torch

from client.site import SiteRuntime
from mrprism_core.data.augment import transform_case
from mrprism_core.models import split_state
from server.config import RunConfig


def _orientations(site: SiteRuntime, seed: int) -> set[tuple[bool, int]]:
    """Which flip/turn took each loaded case to the way the loader gave it."""
    cases = {case["id"]: case for case in site.dataset("train")}
    found = set()
    for batch in site.training_loader(seed):
        for case_id, image in zip(batch["id"], batch["image"]):
            found |= {
                (flip, turns)
                for flip in (False, True)
                for turns in range(4)
                if transform_case(cases[case_id], flip, turns)["image"].equal(image)
            }
    return found


def _trained_shared(state_dir: str) -> dict[str, torch.Tensor]:
    site = SiteRuntime.from_state_dir(state_dir)
    model = site.build_model(RunConfig(model_options='{"recurrences": 1}').model_spec())
    site.train(model, local_epochs=1, lr=1e-2, seed=7, server_round=1, persist_optimizer=False)
    return split_state(model)[0]


def test_site_training_augments_when_switched_on_and_not_by_default(make_site):
    cases = "data.splits.train=32"
    augmented = make_site("synthetic_a", cases, "train.augment=true", name="augmented")
    plain = make_site("synthetic_a", cases, name="plain")
    assert len(_orientations(SiteRuntime.from_state_dir(augmented), seed=3)) >= 6
    assert _orientations(SiteRuntime.from_state_dir(plain), seed=3) == {(False, 0)}

    first, again = _trained_shared(plain), _trained_shared(plain)
    flipped = _trained_shared(augmented)
    assert all(first[k].equal(again[k]) for k in first)  # the same round, bit for bit
    assert any(not first[k].equal(flipped[k]) for k in first)  # the cases it saw differ
