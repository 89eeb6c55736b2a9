"""Training augmentation: a case's image and every mask on it move together, each of the eight
flips/turns of a square is drawn, a rectangle keeps its shape, the seed decides the draws, and
Opacus' Poisson-sampling loader (DP-SGD) keeps the augmentation."""

from __future__ import annotations

import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data import Dataset

from mrprism_core.data.augment import RandomFlipsTurns, transform_case
from mrprism_core.train import make_loader


def _case(height: int = 4, width: int = 4, index: int = 0) -> dict:
    """A case whose pixels are all different; each rater marks the pixels above its own
    brightness, and the true mask those above 0.5, so any transform that moved one grid and
    not another would break ``raters == image > level``."""
    image = torch.arange(height * width, dtype=torch.float32).view(1, height, width)
    image = image / (height * width)
    levels = torch.tensor([0.25, 0.5, 0.75]).view(3, 1, 1, 1)
    return {
        "image": image,
        "raters": (image.unsqueeze(0) > levels).float(),  # (M=3, K=1, H, W)
        "truth": (image > 0.5).float(),
        "id": f"case{index}",
        "spacing": torch.tensor([1.0, 2.0, 3.0]),
    }


class _Cases(Dataset):
    def __init__(self, count: int, height: int = 4, width: int = 4) -> None:
        self.cases = [_case(height, width, i) for i in range(count)]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        return self.cases[index]


def _masks_follow_the_image(batch: dict) -> bool:
    image = batch["image"]  # (B, 1, H, W)
    levels = torch.tensor([0.25, 0.5, 0.75]).view(1, 3, 1, 1, 1)
    return bool(
        torch.equal(batch["raters"], (image.unsqueeze(1) > levels).float())
        and torch.equal(batch["truth"], (image > 0.5).float())
    )


def test_a_flip_and_a_quarter_turn_move_known_pixels_and_every_mask_alike():
    case = _case(2, 3)  # image rows [0 1 2], [3 4 5] (/6)
    flipped = transform_case(case, flip=True, quarter_turns=0)
    assert flipped["image"][0].mul(6).tolist() == [[2, 1, 0], [5, 4, 3]]
    turned = transform_case(case, flip=False, quarter_turns=1)  # counter-clockwise
    assert turned["image"][0].mul(6).tolist() == [[2, 5], [1, 4], [0, 3]]
    both = transform_case(case, flip=True, quarter_turns=1)
    assert both["image"][0].mul(6).tolist() == [[0, 3], [1, 4], [2, 5]]  # the transpose
    for moved in (flipped, turned, both):
        assert _masks_follow_the_image({k: v.unsqueeze(0) for k, v in moved.items() if k != "id"})
        # per-case metadata is not a pixel grid and stays as it was
        assert moved["id"] == "case0" and moved["spacing"].tolist() == [1.0, 2.0, 3.0]
    assert transform_case(case, flip=False, quarter_turns=4)["image"].equal(case["image"])


def test_every_transform_of_a_square_is_drawn_and_the_masks_follow():
    collate = RandomFlipsTurns(seed=3)
    batch = collate(_Cases(64).cases)
    assert _masks_follow_the_image(batch)
    assert batch["id"] == [f"case{i}" for i in range(64)]  # cases keep their order
    original = _case()["image"]
    seen = {
        (flip, turns)
        for image in batch["image"]
        for flip in (False, True)
        for turns in range(4)
        if transform_case({"image": original}, flip, turns)["image"].equal(image)
    }
    assert len(seen) == 8  # all eight elements of the square's symmetry group


def test_a_rectangle_keeps_its_shape_and_gets_the_four_shape_keeping_transforms():
    batch = RandomFlipsTurns(seed=0)(_Cases(32, height=4, width=6).cases)
    assert batch["image"].shape == (32, 1, 4, 6)
    assert _masks_follow_the_image(batch)
    original = _case(4, 6)["image"]
    candidates = [(f, t) for f in (False, True) for t in (0, 2)]
    seen = {
        (flip, turns)
        for image in batch["image"]
        for flip, turns in candidates
        if transform_case({"image": original}, flip, turns)["image"].equal(image)
    }
    assert len(seen) == 4


def test_the_seed_decides_the_draws_and_augment_false_leaves_the_cases_alone():
    cases = _Cases(16)

    def images(seed: int, augment: bool) -> torch.Tensor:
        loader = make_loader(cases, 4, shuffle=True, seed=seed, augment=augment)
        return torch.cat([batch["image"] for batch in loader])

    assert images(5, True).equal(images(5, True))
    assert not images(5, True).equal(images(6, True))
    assert images(5, False).equal(images(5, False))
    plain = images(5, False)
    assert all(plain[i].equal(_case()["image"]) for i in range(16))
    assert not images(5, True).equal(plain)


def test_opacus_poisson_sampling_loader_keeps_the_augmentation():
    loader = make_loader(_Cases(32), 8, shuffle=True, seed=1, augment=True)
    private = DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(0))
    original = _case()["image"]
    transformed = 0
    for batch in private:
        if not isinstance(batch, dict):  # Poisson sampling drew an empty batch
            continue
        assert _masks_follow_the_image(batch)
        transformed += sum(not image.equal(original) for image in batch["image"])
    assert transformed > 0
