"""Sites with different raters pooled into shared rater slots: empty slots must not count."""

from __future__ import annotations

import pytest
import torch

from mrprism_core.data import RaterSlots, RaterSubset, make_dataset
from mrprism_core.data.factory import build_dataset
from mrprism_core.fusion import Reliability, fuse, majority_vote, reliability_from_confidence
from mrprism_core.losses import random_permutations, shuffle_loss
from mrprism_core.metrics import MetricAccumulator, generalized_energy_distance, soft_dice


def _reliability(probs: torch.Tensor) -> Reliability:
    """Reliabilities that differ per rater and pixel (informative: in [0.5, 1])."""
    return reliability_from_confidence(probs)


def _batch(raters: int = 3, slots: int = 5, offset: int = 1):
    torch.manual_seed(0)
    labels = (torch.rand(2, raters, 1, 6, 6) > 0.5).float()
    probs = torch.rand(2, raters, 1, 6, 6)
    padded = torch.zeros(2, slots, 1, 6, 6)
    padded_probs = torch.rand(2, slots, 1, 6, 6)  # junk in the empty slots
    padded[:, offset : offset + raters] = labels
    padded_probs[:, offset : offset + raters] = probs
    valid = torch.zeros(2, slots)
    valid[:, offset : offset + raters] = 1
    return labels, probs, padded, padded_probs, valid


def test_fusion_and_majority_vote_ignore_empty_slots():
    labels, probs, padded, padded_probs, valid = _batch()
    assert torch.allclose(
        fuse(_reliability(padded_probs), padded, valid=valid),
        fuse(_reliability(probs), labels),
        atol=1e-6,
    )
    assert torch.equal(majority_vote(padded, valid), majority_vote(labels))


def test_metrics_ignore_empty_slots():
    labels, probs, padded, padded_probs, valid = _batch()
    prob = torch.rand(2, 1, 6, 6)
    assert soft_dice(prob, padded, valid=valid) == pytest.approx(soft_dice(prob, labels))
    assert torch.allclose(
        generalized_energy_distance(padded_probs, padded, valid),
        generalized_energy_distance(probs, labels),
    )
    acc = MetricAccumulator()
    acc.update(prob, padded, rater_probs=padded_probs, rater_valid=valid)
    per_rater = acc.compute()["per_rater_dice"]
    assert per_rater[0] is None and per_rater[4] is None
    assert all(isinstance(x, float) for x in per_rater[1:4])


def test_shuffle_loss_ignores_labels_of_empty_slots():
    labels, probs, padded, padded_probs, valid = _batch()
    perms = random_permutations(5, 3, torch.Generator().manual_seed(0))
    reliability = _reliability(padded_probs)
    base = shuffle_loss(reliability, padded_probs, padded, perms, valid=valid)
    changed = padded.clone()
    changed[:, 0] = 1 - changed[:, 0]  # an empty slot's "label" changes: no effect
    assert shuffle_loss(
        reliability, padded_probs, changed, perms, valid=valid
    ).item() == pytest.approx(base.item())
    changed[:, 2] = 1 - changed[:, 2]  # a real rater's label changes: the loss moves
    assert shuffle_loss(
        reliability, padded_probs, changed, perms, valid=valid
    ).item() != pytest.approx(base.item())


def test_views_recut_a_site():
    dataset = make_dataset(3, 4, 32, seed=0)
    subset = RaterSubset(dataset, [0, 2])
    assert torch.equal(subset[1]["raters"], dataset[1]["raters"][[0, 2]])
    slots = RaterSlots(subset, total=6, offset=3)
    sample = slots[1]
    assert sample["raters"].shape[0] == 6
    assert sample["rater_valid"].tolist() == [0, 0, 0, 1, 1, 0]
    assert torch.equal(sample["raters"][3:5], subset[1]["raters"])
    assert sample["raters"][:3].sum() == 0
    with pytest.raises(ValueError, match="do not fit"):
        RaterSlots(subset, total=4, offset=3)[0]


def test_factory_applies_case_and_rater_selection():
    cfg = {
        "kind": "synthetic", "num_raters": 4, "num_classes": 2, "image_size": 32, "seed": 1,
        "splits": {"train": 10, "test": 4},
        "cases": {"train": [7, 2]}, "rater_subset": [1, 3],
        "rater_slots": {"total": 5, "offset": 2},
    }  # fmt: skip
    train = build_dataset(cfg, "train")
    full = build_dataset(
        {k: v for k, v in cfg.items() if k not in ("cases", "rater_subset", "rater_slots")}, "train"
    )
    assert len(train) == 2
    assert torch.equal(train[0]["image"], full[7]["image"])
    assert torch.equal(train[0]["raters"][2:4], full[7]["raters"][[1, 3]])
    assert len(build_dataset(cfg, "test")) == 4  # no case selection for this split
