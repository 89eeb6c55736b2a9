"""How each rater of a site annotates, measured against the calibrated consensus.

The consensus of a case is the fusion of its raters' masks under DivP's per-rater
reliabilities (Eq. 1, :func:`~mrprism_core.fusion.fuse`), binarised at 0.5: the raters' joint
answer with each one counted by how reliable DivP finds it. Unanimous raters therefore agree
with it exactly. A model without reliabilities (a baseline) gets the majority vote instead.

Per rater and class this gives agreement (Dice with the consensus), the signed area
difference (over- or under-segmentation), DivP's sensitivity and specificity averaged over the
consensus' structure and the background ring around it (and the rater's observed hit rates
there), how often the rater left a present structure empty, a mean disagreement map and the
cases where the rater departs most. The site's annotation-quality score
(:func:`annotation_quality`) is the mean agreement of its raters, bounded to
``[QUALITY_FLOOR, 1]`` so that no site can claim all the aggregation weight.

Everything here is computed and kept at the site; only the score may leave it, by opt-in.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .fusion import fuse, majority_vote
from .metrics import dice_per_image
from .models.base import SegmentationModel
from .train import move_batch

__all__ = [
    "QUALITY_FLOOR",
    "TOP_CASES",
    "RaterAssessment",
    "RaterRow",
    "annotation_quality",
    "assess_raters",
    "bounded_quality",
]

#: Lowest annotation-quality score a site can have: with scores in [0.1, 1] no site weighs in
#: more than 10x another of the same size, whatever its raters.
QUALITY_FLOOR = 0.1

#: Cases shown per rater and class: those where the rater departs most from the consensus.
TOP_CASES = 5

#: Width (px) of the band around the consensus where contrast and uncertainty are measured.
_BAND = 5


def bounded_quality(score: float) -> float:
    """A quality score clipped to ``[QUALITY_FLOOR, 1]``; NaN counts as the floor."""
    if score != score:  # NaN
        return QUALITY_FLOOR
    return min(1.0, max(QUALITY_FLOOR, float(score)))


@dataclass
class RaterRow:
    """One rater and class over a data set (the ``raters.json`` row)."""

    rater: int
    class_name: str
    agreement_dice: float  # mean per-case Dice with the consensus (empty & empty = 1)
    area_bias: float  # (rater area - consensus area) / consensus area, in %: > 0 over-segments
    area_bias_px: float  # the same difference in pixels per case
    sensitivity: float  # DivP's P(z = 1 | y = 1), averaged over the consensus' structure
    specificity: float  # DivP's P(z = 0 | y = 0), averaged over the background ring around it
    observed_sensitivity: float  # share of the consensus' structure the rater marked
    observed_specificity: float  # share of the background ring around it the rater left empty
    empty_rate: float  # share of cases with the structure in the consensus left empty
    cases: int  # cases this rater annotated

    @property
    def reliability(self) -> float:
        """Balanced reliability ``(sensitivity + specificity) / 2`` (0.5 = a coin)."""
        return (self.sensitivity + self.specificity) / 2.0

    def to_json(self) -> dict[str, Any]:
        return {
            "rater": self.rater,
            "class": self.class_name,
            "agreement_dice": self.agreement_dice,
            "area_bias": self.area_bias,
            "area_bias_px": self.area_bias_px,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "reliability": self.reliability,
            "observed_sensitivity": self.observed_sensitivity,
            "observed_specificity": self.observed_specificity,
            "empty_rate": self.empty_rate,
            "cases": self.cases,
        }


@dataclass(order=True)
class DepartingCase:
    """A case where a rater departs from the consensus (kept for the report's figures)."""

    departure: float  # 1 - Dice with the consensus
    case_id: str = field(compare=False)
    image: Tensor = field(compare=False)  # (C, H, W)
    rater_mask: Tensor = field(compare=False)  # (H, W)
    consensus: Tensor = field(compare=False)  # (H, W)


@dataclass
class RaterAssessment:
    """The result of :func:`assess_raters`."""

    rows: list[RaterRow]
    disagreement: Tensor  # (M, K, H, W) mean |rater - consensus| over the rater's cases
    worst_cases: dict[tuple[int, int], list[DepartingCase]]  # (rater, class) -> worst first
    # per case, rater and class: agreement Dice, the image's contrast at the structure and the
    # model's uncertainty there (for "does reliability depend on difficulty")
    case_dice: Tensor  # (N, M, K); NaN where the rater did not annotate the case
    case_contrast: Tensor  # (N, K)
    case_uncertainty: Tensor  # (N, K)
    num_cases: int
    consensus_kind: str  # "divp_fusion" or "majority_vote"

    @property
    def quality(self) -> float:
        """The site's annotation-quality score: mean agreement over raters and classes."""
        return bounded_quality(sum(r.agreement_dice for r in self.rows) / max(len(self.rows), 1))

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.num_cases,
            "consensus": self.consensus_kind,
            "annotation_quality": self.quality,
            "raters": [row.to_json() for row in self.rows],
        }


def _band(mask: Tensor) -> Tensor:
    """The consensus grown by ``_BAND`` px: where a structure's boundary can be."""
    return F.max_pool2d(mask, 2 * _BAND + 1, stride=1, padding=_BAND)


def _contrast(images: Tensor, consensus: Tensor, band: Tensor) -> Tensor:
    """|mean brightness inside - in the ring just outside| per image and class, (B, K);
    ``band`` is :func:`_band` of ``consensus``."""
    grey = images.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    ring = band - consensus
    inside = (grey * consensus).sum((-2, -1)) / consensus.sum((-2, -1)).clamp_min(1)
    outside = (grey * ring).sum((-2, -1)) / ring.sum((-2, -1)).clamp_min(1)
    return (inside - outside).abs()


def _uncertainty(calibrated: Tensor, band: Tensor) -> Tensor:
    """Mean binary entropy (bits) of the calibrated mask within ``band`` (the consensus grown
    by :func:`_band`), (B, K)."""
    p = calibrated.clamp(1e-6, 1 - 1e-6)
    entropy = -(p * p.log2() + (1 - p) * (1 - p).log2())
    return (entropy * band).sum((-2, -1)) / band.sum((-2, -1)).clamp_min(1)


class _Totals:
    """Running sums over batches, per rater and class."""

    def __init__(self, raters: int, classes: int, size: tuple[int, int]) -> None:
        shape = (raters, classes)
        self.cases = torch.zeros(shape)
        self.dice = torch.zeros(shape)
        self.area_diff = torch.zeros(shape)
        self.consensus_area = torch.zeros(shape)
        self.present = torch.zeros(shape)  # cases with the structure in the consensus
        self.empty = torch.zeros(shape)  # ... of which the rater left it empty
        self.sens = torch.zeros(shape)
        self.fg = torch.zeros(shape)
        self.spec = torch.zeros(shape)
        self.bg = torch.zeros(shape)
        self.hits = torch.zeros(shape)  # structure pixels the rater marked
        self.rejections = torch.zeros(shape)  # ring pixels the rater left empty
        self.disagreement = torch.zeros(*shape, *size)
        self.worst: dict[tuple[int, int], list[DepartingCase]] = {}
        self.case_dice: list[Tensor] = []
        self.case_contrast: list[Tensor] = []
        self.case_uncertainty: list[Tensor] = []

    def keep_worst(self, key: tuple[int, int], case: DepartingCase) -> None:
        heap = self.worst.setdefault(key, [])
        if len(heap) < TOP_CASES:
            heapq.heappush(heap, case)
        elif case.departure > heap[0].departure:
            heapq.heapreplace(heap, case)


@torch.no_grad()
def assess_raters(
    model: SegmentationModel | None,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    class_names: Sequence[str] | None = None,
    keep_cases: bool = True,
) -> RaterAssessment:
    """Measure every rater of a data set against the calibrated consensus (module docstring).

    Args:
        model: the site's model; MrPrism supplies DivP's reliabilities. ``None`` (or a model
            without reliabilities) uses the majority vote as the consensus and the rater's
            own hit rates against it as sensitivity and specificity.
        loader: batches with ``image`` (B, C, H, W), ``raters`` (B, M, K, H, W), optional
            ``rater_valid`` (B, M) and ``id``; not shuffled, so the case order is the data set's.
        device: where the model runs.
        class_names: names of the K classes (default ``class 0`` ...).
        keep_cases: keep the cases where each rater departs most (the report's figures);
            the per-round quality score does without them.
    """
    totals: _Totals | None = None
    kind = "majority_vote"
    if model is not None:
        model.eval()
    seen = 0
    for batch in loader:
        batch = move_batch(batch, torch.device(device))
        labels = batch["raters"].float()
        batch_size, raters, classes, height, width = labels.shape
        valid = batch.get("rater_valid")
        out = None if model is None else model(batch["image"])
        if out is not None and out.reliability is not None:
            kind = "divp_fusion"
            consensus = (fuse(out.reliability, labels, valid=valid) > 0.5).float()
            sensitivity, specificity = out.reliability
            calibrated = out.calibrated
        else:
            consensus = majority_vote(labels, valid).float()
            sensitivity = labels
            specificity = 1.0 - labels
            calibrated = consensus if out is None else out.calibrated
        if totals is None:
            totals = _Totals(raters, classes, (height, width))
        mask = torch.ones(batch_size, raters, device=labels.device) if valid is None else valid
        mask = mask.float()
        cons = consensus.unsqueeze(1).expand_as(labels)  # (B, M, K, H, W)
        dice = dice_per_image(labels.flatten(0, 1), cons.flatten(0, 1)).view(
            batch_size, raters, classes
        )
        rater_area = labels.sum((-2, -1))
        cons_area = cons.sum((-2, -1))
        present = (cons_area > 0).float()
        w = mask.unsqueeze(-1)  # (B, M, 1)
        totals.cases += w.expand(-1, -1, classes).sum(0).cpu()
        totals.dice += (dice * w).sum(0).cpu()
        totals.area_diff += ((rater_area - cons_area) * w).sum(0).cpu()
        totals.consensus_area += (cons_area * w).sum(0).cpu()
        totals.present += (present * w).sum(0).cpu()
        totals.empty += ((rater_area == 0).float() * present * w).sum(0).cpu()
        fg = cons * w[..., None, None]
        # background near the structure only: far away every rater leaves it empty and DivP's
        # specificity there is unconstrained by any vote
        band = _band(consensus)
        bg = (band - consensus).unsqueeze(1) * w[..., None, None]
        totals.sens += (sensitivity.expand_as(labels) * fg).sum((0, -2, -1)).cpu()
        totals.fg += fg.sum((0, -2, -1)).cpu()
        totals.spec += (specificity.expand_as(labels) * bg).sum((0, -2, -1)).cpu()
        totals.bg += bg.sum((0, -2, -1)).cpu()
        totals.hits += (labels * fg).sum((0, -2, -1)).cpu()
        totals.rejections += ((1.0 - labels) * bg).sum((0, -2, -1)).cpu()
        totals.disagreement += ((labels - cons).abs() * w[..., None, None]).sum(0).cpu()
        totals.case_dice.append(torch.where(w > 0, dice, torch.nan).cpu())
        totals.case_contrast.append(_contrast(batch["image"], consensus, band).cpu())
        totals.case_uncertainty.append(_uncertainty(calibrated, band).cpu())
        ids = batch.get("id") or [f"case {seen + b}" for b in range(batch_size)]
        for b in range(batch_size if keep_cases else 0):
            for m in range(raters):
                if mask[b, m] <= 0:
                    continue
                for k in range(classes):
                    totals.keep_worst(
                        (m, k),
                        DepartingCase(
                            1.0 - float(dice[b, m, k]),
                            str(ids[b]),
                            batch["image"][b].cpu(),
                            labels[b, m, k].cpu(),
                            consensus[b, k].cpu(),
                        ),
                    )
        seen += batch_size
    if totals is None:
        raise ValueError("the rater report needs at least one annotated case; the split is empty")
    return _assessment(totals, seen, kind, class_names)


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-12), torch.nan)


def _assessment(
    totals: _Totals, cases: int, kind: str, class_names: Sequence[str] | None
) -> RaterAssessment:
    raters, classes = totals.cases.shape
    names = list(class_names or [f"class {k}" for k in range(classes)])
    agreement = _ratio(totals.dice, totals.cases)
    area_bias = 100.0 * _ratio(totals.area_diff, totals.consensus_area)
    area_bias_px = _ratio(totals.area_diff, totals.cases)
    sensitivity = _ratio(totals.sens, totals.fg)
    specificity = _ratio(totals.spec, totals.bg)
    observed_sensitivity = _ratio(totals.hits, totals.fg)
    observed_specificity = _ratio(totals.rejections, totals.bg)
    empty_rate = torch.where(totals.present > 0, _ratio(totals.empty, totals.present), 0.0)
    rows = [
        RaterRow(
            rater=m,
            class_name=names[k],
            agreement_dice=float(agreement[m, k]),
            area_bias=float(area_bias[m, k]),
            area_bias_px=float(area_bias_px[m, k]),
            sensitivity=float(sensitivity[m, k]),
            specificity=float(specificity[m, k]),
            observed_sensitivity=float(observed_sensitivity[m, k]),
            observed_specificity=float(observed_specificity[m, k]),
            empty_rate=float(empty_rate[m, k]),
            cases=int(totals.cases[m, k]),
        )
        for m in range(raters)
        for k in range(classes)
        if totals.cases[m, k] > 0
    ]
    counts = totals.cases.clamp_min(1)[..., None, None]
    return RaterAssessment(
        rows=rows,
        disagreement=totals.disagreement / counts,
        worst_cases={key: sorted(heap, reverse=True) for key, heap in totals.worst.items()},
        case_dice=torch.cat(totals.case_dice),
        case_contrast=torch.cat(totals.case_contrast),
        case_uncertainty=torch.cat(totals.case_uncertainty),
        num_cases=cases,
        consensus_kind=kind,
    )


def annotation_quality(
    model: SegmentationModel | None,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str = "cpu",
) -> float:
    """The site's bounded annotation-quality score (see :class:`RaterAssessment.quality`)."""
    return assess_raters(model, loader, device, keep_cases=False).quality
