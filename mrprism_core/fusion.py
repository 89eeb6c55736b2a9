"""Multi-rater fusion: Eq. 1, 4, 5, 11, 12 and 14/15 of MrPrism, plus majority vote and STAPLE.

Every fused mask in the project (training targets, losses, metrics, baselines) comes from
:func:`fuse`; nothing else re-implements a weighted vote.

Reading of Eq. 1 with Proposition 1 (``w^m = log P(z^m | y)``). Every class ``k`` is a binary
structure (disc, cup, nodule, ...). DivP tells, per pixel and rater, how likely the rater is to
draw what it drew given the structure is there or not: its *sensitivity*
``s^m = P(z^m = 1 | y = 1)`` and *specificity* ``q^m = P(z^m = 0 | y = 0)``
(:class:`Reliability`). The fusion is the posterior of the structure given every vote,
log-linear in the votes plus the prior ``p_u = P(y = 1)``::

    logit y = logit p_u + sum_m [ z^m log(s^m / (1 - q^m)) + (1 - z^m) log((1 - s^m) / q^m) ]

so agreeing raters raise their class, a rater DivP finds unreliable (``s + q`` near 1) counts
less, and equal reliabilities reduce to a (softened) vote. This is the per-pixel form of the
Dawid-Skene / STAPLE rater model. An earlier linear pool that weighted each vote by the head's
probability of that vote returned the raters' mean whatever the confidences, which left the
recurrence nothing to change.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_PRIOR",
    "EQUAL_CONFIDENCE",
    "Reliability",
    "fuse",
    "fusion_logits",
    "weighted_vote_logits",
    "self_fuse",
    "threshold",
    "majority_vote",
    "staple",
    "rater_weights",
    "initial_confidence",
    "initial_reliability",
    "reliability_from_confidence",
    "shuffle_raters",
]

#: Prior probability ``p_u`` of the structure at a pixel before any rater has voted (uniform).
DEFAULT_PRIOR = 0.5

#: Confidence every rater gets before DivP has spoken ("equal confidence", inference start).
EQUAL_CONFIDENCE = 0.5

#: Sensitivities and specificities are kept in [eps, 1 - eps] so that every vote's weight stays
#: finite (at most log((1 - eps) / eps) ~ 6.9 nats) and a single rater cannot veto all others.
RELIABILITY_EPS = 1e-3


class Reliability(NamedTuple):
    """Per-pixel reliability of each rater under DivP (Proposition 1), each (B, M, K, H, W).

    ``sensitivity = P(z = 1 | y = 1)``: how likely the rater marks the structure where it is;
    ``specificity = P(z = 0 | y = 0)``: how likely the rater leaves background unmarked.
    """

    sensitivity: Tensor
    specificity: Tensor

    def clamped(self) -> Reliability:
        low, high = RELIABILITY_EPS, 1.0 - RELIABILITY_EPS
        return Reliability(self.sensitivity.clamp(low, high), self.specificity.clamp(low, high))

    def vote_weights(self) -> tuple[Tensor, Tensor]:
        """Log-likelihood ratios ``log P(z | y=1) - log P(z | y=0)`` of a foreground vote
        (>= 0 for an informative rater) and of a background vote (<= 0)."""
        s, q = self.clamped()
        return torch.log(s) - torch.log1p(-q), torch.log1p(-s) - torch.log(q)

    def log_confidence(self, whole_table: bool = True) -> Tensor:
        """The confidence maps ``w = log P(z | y)`` ConP is given (Eq. 7): the whole
        log-likelihood table of a vote, ``log s, log(1 - s), log q, log(1 - q)`` per class,
        (B, M, 4K, H, W). The wrong-vote entries carry what tells a reliable rater from a very
        reliable one (``log(1 - q)`` is -4.6 at q = 0.99 and -6.9 at 0.999, where ``log q``
        barely moves); with the correct-vote entries alone (``whole_table=False``,
        (B, M, 2K, H, W)) ConP ignored the confidences (README: how we read the paper)."""
        s, q = self.clamped()
        if not whole_table:
            return torch.cat([torch.log(s), torch.log(q)], dim=2)
        return torch.cat([torch.log(s), torch.log1p(-s), torch.log(q), torch.log1p(-q)], dim=2)

    def rater_probabilities(self, calibrated: Tensor) -> Tensor:
        """Each rater's mask ``z~^m = P(z^m = 1)`` when the structure is ``calibrated``
        (B, K, H, W): ``s y~ + (1 - q)(1 - y~)``, shape (B, M, K, H, W)."""
        y = calibrated.unsqueeze(1)
        return self.sensitivity * y + (1.0 - self.specificity) * (1.0 - y)

    def permute(self, permutation: Tensor) -> Reliability:
        """Reorder the raters: rater ``m`` gets the reliability of ``permutation[m]``."""
        return Reliability(
            shuffle_raters(self.sensitivity, permutation),
            shuffle_raters(self.specificity, permutation),
        )

    def detach(self) -> Reliability:
        return Reliability(self.sensitivity.detach(), self.specificity.detach())

    def expand_as(self, labels: Tensor) -> Reliability:
        return Reliability(self.sensitivity.expand_as(labels), self.specificity.expand_as(labels))


def reliability_from_confidence(confidence: Tensor) -> Reliability:
    """A scalar confidence ``c`` in [0, 1] per rater/pixel -> sensitivity = specificity =
    ``(1 + c) / 2``: ``c = 0`` is a rater who says nothing (a coin), ``c = 1`` a perfect one.

    This is how Eq. 14's initial confidences (and inference's equal start) become reliabilities:
    read as ``s = q = c`` they would make every rater with ``c < 0.5`` vote against its label.
    """
    level = (1.0 + confidence.clamp(0.0, 1.0)) / 2.0
    return Reliability(level, level)


def _check_rater_shapes(sensitivity: Tensor, labels: Tensor) -> None:
    """Per-rater maps and rater masks are (B, M, K, H, W) with the same M."""
    if sensitivity.dim() != 5 or labels.dim() != 5:
        raise ValueError(
            "fusion expects (B, M, K, H, W) tensors; got reliability "
            f"{tuple(sensitivity.shape)} and labels {tuple(labels.shape)}"
        )
    if sensitivity.shape[1] != labels.shape[1]:
        raise ValueError(
            f"rater count mismatch: {sensitivity.shape[1]} reliability maps for "
            f"{labels.shape[1]} rater masks"
        )


def rater_weights(valid: Tensor | None, like: Tensor) -> Tensor | None:
    """(B, M) rater validity -> (B, M, 1, 1, 1) weights broadcastable to ``like``; None = all."""
    if valid is None:
        return None
    if valid.dim() != 2 or valid.shape[1] != like.shape[1]:
        raise ValueError(f"rater_valid must be (B, {like.shape[1]}), got {tuple(valid.shape)}")
    return valid.to(like.dtype).view(*valid.shape, *([1] * (like.dim() - 2)))


def fusion_logits(
    reliability: Reliability,
    labels: Tensor,
    prior: float = DEFAULT_PRIOR,
    valid: Tensor | None = None,
) -> Tensor:
    """Log-odds of the structure given the votes (see :func:`fuse`), shape (B, K, H, W)."""
    return weighted_vote_logits(*reliability.vote_weights(), labels, prior, valid)


def weighted_vote_logits(
    for_vote: Tensor,
    against_vote: Tensor,
    labels: Tensor,
    prior: float = DEFAULT_PRIOR,
    valid: Tensor | None = None,
) -> Tensor:
    """:func:`fusion_logits` from the vote weights of :meth:`Reliability.vote_weights`, for
    callers that fuse several label sets under weights computed once (the shuffle loss)."""
    _check_rater_shapes(for_vote, labels)
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be a probability in (0, 1), got {prior}")
    evidence = labels * for_vote + (1.0 - labels) * against_vote
    weights = rater_weights(valid, labels)
    if weights is not None:
        evidence = evidence * weights
    return evidence.sum(dim=1) + math.log(prior / (1.0 - prior))


def fuse(
    reliability: Reliability,
    labels: Tensor,
    prior: float = DEFAULT_PRIOR,
    valid: Tensor | None = None,
) -> Tensor:
    """Fuse rater labels under the raters' reliabilities (Eq. 1 / Eq. 4, ``y^fuse``).

    Args:
        reliability: each rater's sensitivity and specificity, (B, M, K, H, W) each (or
            broadcastable to ``labels``).
        labels: rater masks ``z`` in [0, 1] (binary or soft), shape (B, M, K, H, W).
        prior: ``p_u = P(y = 1)`` before any vote; 0.5 is uniform.
        valid: optional (B, M) 0/1 mask of the rater slots that hold a real annotation
            (pooled sites with different raters); other slots do not vote.

    Returns:
        Posterior foreground probability ``P(y = 1 | z^[M])``, shape (B, K, H, W).
    """
    return torch.sigmoid(fusion_logits(reliability, labels, prior, valid))


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
    reliability: Reliability,
    rater_probs: Tensor,
    prior: float = DEFAULT_PRIOR,
    straight_through: bool = False,
    valid: Tensor | None = None,
) -> Tensor:
    """Self-fusion ``y^self`` (Eq. 5 / Eq. 12): DivP's own thresholded rater masks
    ``T_0.5(z~)`` fused under ``reliability`` (pass shuffled reliabilities for Eq. 12).

    Returns:
        Fused foreground probability, shape (B, K, H, W).
    """
    return fuse(reliability, threshold(rater_probs, 0.5, straight_through), prior, valid)


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


def initial_reliability(
    num_raters: int,
    shape: tuple[int, int, int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Reliability:
    """Eq. 14's initial confidences as reliabilities (:func:`reliability_from_confidence`),
    each (1, M, K, H, W)."""
    confidence = initial_confidence(num_raters, shape, generator=generator, device=device)
    return reliability_from_confidence(confidence)


def shuffle_raters(x: Tensor, permutation: Tensor) -> Tensor:
    """Reorder the rater dimension (dim 1) of a (B, M, ...) tensor: ``x[:, permutation]``."""
    return x.index_select(1, permutation.to(x.device))
