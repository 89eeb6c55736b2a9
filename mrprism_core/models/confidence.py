"""Embedding of the raters' confidence maps: the query of every ConP attention stage.

Sites have different rater counts, so the shared weights must not depend on M: every rater's
map goes through the same separable convolutions and the results are averaged over raters.
What tells raters apart is a small learned identity vector per rater (``rater_identity``),
which is sized by M and therefore stays at the site.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConfidenceEmbedding"]


class _SeparableDown(nn.Module):
    """Depth-wise 2x2 stride-2 conv (halves the size) then point-wise conv (mixes channels).

    No normalisation on purpose: a flat confidence map (Eq. 14 gives one level per rater)
    would be normalised to zero and ConP could no longer tell 0.2 from 0.9.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 2, 2, groups=channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.pointwise(self.depthwise(x)))


class ConfidenceEmbedding(nn.Module):
    """Confidence maps (B, M, C, H, W) -> a pyramid of embeddings at strides 2^levels..2.

    ``C`` is 4K for MrPrism: the log-likelihood table ``w = log P(z | y)`` of a vote on the
    structure and on the background for each class (:meth:`Reliability.log_confidence`).

    The per-rater part runs at stride 2 (the finest level ConP attends at): a 2x2 stride-2
    convolution embeds each rater's map (the separable conv's depth-wise down-sampling and
    point-wise deepening in one step, since K is tiny), the rater identity is added, a point-wise
    conv mixes, and the raters are averaged. Working at half resolution keeps the M-fold
    per-rater tensors 4x smaller than at full resolution.

    Args:
        maps_per_rater: C.
        num_raters: M (only the rater identities depend on it).
        width: embedding channels E.
        levels: number of pyramid levels (ConP stages); level ``i`` has stride ``2^(levels-i)``.
    """

    def __init__(self, maps_per_rater: int, num_raters: int, width: int, levels: int = 5) -> None:
        super().__init__()
        self.num_raters = num_raters
        # raters ride along as the depth axis of 3-D convolutions with depth-1 kernels: one set
        # of weights for every rater, and the batch axis stays the batch (per-sample gradients
        # for DP-SGD need that)
        self.embed = nn.Conv3d(maps_per_rater, width, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.rater_identity = nn.Embedding(num_raters, width)
        self.pointwise_mix = nn.Conv3d(width, width, 1)
        self.down = nn.ModuleList(_SeparableDown(width) for _ in range(levels - 1))

    def forward(self, confidence: Tensor) -> list[Tensor]:
        """Returns ``levels`` maps (B, E, H/2^s, W/2^s), deepest first."""
        batch, raters = confidence.shape[:2]
        if raters != self.num_raters:
            raise ValueError(
                f"got {raters} confidence maps for a model of {self.num_raters} raters"
            )
        x = self.embed(confidence.transpose(1, 2))  # (B, E, M, H/2, W/2)
        rater_ids = torch.arange(raters, device=confidence.device).expand(batch, raters)
        identity = self.rater_identity(rater_ids)  # (B, M, E)
        x = x + identity.transpose(1, 2)[..., None, None]
        x = self.pointwise_mix(F.gelu(x)).mean(dim=2)
        pyramid = [x]
        for down in self.down:
            x = down(x)
            pyramid.append(x)
        return pyramid[::-1]
