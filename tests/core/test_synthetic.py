from __future__ import annotations

import torch

from mrprism_core.data import make_dataset
from mrprism_core.data.factory import build_dataset, dataset_info
from mrprism_core.metrics import dice_per_image


def test_cases_are_reproducible_and_independent_of_read_order():
    a = make_dataset(5, 4, 32, seed=3)
    b = make_dataset(5, 4, 32, seed=3)
    assert torch.equal(a[4]["image"], b[4]["image"])
    assert torch.equal(a[2]["raters"], b[2]["raters"])
    assert not torch.equal(a[0]["image"], make_dataset(5, 4, 32, seed=4)[0]["image"])


def test_sample_layout_and_nested_classes():
    sample = make_dataset(2, 5, 64, seed=0)[0]
    assert sample["image"].shape == (3, 64, 64)
    assert sample["raters"].shape == (5, 2, 64, 64)
    assert sample["truth"].shape == (2, 64, 64)
    assert set(sample["raters"].unique().tolist()) <= {0.0, 1.0}
    cup, disc = sample["raters"][:, 1], sample["raters"][:, 0]
    assert bool((cup <= disc).all())  # the cup lies inside the disc for every rater


def test_raters_behave_differently_and_the_expert_is_closest_to_truth():
    dataset = make_dataset(12, 5, 64, seed=1)
    scores = torch.zeros(5)
    for i in range(len(dataset)):
        sample = dataset[i]
        truth = sample["truth"].unsqueeze(0).expand(5, -1, -1, -1)
        scores += dice_per_image(sample["raters"], truth).mean(dim=1)
    scores /= len(dataset)
    assert int(scores.argmax()) == 0
    assert float(scores.max() - scores.min()) > 0.05
    areas = dataset[0]["raters"][:, 0].sum(dim=(1, 2))
    assert areas[1] > areas[0] > areas[2]  # rater 1 dilates, rater 2 erodes


def test_factory_splits_are_disjoint_and_info_is_read_from_data():
    cfg = {
        "kind": "synthetic",
        "num_raters": 3,
        "num_classes": 1,
        "image_size": 32,
        "seed": 0,
        "splits": {"train": 4, "val": 4, "test": 4},
        "style": {"channels": 1},
    }
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert not any(
        torch.equal(train[i]["image"], val[j]["image"]) for i in range(4) for j in range(4)
    )
    info = dataset_info(train)
    assert (info.in_channels, info.num_classes, info.num_raters, info.image_size) == (1, 1, 3, 32)
