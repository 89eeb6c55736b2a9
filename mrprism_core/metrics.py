"""Evaluation metrics of paper 000 and the project (functions plus an accumulator).

Conventions: probabilities (B, K, H, W); rater masks (B, M, K, H, W) in {0, 1}; Dice of two
empty masks is 1 (both agree there is nothing); binarisation is ``x > threshold``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .fusion import rater_weights, threshold

__all__ = [
    "SOFT_DICE_THRESHOLDS",
    "soft_truth",
    "dice_per_image",
    "soft_dice",
    "soft_dice_per_image",
    "per_rater_dice",
    "generalized_energy_distance",
    "calibration_bins",
    "expected_calibration_error",
    "dice_vs_truth",
    "MetricAccumulator",
    "RECURRENCE_METRICS",
    "recurrence_table",
    "spread",
]

#: What :class:`MetricAccumulator` reports for every recurrence (``<name>_rec<i>``).
RECURRENCE_METRICS: tuple[str, ...] = ("soft_dice", "dice_vs_truth", "per_rater_dice", "ged")

#: Thresholds at which Table 1 of paper 000 binarises prediction and soft ground truth.
SOFT_DICE_THRESHOLDS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


def dice_per_image(prediction: Tensor, target: Tensor) -> Tensor:
    """Dice of binary masks per image and class.

    Args:
        prediction, target: {0, 1} tensors of shape (B, K, H, W).

    Returns:
        (B, K) Dice values; 1 where both masks are empty.
    """
    prediction = prediction.float()
    target = target.float()
    inter = (prediction * target).sum(dim=(-2, -1))
    total = prediction.sum(dim=(-2, -1)) + target.sum(dim=(-2, -1))
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-12), torch.ones_like(total))


def soft_truth(rater_masks: Tensor, valid: Tensor | None = None) -> Tensor:
    """Soft ground truth: the mean of the rater masks (over the valid rater slots), (B,K,H,W)."""
    weights = rater_weights(valid, rater_masks)
    if weights is None:
        return rater_masks.float().mean(dim=1)
    return (rater_masks.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


def soft_dice_per_image(
    prob: Tensor,
    rater_masks: Tensor,
    thresholds: Sequence[float] = SOFT_DICE_THRESHOLDS,
    valid: Tensor | None = None,
) -> Tensor:
    """Soft Dice of paper 000's Table 1 per image and class, shape (B, K).

    The soft ground truth is the mean of the rater masks; prediction and soft ground truth are
    binarised at each threshold, Dice is taken at each level and the levels are averaged.
    """
    if rater_masks.dim() != 5 or prob.dim() != 4:
        raise ValueError(
            f"soft_dice expects prob (B,K,H,W) and rater_masks (B,M,K,H,W); got "
            f"{tuple(prob.shape)} and {tuple(rater_masks.shape)}"
        )
    if prob.shape != rater_masks.shape[:1] + rater_masks.shape[2:]:
        raise ValueError(
            f"prob {tuple(prob.shape)} does not match rater masks {tuple(rater_masks.shape)}"
        )
    truth = soft_truth(rater_masks, valid)
    levels = [dice_per_image(prob > t, truth > t) for t in thresholds]
    return torch.stack(levels).mean(dim=0)


def soft_dice(
    prob: Tensor,
    rater_masks: Tensor,
    thresholds: Sequence[float] = SOFT_DICE_THRESHOLDS,
    valid: Tensor | None = None,
) -> float:
    """Soft Dice (paper 000, Table 1) averaged over batch and classes, a float in [0, 1].

    Args:
        prob: predicted probabilities (B, K, H, W).
        rater_masks: rater masks (B, M, K, H, W) in {0, 1}.
        valid: optional (B, M) mask of the annotated rater slots.
    """
    return float(soft_dice_per_image(prob, rater_masks, thresholds, valid).mean())


def per_rater_dice(rater_probs: Tensor, rater_masks: Tensor) -> Tensor:
    """Dice of each personalised rater output (binarised at 0.5) against that rater's mask.

    Returns:
        (B, M) Dice averaged over classes.
    """
    batch, raters = rater_masks.shape[:2]
    flat_pred = threshold(rater_probs).flatten(0, 1)
    flat_true = rater_masks.flatten(0, 1)
    return dice_per_image(flat_pred, flat_true).mean(dim=-1).view(batch, raters)


def _pairwise_iou_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - IoU between every sample of ``a`` (B, S, N) and of ``b`` (B, T, N) -> (B, S, T)."""
    inter = torch.einsum("bsn,btn->bst", a, b)
    union = a.sum(-1)[:, :, None] + b.sum(-1)[:, None, :] - inter
    return torch.where(union > 0, 1 - inter / union.clamp_min(1e-12), torch.zeros_like(union))


def _masked_pair_mean(distance: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Mean of a (B, S, T) distance matrix over the valid rows and columns, per image."""
    weights = rows[:, :, None] * cols[:, None, :]
    return (distance * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp_min(1)


def generalized_energy_distance(
    rater_probs: Tensor, rater_masks: Tensor, valid: Tensor | None = None
) -> Tensor:
    """Squared generalized energy distance between predicted and annotated rater sets.

    ``D^2 = 2 E d(S, Y) - E d(S, S') - E d(Y, Y')`` with ``d = 1 - IoU`` over all classes and
    pixels, the predicted set being the binarised rater outputs (of the valid slots). Lower is
    better.

    Returns:
        (B,) GED per image.
    """
    samples = threshold(rater_probs).flatten(2).float()
    annotations = rater_masks.flatten(2).float()
    if valid is None:
        valid = torch.ones(annotations.shape[:2], device=annotations.device)
    valid = valid.float()
    cross = _masked_pair_mean(_pairwise_iou_distance(samples, annotations), valid, valid)
    within_pred = _masked_pair_mean(_pairwise_iou_distance(samples, samples), valid, valid)
    within_true = _masked_pair_mean(_pairwise_iou_distance(annotations, annotations), valid, valid)
    return 2 * cross - within_pred - within_true


def calibration_bins(prob: Tensor, soft_truth: Tensor, bins: int = 10) -> Tensor:
    """Per-bin sums for ECE: a (bins, 3) tensor of (count, sum of prob, sum of soft truth)."""
    p = prob.detach().flatten().float()
    t = soft_truth.detach().flatten().float()
    index = (p * bins).long().clamp(0, bins - 1)
    out = torch.zeros(bins, 3, dtype=torch.float64, device=p.device)
    out[:, 0].index_add_(0, index, torch.ones_like(p, dtype=torch.float64))
    out[:, 1].index_add_(0, index, p.double())
    out[:, 2].index_add_(0, index, t.double())
    return out


def expected_calibration_error(prob: Tensor, soft_truth: Tensor, bins: int = 10) -> float:
    """Expected calibration error of ``prob`` against the raters' agreement (soft truth).

    Pixels are binned by predicted probability; each bin contributes
    ``|mean prob - mean soft truth|`` weighted by its share of pixels.
    """
    return _ece_from_bins(calibration_bins(prob, soft_truth, bins))


def _ece_from_bins(table: Tensor) -> float:
    total = float(table[:, 0].sum())
    if total == 0:
        return float("nan")
    return float((table[:, 1] - table[:, 2]).abs().sum() / total)


def dice_vs_truth(prob: Tensor, truth: Tensor) -> Tensor:
    """Dice of the prediction binarised at 0.5 against a known true mask, per image (B,)."""
    return dice_per_image(threshold(prob), truth).mean(dim=-1)


class MetricAccumulator:
    """Accumulates the evaluation metrics over batches; :meth:`compute` gives dataset means.

    Per-image metrics are averaged over images; ECE is computed from pooled bins.
    """

    def __init__(self, ece_bins: int = 10) -> None:
        self.ece_bins = ece_bins
        self.reset()

    def reset(self) -> None:
        self.num_images = 0
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._per_rater: Tensor | None = None
        self._per_rater_count: Tensor | None = None
        self._ece: Tensor | None = None

    def _add(self, name: str, values: Tensor) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + float(values.double().sum())
        self._counts[name] = self._counts.get(name, 0) + values.numel()

    @torch.no_grad()
    def update(
        self,
        calibrated: Tensor,
        rater_masks: Tensor,
        *,
        rater_probs: Tensor | None = None,
        recurrences: Sequence[Tensor] = (),
        recurrence_raters: Sequence[Tensor] = (),
        truth: Tensor | None = None,
        rater_valid: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            calibrated: final calibrated probabilities (B, K, H, W).
            rater_masks: annotations (B, M, K, H, W).
            rater_probs: personalised rater outputs (B, M, K, H, W), if the model has them:
                adds per-rater Dice, GED and ``heads_mean_soft_dice``, the soft Dice of their
                mean (what a model whose calibrated output is that mean, D-Persona, scores).
            recurrences: calibrated map of every recurrence, each (B, K, H, W): adds
                ``soft_dice_rec<i>`` (and ``dice_vs_truth_rec<i>`` with a truth).
            recurrence_raters: per-rater outputs of every recurrence, each (B, M, K, H, W):
                adds ``per_rater_dice_rec<i>`` (mean over raters) and ``ged_rec<i>``.
            truth: known true mask (B, K, H, W), if any.
            rater_valid: (B, M) mask of the rater slots annotated at each case, if not all.
        """
        self.num_images += calibrated.shape[0]
        valid = rater_valid
        self._add("soft_dice", soft_dice_per_image(calibrated, rater_masks, valid=valid).mean(-1))
        slots = (
            torch.ones(rater_masks.shape[:2], device=rater_masks.device)
            if valid is None
            else valid.float()
        )
        for index, rec in enumerate(recurrences):
            scores = soft_dice_per_image(rec, rater_masks, valid=valid).mean(dim=-1)
            self._add(f"soft_dice_rec{index}", scores)
            if truth is not None:
                self._add(f"dice_vs_truth_rec{index}", dice_vs_truth(rec, truth))
        for index, probs in enumerate(recurrence_raters):
            pairs = per_rater_dice(probs, rater_masks) * slots
            self._add(f"per_rater_dice_rec{index}", pairs.sum(1) / slots.sum(1).clamp_min(1))
            self._add(f"ged_rec{index}", generalized_energy_distance(probs, rater_masks, valid))
        if rater_probs is not None:
            scores = per_rater_dice(rater_probs, rater_masks) * slots
            sums, counts = scores.double().sum(dim=0).cpu(), slots.double().sum(dim=0).cpu()
            if self._per_rater is None:
                self._per_rater, self._per_rater_count = sums, counts
            else:
                self._per_rater += sums
                self._per_rater_count += counts
            self._add("ged", generalized_energy_distance(rater_probs, rater_masks, valid))
            heads_mean = soft_truth(rater_probs, valid)  # the mean over the annotated slots
            heads_scores = soft_dice_per_image(heads_mean, rater_masks, valid=valid).mean(-1)
            self._add("heads_mean_soft_dice", heads_scores)
        if truth is not None:
            self._add("dice_vs_truth", dice_vs_truth(calibrated, truth))
        bins = calibration_bins(calibrated, soft_truth(rater_masks, valid), self.ece_bins).cpu()
        self._ece = bins if self._ece is None else self._ece + bins

    def compute(self) -> dict[str, float | list[float] | None]:
        """Dataset-level metrics; keys absent from every batch are ``None``."""
        result: dict[str, float | list[float] | None] = {
            name: self._sums[name] / self._counts[name] for name in self._sums
        }
        result["per_rater_dice"] = (
            None
            if self._per_rater is None
            else [
                float(total / count) if count else None
                for total, count in zip(self._per_rater, self._per_rater_count)
            ]
        )
        result["ece"] = None if self._ece is None else _ece_from_bins(self._ece)
        result.setdefault("ged", None)
        result.setdefault("heads_mean_soft_dice", None)
        result.setdefault("dice_vs_truth", None)
        result["num_examples"] = self.num_images
        return result


def recurrence_table(result: Mapping[str, Any]) -> list[dict[str, float | None]]:
    """rec0 ... rec_tau of an evaluation (``<metric>_rec<i>`` keys) as one row per recurrence
    with every :data:`RECURRENCE_METRICS` entry (None where the model or data has none)."""
    count = sum(1 for key in result if key.startswith("soft_dice_rec"))
    return [
        {name: _optional_float(result.get(f"{name}_rec{i}")) for name in RECURRENCE_METRICS}
        for i in range(count)
    ]


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def spread(values: Sequence[float | None], digits: int | None = None) -> dict[str, float] | None:
    """Mean and sample standard deviation over runs (seeds; 0 for one value), rounded to
    ``digits`` when given; None if any value is missing."""
    if not values or any(v is None for v in values):
        return None
    numbers = [float(v) for v in values]  # type: ignore[arg-type]
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    mean = statistics.fmean(numbers)
    if digits is None:
        return {"mean": mean, "std": std}
    return {"mean": round(mean, digits), "std": round(std, digits)}
