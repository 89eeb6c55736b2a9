"""Training losses: MrPrism's recurrence (SSIM) and shuffle losses, and the ablation/baseline ones.

All fused targets come from :mod:`mrprism_core.fusion`. SSIM is ``pytorch_msssim.ssim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import Tensor

from .fusion import DEFAULT_PRIOR, fuse, self_fuse, shuffle_raters, threshold

__all__ = [
    "MrPrismLossConfig",
    "ssim_loss",
    "recurrence_loss",
    "shuffle_loss",
    "multihead_loss",
    "random_permutations",
    "bce_dice_loss",
    "bce_dice_per_image",
    "dice_loss_per_image",
    "mean_over_annotated",
    "binary_cross_entropy",
]


@dataclass(frozen=True)
class MrPrismLossConfig:
    """Weights and options of the MrPrism objective (Eq. 13)."""

    zeta: float = 0.3  # weight of the shuffle loss (paper: 0.3)
    shuffles: int = 3  # rater shuffles per recurrence (paper: 3)
    divp_supervision: str = "shuffle"  # "shuffle" (paper) or "multihead" (Eq. 9 ablation)
    ssim_window: int = 11  # Gaussian window of SSIM; must not exceed the image side
    prior: float = DEFAULT_PRIOR  # uniform prior p_u of every fusion

    def __post_init__(self) -> None:
        if self.divp_supervision not in ("shuffle", "multihead"):
            raise ValueError(
                f"divp_supervision must be 'shuffle' or 'multihead', got {self.divp_supervision!r}"
            )
        if self.shuffles < 1:
            raise ValueError(f"shuffles must be >= 1, got {self.shuffles}")


def binary_cross_entropy(
    prediction: Tensor, target: Tensor, row_weights: Tensor | None = None
) -> Tensor:
    """Mean BCE of probabilities. Unlike ``F.binary_cross_entropy`` it lets NaN through (so a
    broken batch shows up as a non-finite loss and is skipped) instead of raising.

    ``row_weights`` (shape ``prediction.shape[0]``) weights whole rows, e.g. masks out rater
    slots without an annotation.
    """
    p = prediction.clamp(1e-6, 1 - 1e-6)
    loss = -(target * p.log() + (1 - target) * (1 - p).log())
    if row_weights is None:
        return loss.mean()
    per_row = loss.flatten(1).mean(dim=1)
    return (per_row * row_weights).sum() / row_weights.sum().clamp_min(1)


def ssim_loss(prediction: Tensor, target: Tensor, window: int = 11) -> Tensor:
    """``1 - SSIM(prediction, target)`` for maps in [0, 1], shape (B, K, H, W); 0 when equal."""
    side = min(prediction.shape[-2:])
    window = min(window, side if side % 2 == 1 else side - 1)
    return 1.0 - ssim(prediction, target, data_range=1.0, size_average=True, win_size=window)


def random_permutations(
    num_raters: int, count: int, generator: torch.Generator | None = None
) -> Tensor:
    """``count`` random permutations of the rater indices, shape (count, M)."""
    return torch.stack([torch.randperm(num_raters, generator=generator) for _ in range(count)])


def _per_rater(x: Tensor) -> Tensor:
    """(B, M, K, H, W) -> (B*M, 1, K, H, W): each rater becomes its own one-rater fusion."""
    return x.flatten(0, 1).unsqueeze(1)


def shuffle_loss(
    rater_probs: Tensor,
    labels: Tensor,
    permutations: Tensor,
    prior: float = DEFAULT_PRIOR,
    valid: Tensor | None = None,
) -> Tensor:
    """Shuffle loss ``L_sff`` (Eq. 10-12), averaged over the given rater permutations.

    For a permutation ``pi``, rater ``m``'s mask is fused under the confidence of head
    ``pi(m)`` twice: once from DivP's thresholded mask ``T(z~^m)`` (Eq. 12) and once from the
    rater's label ``z^m`` (Eq. 11); the two must agree (cross-entropy). Shuffling decouples the
    confidence a head provides from the mask it predicts, so the recurrence cannot settle on
    the trivial solution of confident heads that copy ConP.

    The fusions are compared per rater before the sum over raters: a summed fusion only says
    *that* the heads disagree with the labels, not *which* head, so every head would receive a
    gradient of the same sign and no head would learn its own rater. The threshold passes
    gradients straight through.

    Args:
        rater_probs: DivP outputs ``z~`` (B, M, K, H, W).
        labels: rater masks ``z`` (B, M, K, H, W).
        permutations: (S, M) integer tensor, one permutation per row.
        valid: optional (B, M) mask of the rater slots that hold an annotation.
    """
    hard = _per_rater(threshold(rater_probs, 0.5, straight_through=True))
    truth = _per_rater(labels)
    rows = None if valid is None else valid.to(rater_probs.dtype).flatten()
    total = rater_probs.new_zeros(())
    for permutation in permutations:
        confidence = _per_rater(shuffle_raters(rater_probs, permutation))
        predicted = fuse(confidence, hard, prior)
        target = fuse(confidence, truth, prior).detach()
        total = total + binary_cross_entropy(predicted, target, rows)
    return total / len(permutations)


def multihead_loss(rater_probs: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Multi-head loss ``L_MH`` (Eq. 9): cross-entropy of each head against its own rater."""
    rows = None if valid is None else valid.to(rater_probs.dtype).flatten()
    return binary_cross_entropy(rater_probs.flatten(0, 1), labels.flatten(0, 1), rows)


def recurrence_loss(
    calibrated: Tensor,
    conp_target: Tensor,
    rater_probs: Tensor,
    window: int = 11,
    prior: float = DEFAULT_PRIOR,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Recurrence loss ``L_rec^i`` (Eq. 8), returned as its ConP and DivP terms.

    Args:
        calibrated: ConP output ``y~_i`` (B, K, H, W).
        conp_target: fusion of the raters' labels under the confidences ConP was given
            (``y^fuse_{i-1}``; Eq. 15 for the first recurrence), (B, K, H, W).
        rater_probs: DivP output ``z~_i`` for ``y~_i`` (B, M, K, H, W).
        valid: optional (B, M) mask of the rater slots in use at each case.

    Returns:
        ``(conp_term, divp_term)``: ``1 - SSIM(y~_i, y_{i-1})`` trains ConP and the encoder;
        ``1 - SSIM(y^self_i, y~_i)`` trains DivP (each side's target is detached, Eq. 6).
    """
    conp_term = ssim_loss(calibrated, conp_target.detach(), window)
    self_fused = self_fuse(rater_probs, prior=prior, straight_through=True, valid=valid)
    divp_term = ssim_loss(self_fused, calibrated.detach(), window)
    return conp_term, divp_term


def dice_loss_per_image(prob: Tensor, target: Tensor) -> Tensor:
    """1 - soft Dice of each image (B,), averaged over classes (+1 smoothing)."""
    dims = tuple(range(2, prob.dim()))
    inter = (prob * target).sum(dims)
    dice = (2 * inter + 1.0) / (prob.sum(dims) + target.sum(dims) + 1.0)
    return (1.0 - dice).mean(1)


def bce_dice_per_image(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy plus soft Dice loss of each image (B,): mean BCE over its pixels
    and classes plus the mean over classes of 1 - soft Dice."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce.flatten(1).mean(1) + dice_loss_per_image(torch.sigmoid(logits), target)


def mean_over_annotated(per_pair: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of a (B, M) per-(case, rater) loss over the pairs that hold an annotation
    (``valid``; None = all), so empty rater slots of pooled sites train nothing."""
    if valid is None:
        return per_pair.mean()
    weights = valid.to(per_pair.dtype)
    return (per_pair * weights).sum() / weights.sum().clamp_min(1.0)


def bce_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy plus soft Dice loss, the usual objective of a plain U-Net."""
    return bce_dice_per_image(logits, target).mean()
