"""Label fusion scored against the truth (the analogue of paper 000's Table 3): majority vote,
STAPLE, MrPrism's fusion of the raters' masks with DivP's per-rater confidences (Eq. 1) and
DivP's self-fusion of its own per-rater masks (Eq. 5), each binarised at 0.5 and compared with
the known true mask of synthetic data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .fusion import fuse, majority_vote, self_fuse, staple
from .metrics import dice_per_image
from .models.base import SegmentationModel
from .train import move_batch

__all__ = ["FUSIONS", "evaluate_label_fusion", "label_fusion_dice"]

FUSIONS = ("majority_vote", "staple", "divp_fusion", "divp_self_fusion")


def label_fusion_dice(
    labels: Tensor, truth: Tensor, confidence: Tensor | None = None, valid: Tensor | None = None
) -> dict[str, float]:
    """Mean Dice (over images and classes) of each fusion of ``labels`` (B, M, K, H, W)
    against ``truth`` (B, K, H, W). ``confidence`` (B, M, K, H, W): DivP's per-rater
    probabilities z~; without it the DivP fusions are left out."""
    fused = {
        "majority_vote": majority_vote(labels, valid),
        "staple": staple(labels, valid),
    }
    if confidence is not None:
        fused["divp_fusion"] = fuse(confidence, labels.float(), valid=valid) > 0.5
        fused["divp_self_fusion"] = self_fuse(confidence, valid=valid) > 0.5
    return {name: float(dice_per_image(mask, truth).mean()) for name, mask in fused.items()}


@torch.no_grad()
def evaluate_label_fusion(
    model: SegmentationModel | None,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Dice against ``truth`` of every fusion over a data set; ``model`` (MrPrism, or any
    model with per-rater outputs) supplies the DivP confidences."""
    totals: dict[str, float] = {}
    count = 0
    if model is not None:
        model.eval()
    for batch in loader:
        batch = move_batch(batch, torch.device(device))
        if "truth" not in batch:
            raise ValueError("label fusion is scored against the true mask: the data has none")
        confidence = None if model is None else model(batch["image"]).raters
        scores = label_fusion_dice(
            batch["raters"], batch["truth"], confidence, batch.get("rater_valid")
        )
        size = batch["raters"].shape[0]
        for name, value in scores.items():
            totals[name] = totals.get(name, 0.0) + value * size
        count += size
    return {name: total / max(count, 1) for name, total in totals.items()}
