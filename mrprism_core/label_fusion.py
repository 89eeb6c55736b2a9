"""Label fusion scored against the truth (the analogue of paper 000's Table 3): majority vote,
STAPLE, MrPrism's fusion of the raters' masks under DivP's per-rater reliabilities (Eq. 1) and
DivP's self-fusion of its own rater masks (Eq. 5), each binarised at 0.5 and compared with
the known true mask of synthetic data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .fusion import Reliability, fuse, majority_vote, self_fuse, staple
from .metrics import dice_per_image
from .models.base import SegmentationModel
from .train import move_batch

__all__ = ["FUSIONS", "evaluate_label_fusion", "label_fusion_dice"]

FUSIONS = ("majority_vote", "staple", "divp_fusion", "divp_self_fusion")


def label_fusion_dice(
    labels: Tensor,
    truth: Tensor,
    reliability: Reliability | None = None,
    rater_probs: Tensor | None = None,
    valid: Tensor | None = None,
) -> dict[str, float]:
    """Mean Dice (over images and classes) of each fusion of ``labels`` (B, M, K, H, W)
    against ``truth`` (B, K, H, W). ``reliability`` and ``rater_probs``: DivP's per-rater
    reliabilities and rater masks z~; without them the DivP fusions are left out."""
    fused = {
        "majority_vote": majority_vote(labels, valid),
        "staple": staple(labels, valid),
    }
    if reliability is not None and rater_probs is not None:
        fused["divp_fusion"] = fuse(reliability, labels.float(), valid=valid) > 0.5
        fused["divp_self_fusion"] = self_fuse(reliability, rater_probs, valid=valid) > 0.5
    return {name: float(dice_per_image(mask, truth).mean()) for name, mask in fused.items()}


@torch.no_grad()
def evaluate_label_fusion(
    model: SegmentationModel | None,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Dice against ``truth`` of every fusion over a data set; ``model`` (MrPrism) supplies
    DivP's reliabilities; a model without them gets the majority vote and STAPLE only."""
    totals: dict[str, float] = {}
    count = 0
    if model is not None:
        model.eval()
    for batch in loader:
        batch = move_batch(batch, torch.device(device))
        if "truth" not in batch:
            raise ValueError("label fusion is scored against the true mask: the data has none")
        out = None if model is None else model(batch["image"])
        scores = label_fusion_dice(
            batch["raters"],
            batch["truth"],
            None if out is None else out.reliability,
            None if out is None else out.raters,
            batch.get("rater_valid"),
        )
        size = batch["raters"].shape[0]
        for name, value in scores.items():
            totals[name] = totals.get(name, 0.0) + value * size
        count += size
    return {name: total / max(count, 1) for name, total in totals.items()}
