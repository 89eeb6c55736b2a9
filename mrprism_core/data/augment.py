"""Random flips and quarter turns of training cases (the dihedral group of the square).

A case's image and every mask drawn on it (each rater's, the true mask) get the same transform,
so the raters' habits and their disagreement are kept; only the orientation changes. The
synthetic sets and the fundus, prostate and CT slices we read have no preferred orientation
that a model should learn (left and right eyes are mirror images), and with tens of cases per
site it is the cheapest regulariser there is (nnU-Net and MONAI flip and rotate by default).
Non-square images get only the transforms that keep their shape (flips and a half turn). Off by
default here: in short runs it slows learning, the faithful rater heads most (README,
"Centralized training").

Used as the ``collate_fn`` of a training loader (:func:`mrprism_core.train.make_loader`), so
every trainer gets it from one place, Opacus' Poisson-sampling loader keeps it (it reuses the
loader's ``collate_fn``), and the draws come from the loader's own seed: the same seed gives the
same transforms, and switching augmentation on or off leaves every other random draw alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

__all__ = ["SPATIAL_KEYS", "RandomFlipsTurns", "transform_case"]

#: The entries of a case that are pixel grids (..., H, W) and move with the image.
SPATIAL_KEYS = ("image", "raters", "truth")


def transform_case(case: Mapping[str, Any], flip: bool, quarter_turns: int) -> dict[str, Any]:
    """``case`` with every pixel grid mirrored left-right (``flip``), then turned
    counter-clockwise by ``quarter_turns`` x 90 degrees; other entries unchanged."""
    out = dict(case)
    for key in SPATIAL_KEYS:
        grid = case.get(key)
        if not isinstance(grid, Tensor):
            continue
        if flip:
            grid = grid.flip(-1)
        if quarter_turns % 4:
            grid = torch.rot90(grid, quarter_turns, dims=(-2, -1))
        out[key] = grid
    return out


class RandomFlipsTurns:
    """A ``collate_fn`` that gives each case a random flip and quarter turn, then batches.

    Each of the 8 transforms of a square image is equally likely; a non-square image draws
    among the 4 that keep its shape. A loader worker process draws from its own stream (the
    seed and its worker index), so workers do not repeat each other.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: dict[int, torch.Generator] = {}

    def _generator(self) -> torch.Generator:
        worker = get_worker_info()
        index = 0 if worker is None else worker.id + 1
        if index not in self._generators:
            stream = (self.seed * 1_000_003 + 7_919 * index) % 2**63  # within torch's range
            self._generators[index] = torch.Generator().manual_seed(stream)
        return self._generators[index]

    def __call__(self, cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        generator = self._generator()
        transformed = []
        for case in cases:
            height, width = case["image"].shape[-2:]
            flip = bool(torch.randint(2, (), generator=generator))
            turns = int(torch.randint(4, (), generator=generator))
            if height != width:
                turns = 2 * (turns % 2)  # only the half turn keeps a rectangle's shape
            transformed.append(transform_case(case, flip, turns))
        return default_collate(transformed)
