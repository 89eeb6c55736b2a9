"""Training losses: MrPrism's recurrence (SSIM) and shuffle losses, and the ablation/baseline ones.

All fused targets come from :mod:`mrprism_core.fusion`. SSIM is ``pytorch_msssim.ssim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import Tensor

from .fusion import DEFAULT_PRIOR, Reliability, shuffle_raters, threshold, weighted_vote_logits

__all__ = [
    "MrPrismLossConfig",
    "ssim_loss",
    "CONP_PIXEL_LOSSES",
    "DIVP_SUPERVISION",
    "conp_pixel_loss",
    "recurrence_loss",
    "shuffle_loss",
    "multihead_loss",
    "random_permutations",
    "scale_gradient",
    "bce_dice_loss",
    "bce_dice_per_image",
    "dice_loss_per_image",
    "mean_over_annotated",
    "binary_cross_entropy",
]


#: ConP's pixel-wise term next to 1 - SSIM (see :func:`conp_pixel_loss`).
CONP_PIXEL_LOSSES = ("none", "dice", "bce")
#: What supervises DivP's rater masks beside the recurrence term.
DIVP_SUPERVISION = ("shuffle", "multihead", "shuffle+multihead")


@dataclass(frozen=True)
class MrPrismLossConfig:
    """Weights and options of the MrPrism objective (Eq. 13)."""

    zeta: float = 0.3  # weight of the shuffle loss (paper: 0.3)
    shuffles: int = 3  # rater shuffles per recurrence (paper: 3)
    # "shuffle" (paper, Eq. 10-12), "multihead" (Eq. 9 ablation) or "shuffle+multihead"
    divp_supervision: str = "shuffle"
    ssim_window: int = 11  # Gaussian window of SSIM; must not exceed the image side
    prior: float = DEFAULT_PRIOR  # p_u = P(structure) before any vote, in every fusion
    # pixel-wise term added to ConP's 1 - SSIM: "none" (paper), "dice" or "bce"; SSIM alone
    # has no gradient for a small structure in an empty background (README: small structures)
    conp_pixel_loss: str = "dice"
    conp_pixel_weight: float = 1.0  # weight of that term
    # share of the rater masks' losses (the rater term) that reaches DivP's reliabilities through
    # the masks; the pixel correction always gets all of it (README, "Baselines")
    rater_mask_reliability_grad: float = 1.0

    def __post_init__(self) -> None:
        if self.divp_supervision not in DIVP_SUPERVISION:
            raise ValueError(
                f"divp_supervision must be one of {DIVP_SUPERVISION}, got {self.divp_supervision!r}"
            )
        if self.conp_pixel_loss not in CONP_PIXEL_LOSSES:
            raise ValueError(
                f"conp_pixel_loss must be one of {CONP_PIXEL_LOSSES}, got {self.conp_pixel_loss!r}"
            )
        if self.shuffles < 1:
            raise ValueError(f"shuffles must be >= 1, got {self.shuffles}")
        if not 0.0 <= self.rater_mask_reliability_grad <= 1.0:
            raise ValueError(
                "rater_mask_reliability_grad must be in [0, 1], "
                f"got {self.rater_mask_reliability_grad}"
            )


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


def scale_gradient(tensor: Tensor, share: float) -> Tensor:
    """``tensor``'s values, with only ``share`` of the gradient flowing back through it."""
    if share == 1.0 or not tensor.requires_grad:  # nothing to scale (e.g. inference)
        return tensor
    return tensor.detach() + share * (tensor - tensor.detach())


def random_permutations(
    num_raters: int, count: int, generator: torch.Generator | None = None
) -> Tensor:
    """``count`` random permutations of the rater indices, shape (count, M)."""
    return torch.stack([torch.randperm(num_raters, generator=generator) for _ in range(count)])


def shuffle_loss(
    reliability: Reliability,
    rater_probs: Tensor,
    labels: Tensor,
    permutations: Tensor,
    prior: float = DEFAULT_PRIOR,
    valid: Tensor | None = None,
) -> Tensor:
    """Shuffle loss ``L_sff`` (Eq. 10-12), averaged over the given rater permutations.

    For a permutation ``pi`` every rater ``m`` is given the reliability DivP estimated for
    rater ``pi(m)``; under these shuffled reliabilities the raters' labels are fused
    (``y^fuse->``, Eq. 11, the target) and so are DivP's thresholded rater masks
    (``y^self->``, Eq. 12); the two must agree (cross-entropy). Whatever the reliabilities,
    fusing the predicted masks must give what fusing the real ones gives, so the masks are
    supervised without tying them to the reliability each head reports about itself. The
    threshold passes gradients straight through; the target is a label (detached).

    Args:
        reliability: DivP's per-rater reliabilities (B, M, K, H, W) each.
        rater_probs: DivP's rater masks ``z~`` (B, M, K, H, W).
        labels: rater masks ``z`` (B, M, K, H, W).
        permutations: (S, M) integer tensor, one permutation per row.
        valid: optional (B, M) mask of the rater slots that hold an annotation.
    """
    hard = threshold(rater_probs, 0.5, straight_through=True)
    # the vote weights are logs of the reliabilities: computed once, a permutation only
    # reorders them
    vote_weights = reliability.vote_weights()
    total = rater_probs.new_zeros(())
    for permutation in permutations:
        shuffled = [shuffle_raters(w, permutation) for w in vote_weights]
        if valid is not None:  # an empty slot lends no weight to a real rater
            shuffled = [_keep_valid(w, valid, permutation) for w in shuffled]
        predicted = torch.sigmoid(weighted_vote_logits(*shuffled, hard, prior, valid))
        target = torch.sigmoid(weighted_vote_logits(*shuffled, labels, prior, valid)).detach()
        total = total + binary_cross_entropy(predicted, target)
    return total / len(permutations)


def _keep_valid(shuffled: Tensor, valid: Tensor, permutation: Tensor) -> Tensor:
    """Where rater ``m`` borrows from an empty slot, its vote weighs nothing (the weight of a
    rater with reliability 0.5)."""
    lends = valid.index_select(1, permutation.to(valid.device)).to(shuffled.dtype)
    lends = lends.view(*lends.shape, *([1] * (shuffled.dim() - 2)))
    return shuffled * lends


def multihead_loss(rater_probs: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Multi-head loss ``L_MH`` (Eq. 9): cross-entropy of each head against its own rater."""
    rows = None if valid is None else valid.to(rater_probs.dtype).flatten()
    return binary_cross_entropy(rater_probs.flatten(0, 1), labels.flatten(0, 1), rows)


def conp_pixel_loss(calibrated: Tensor, target: Tensor, kind: str) -> Tensor:
    """ConP's pixel-wise term against its fused target: soft Dice per image and class
    (``"dice"``), binary cross-entropy (``"bce"``) or nothing (``"none"``)."""
    if kind == "none":
        return calibrated.new_zeros(())
    if kind == "dice":
        return dice_loss_per_image(calibrated, target).mean()
    return binary_cross_entropy(calibrated, target)


def recurrence_loss(
    calibrated: Tensor,
    conp_target: Tensor,
    divp_fusion: Tensor,
    config: MrPrismLossConfig,
) -> tuple[Tensor, Tensor]:
    """Recurrence loss ``L_rec^i`` (Eq. 8 as Algorithm 1 computes it), as its two terms.

    Args:
        calibrated: ConP output ``y~_i`` (B, K, H, W).
        conp_target: ``y^fuse_{i-1}``, the fusion of the raters' labels under the
            reliabilities ConP was given (Eq. 15 for the first recurrence), (B, K, H, W).
        divp_fusion: ``y^fuse_i``, the fusion of the raters' labels under DivP's
            reliabilities of this recurrence (carries DivP's gradient), (B, K, H, W).

    Returns:
        ``(conp_term, divp_term)``: ``1 - SSIM(y~_i, y^fuse_{i-1})`` (plus the configured
        pixel-wise term) trains ConP and the encoder; ``1 - SSIM(y^fuse_i, y~_i)`` trains
        DivP. Each side's target is detached (Eq. 6).
    """
    target = conp_target.detach()
    conp_term = ssim_loss(calibrated, target, config.ssim_window)
    if config.conp_pixel_loss != "none":
        pixel = conp_pixel_loss(calibrated, target, config.conp_pixel_loss)
        conp_term = conp_term + config.conp_pixel_weight * pixel
    divp_term = ssim_loss(divp_fusion, calibrated.detach(), config.ssim_window)
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
