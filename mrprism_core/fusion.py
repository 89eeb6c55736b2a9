"""Multi-rater fusion: Eq. 1, 4, 5, 11, 12 and 14/15 of MrPrism, plus majority vote and STAPLE.

Every fused mask in the project (training targets, losses, metrics, baselines) comes from
:func:`fuse`; nothing else re-implements a weighted vote.

Reading of Eq. 1. MrPrism fuses rater labels ``z^m`` with confidence maps ``w^m = log z~^m``
(Proposition 1: ``w^m = log P(z^m | y)``) and a uniform prior ``p_u``. Every class ``k`` is a
binary structure (disc, cup, ...) with two categories, foreground and background. A rater's
vote for the category it drew counts with its likelihood under DivP's estimate,
``exp(w) = z~`` for a foreground vote and ``1 - z~`` for a background vote; the prior adds
``p_u`` to both categories, and the two are normalised (the "softmax over classes")::

    s_fg = sum_m z~^m * z^m + p_u
    s_bg = sum_m (1 - z~^m) * (1 - z^m) + p_u
    y    = s_fg / (s_fg + s_bg)

The literal log-linear form ``softmax(sum_m log(z~^m) z^m)`` cannot be used: ``log z~ <= 0``, so
raters who agree on a class would *lower* that class (unanimous foreground fuses to <= 0.5).
The linear pool above keeps Eq. 1's ingredients (confidences from DivP, labels, uniform prior,
normalisation over categories) and is a convex combination of the labels: unanimous pixels
keep their label, and disagreements are settled by the raters' confidences.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_PRIOR",
    "fuse",
    "self_fuse",
    "threshold",
    "majority_vote",
    "staple",
    "rater_weights",
    "initial_confidence",
    "shuffle_raters",
]

#: Uniform prior ``p_u`` added to both categories; keeps the fusion defined where no rater
#: carries any confidence and pulls such pixels to 0.5.
DEFAULT_PRIOR = 1e-4


def _check_rater_shapes(confidence: Tensor, labels: Tensor) -> None:
    if confidence.dim() != 5 or labels.dim() != 5:
        raise ValueError(
            "fusion expects (B, M, K, H, W) tensors; got confidence "
            f"{tuple(confidence.shape)} and labels {tuple(labels.shape)}"
        )
    if confidence.shape[1] != labels.shape[1]:
        raise ValueError(
            f"rater count mismatch: {confidence.shape[1]} confidence maps for "
            f"{labels.shape[1]} rater masks"
        )


def rater_weights(valid: Tensor | None, like: Tensor) -> Tensor | None:
    """(B, M) rater validity -> (B, M, 1, 1, 1) weights broadcastable to ``like``; None = all."""
    if valid is None:
        return None
    if valid.dim() != 2 or valid.shape[1] != like.shape[1]:
        raise ValueError(f"rater_valid must be (B, {like.shape[1]}), got {tuple(valid.shape)}")
    return valid.to(like.dtype).view(*valid.shape, *([1] * (like.dim() - 2)))


def fuse(
    confidence: Tensor,
    labels: Tensor,
    prior: float = DEFAULT_PRIOR,
    valid: Tensor | None = None,
) -> Tensor:
    """Fuse rater labels with per-rater confidences (Eq. 1 / Eq. 4, ``y^fuse``).

    Args:
        confidence: ``z~ = exp(w)``, per-rater probabilities in [0, 1], shape (B, M, K, H, W)
            (or broadcastable to ``labels``).
        labels: rater masks ``z`` in [0, 1] (binary or soft), shape (B, M, K, H, W).
        prior: uniform prior ``p_u`` (>= 0), added to both categories.
        valid: optional (B, M) 0/1 mask of the rater slots that hold a real annotation
            (pooled sites with different raters); other slots do not vote.

    Returns:
        Fused foreground probability, shape (B, K, H, W).
    """
    _check_rater_shapes(confidence, labels)
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    weights = rater_weights(valid, labels)
    if weights is None:
        voters: Tensor | int = labels.shape[1]
        weighted_confidence = confidence
        weighted_labels = labels
    else:
        voters = weights.sum(dim=1)
        weighted_confidence = confidence * weights
        weighted_labels = labels * weights
    agreeing = (weighted_confidence * labels).sum(dim=1)
    foreground = agreeing + prior
    # sum (1 - c)(1 - z) expanded, so autograd keeps one (B, M, K, H, W) tensor, not four
    background = (
        voters - weighted_confidence.sum(dim=1) - weighted_labels.sum(dim=1) + agreeing + prior
    )
    return foreground / (foreground + background).clamp_min(1e-12)


class _StraightThroughThreshold(torch.autograd.Function):
    """Hard threshold forward, identity gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, level: float) -> Tensor:  # type: ignore[override]
        return (x > level).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def threshold(x: Tensor, level: float = 0.5, straight_through: bool = False) -> Tensor:
    """``T_level(x)``: 1 where ``x > level`` else 0.

    With ``straight_through=True`` the gradient passes as if ``T`` were the identity, so the
    shuffle loss can teach every DivP head its rater's mask (a hard threshold has no gradient).
    """
    if straight_through and x.requires_grad:
        return _StraightThroughThreshold.apply(x, level)
    return (x > level).to(x.dtype)


def self_fuse(
    rater_probs: Tensor,
    confidence: Tensor | None = None,
    prior: float = DEFAULT_PRIOR,
    straight_through: bool = False,
    valid: Tensor | None = None,
) -> Tensor:
    """Self-fusion ``y^self`` (Eq. 5 / Eq. 12): fuse DivP's own thresholded rater masks.

    Args:
        rater_probs: DivP outputs ``z~`` (B, M, K, H, W); thresholded at 0.5 to get the labels.
        confidence: confidences to weight them with; defaults to ``rater_probs`` (Eq. 5).
            Pass shuffled confidences for Eq. 12.
        prior: uniform prior ``p_u``.
        straight_through: pass gradients through the threshold (see :func:`threshold`).
        valid: optional (B, M) mask of the rater slots in use.

    Returns:
        Fused foreground probability, shape (B, K, H, W).
    """
    confidence = rater_probs if confidence is None else confidence
    return fuse(confidence, threshold(rater_probs, 0.5, straight_through), prior, valid)


def majority_vote(labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Majority vote over raters: 1 where more than half of the raters marked the pixel.

    Args:
        labels: rater masks (B, M, K, H, W) or (M, K, H, W) in {0, 1}.
        valid: optional (B, M) mask of the rater slots in use (5-D labels only).

    Returns:
        Binary mask without the rater dimension, same dtype as ``labels``.
    """
    rater_dim = 1 if labels.dim() == 5 else 0
    weights = rater_weights(valid, labels) if labels.dim() == 5 else None
    if weights is None:
        share = labels.float().mean(dim=rater_dim)
    else:
        share = (labels.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return (share > 0.5).to(labels.dtype)


def staple(labels: Tensor, valid: Tensor | None = None, level: float = 0.5) -> Tensor:
    """STAPLE (Warfield et al., 2004) with SimpleITK's filter, per image and class.

    Args:
        labels: rater masks (B, M, K, H, W) in {0, 1}.
        valid: optional (B, M) mask of the rater slots in use.
        level: the STAPLE posterior is binarised at this value.

    Returns:
        Binary (B, K, H, W) mask, dtype of ``labels``. Where every rater left a class empty
        (STAPLE is undefined) the result is empty.
    """
    import numpy as np
    import SimpleITK as sitk

    masks = labels.detach().to("cpu", torch.uint8).numpy()
    keep = None if valid is None else valid.detach().cpu().bool().numpy()
    out = np.zeros((masks.shape[0], *masks.shape[2:]), dtype=np.float32)
    for b in range(masks.shape[0]):
        raters = [m for m in range(masks.shape[1]) if keep is None or keep[b, m]]
        for k in range(masks.shape[2]):
            stack = [masks[b, m, k] for m in raters]
            if not any(mask.any() for mask in stack):
                continue
            if len(stack) == 1 or all(np.array_equal(stack[0], mask) for mask in stack[1:]):
                out[b, k] = stack[0]  # nothing to estimate; STAPLE's EM would not converge
                continue
            images = [sitk.GetImageFromArray(mask) for mask in stack]
            posterior = sitk.GetArrayFromImage(sitk.STAPLE(images, 1.0))
            out[b, k] = np.nan_to_num(posterior) > level
    return torch.from_numpy(out).to(device=labels.device, dtype=labels.dtype)


def initial_confidence(
    num_raters: int,
    shape: tuple[int, int, int],
    *,
    low: float = 0.1,
    high: float = 0.9,
    noise_std: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Initial confidence maps ``exp(w_0) = [psi^m + eps^m]_0^1`` (Eq. 14).

    ``psi^m ~ U(low, high)`` once per rater, ``eps ~ N(0, noise_std^2)`` per element; one draw
    serves the whole batch, as in the paper. The result is clamped to [1e-4, 1] so that
    ``w_0 = log(.)`` stays finite.

    Args:
        num_raters: M.
        shape: (K, H, W) of one rater map.

    Returns:
        Confidence maps of shape (1, M, K, H, W), broadcastable over the batch.
    """
    psi = torch.rand(num_raters, generator=generator, device=device) * (high - low) + low
    eps = torch.randn((num_raters, *shape), generator=generator, device=device) * noise_std
    return (psi.view(num_raters, 1, 1, 1) + eps).clamp(1e-4, 1.0).unsqueeze(0)


def shuffle_raters(x: Tensor, permutation: Tensor) -> Tensor:
    """Reorder the rater dimension (dim 1) of a (B, M, ...) tensor: ``x[:, permutation]``."""
    return x.index_select(1, permutation.to(x.device))
