"""Dataset views that re-cut a site's data without copying it: a subset of cases, a subset of
raters, or the site's raters placed into a wider set of rater slots (pooling sites)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["CaseSubset", "RaterSubset", "RaterSlots"]


class CaseSubset(Dataset):
    """Only the cases at ``indices`` (in that order)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        bad = [i for i in indices if not 0 <= int(i) < size]
        if bad:
            raise IndexError(f"case indices {bad[:5]} outside a dataset of {size} cases")
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[self.indices[index]]


class RaterSubset(Dataset):
    """Only the raters at ``raters`` (indices into the sample's rater dimension)."""

    def __init__(self, dataset: Dataset, raters: Sequence[int]) -> None:
        if not raters:
            raise ValueError("a rater subset needs at least one rater")
        self.dataset = dataset
        self.raters = [int(r) for r in raters]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        masks = sample["raters"]
        if max(self.raters) >= masks.shape[0]:
            raise IndexError(
                f"rater {max(self.raters)} requested, the case has {masks.shape[0]} raters"
            )
        sample["raters"] = masks[self.raters]
        return sample


class RaterSlots(Dataset):
    """Place the site's M raters into slots ``offset .. offset+M-1`` of ``total`` slots.

    Empty slots hold zero masks and ``rater_valid`` (total,) marks the real ones, so sites with
    different raters can be pooled (centralized training) or share all heads.
    """

    def __init__(self, dataset: Dataset, total: int, offset: int = 0) -> None:
        self.dataset = dataset
        self.total = int(total)
        self.offset = int(offset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        masks = sample["raters"]
        count = masks.shape[0]
        if self.offset + count > self.total:
            raise ValueError(
                f"{count} raters at offset {self.offset} do not fit in {self.total} rater slots"
            )
        padded = masks.new_zeros((self.total, *masks.shape[1:]))
        padded[self.offset : self.offset + count] = masks
        valid = torch.zeros(self.total, dtype=masks.dtype)
        valid[self.offset : self.offset + count] = sample.get("rater_valid", 1)
        sample["raters"], sample["rater_valid"] = padded, valid
        return sample
