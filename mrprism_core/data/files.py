"""A Dataset over listed cases (any reader), with validation and an agreement summary."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .cases import Case, DataValidationError
from .preprocess import CaseCache

__all__ = ["FileDataset", "RaterAgreement", "check_split_overlap"]


class FileDataset(Dataset):
    """Slices of prepared cases as samples: ``image`` (C, S, S), ``raters`` (M, K, S, S),
    ``id``, ``source``, ``spacing`` (3,) in mm (NaN where unknown) and, where the source has
    one, ``diagnosis``.

    Args:
        cases: the split's cases, as a reader listed them.
        cache: where prepared arrays live (disk or memory).
        num_raters, num_classes: what the site config declares; a case that differs is refused.
    """

    def __init__(
        self, cases: Sequence[Case], cache: CaseCache, *, num_raters: int, num_classes: int
    ) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.num_raters = int(num_raters)
        self.num_classes = int(num_classes)
        for case in self.cases:
            for what, have, declared in (
                ("raters", case.num_raters, self.num_raters),
                ("classes", case.num_classes, self.num_classes),
            ):
                if have != declared:
                    raise DataValidationError(
                        f"{case.files[0].parent}: case {case.case_id} has {have} {what}, the "
                        f"data config says num_{what}={declared}"
                    )
        self.index = [
            (c, s) for c, case in enumerate(self.cases) for s in range(case.slice_count())
        ]

    def __len__(self) -> int:
        return len(self.index)

    def prepared(self, case_index: int) -> Any:
        case = self.cases[case_index]
        prepared = self.cache.get(case)
        raters = prepared.raters
        if raters.shape[1] != self.num_raters or raters.shape[2] != self.num_classes:
            raise DataValidationError(
                f"{case.files[0]}: case {case.case_id} decodes to {raters.shape[1]} raters x "
                f"{raters.shape[2]} classes; the data config says {self.num_raters} x "
                f"{self.num_classes}"
            )
        return prepared

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_index, slice_index = self.index[index]
        case = self.cases[case_index]
        prepared = self.prepared(case_index)
        suffix = f"/slice{slice_index:03d}" if len(prepared.image) > 1 else ""
        sample = {
            "image": torch.from_numpy(np.array(prepared.image[slice_index], dtype=np.float32)),
            "raters": torch.from_numpy(np.array(prepared.raters[slice_index], dtype=np.float32)),
            "id": case.case_id + suffix,
            "source": case.source,
            "spacing": torch.tensor(prepared.spacing, dtype=torch.float32),
        }
        if case.diagnosis is not None:
            sample["diagnosis"] = torch.tensor(case.diagnosis, dtype=torch.float32)
        return sample

    def validate(self, progress: Any = None) -> dict[str, Any]:
        """Decode (and cache) every case; raise on the first problem, naming the file.

        Returns the split's summary: cases, slices, channels, and the raters' mean pairwise
        Dice per class.
        """
        channels: set[int] = set()
        agreement = RaterAgreement()
        for case_index in range(len(self.cases)):
            prepared = self.prepared(case_index)
            channels.add(int(prepared.image.shape[1]))
            if len(channels) > 1:
                raise DataValidationError(
                    f"{self.cases[case_index].files[0]}: {prepared.image.shape[1]} channels, "
                    f"other cases have {sorted(channels - {prepared.image.shape[1]})}"
                )
            agreement.add(np.asarray(prepared.raters))
            if progress is not None:
                progress()
        return {
            "cases": len(self.cases),
            "slices": len(self),
            "channels": channels.pop() if channels else 0,
            "rater_dice": agreement.mean(),
        }


class RaterAgreement:
    """Mean Dice over rater pairs, per class, accumulated over cases; pairs where neither rater
    marked anything are left out (no disagreement to measure)."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count: np.ndarray | None = None

    def add(self, raters: np.ndarray) -> None:
        """Add (N, M, K, H, W) masks."""
        num_classes = raters.shape[2]
        if self.total is None:
            self.total, self.count = np.zeros(num_classes), np.zeros(num_classes)
        flat = raters.reshape(*raters.shape[:3], -1).astype(np.float64)
        for a, b in itertools.combinations(range(raters.shape[1]), 2):
            overlap = (flat[:, a] * flat[:, b]).sum(-1)
            size = flat[:, a].sum(-1) + flat[:, b].sum(-1)
            marked = size > 0
            self.total += np.where(marked, 2 * overlap / np.maximum(size, 1), 0).sum(0)
            self.count += marked.sum(0)

    def mean(self) -> list[float | None]:
        """Per class; None for a class no pair marked (empty list before any case)."""
        if self.total is None or self.count is None:
            return []
        return [None if n == 0 else float(t / n) for t, n in zip(self.total, self.count)]


def check_split_overlap(cases: Sequence[Case], where: str) -> None:
    """Refuse a case id listed twice, and an image file in two splits (test data would leak
    into training)."""
    ids: dict[str, Case] = {}
    files: dict[Any, Case] = {}
    for case in cases:
        other = ids.setdefault(case.case_id, case)
        if other is not case:
            raise DataValidationError(
                f"{where}: case id {case.case_id} is listed twice ({other.files[0]} and "
                f"{case.files[0]})"
            )
        other = files.setdefault(case.files[0], case)
        if other.split != case.split:
            raise DataValidationError(
                f"{where}: split overlap: {case.files[0]} is in {other.split} (case "
                f"{other.case_id}) and in {case.split} (case {case.case_id})"
            )
