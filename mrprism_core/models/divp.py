"""DivP, the diverging prism: splits the calibrated mask into one mask per rater.

Stacked multi-head self-attention blocks over flattened patches of ``y~``. The first blocks
(the *trunk*) are shared by all sites; the last block has one attention head per rater, each
with its own projection, MLP and output layer (the *rater heads*), sized by M and kept at the
site. Each head predicts, per pixel and class, its rater's reliability (Proposition 1): the
sensitivity ``P(z = 1 | y = 1)`` and specificity ``P(z = 0 | y = 0)`` of that rater around the
calibrated mask. The rater's own mask follows from them and the calibrated mask
(:meth:`~mrprism_core.fusion.Reliability.rater_probabilities`), at full resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fusion import EQUAL_CONFIDENCE, Reliability, reliability_from_confidence
from .blocks import Attention, ConvNormAct, Mlp, PatchEmbed, sincos_position_encoding

__all__ = ["DivP", "DivPTrunk", "RaterHeads", "PixelContext"]


class SelfAttentionBlock(nn.Module):
    """Post-norm transformer block: x = LN(x + MHA(x, x, x)); x = LN(x + MLP(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.attention = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, position: Tensor) -> Tensor:
        qk = x + position
        x = self.norm1(x + self.attention(qk, qk, x))
        return self.norm2(x + self.mlp(x))


class DivPTrunk(nn.Module):
    """Patch embedding of ``y~`` plus the shared self-attention blocks."""

    def __init__(
        self, num_classes: int, dim: int, heads: Sequence[int], patch: int, mlp_ratio: int
    ) -> None:
        super().__init__()
        self.dim = dim
        self.embed = PatchEmbed(num_classes, dim, patch)
        self.blocks = nn.ModuleList(SelfAttentionBlock(dim, h, mlp_ratio) for h in heads)

    def forward(self, calibrated: Tensor) -> tuple[Tensor, tuple[int, int]]:
        tokens, grid = self.embed(calibrated)
        position = sincos_position_encoding(grid, self.dim, tokens)
        for block in self.blocks:
            tokens = block(tokens, position)
        return tokens, grid


#: Two maps per rater and class: sensitivity and specificity logits.
_RELIABILITY_MAPS = 2


class PixelContext(nn.Module):
    """Per-pixel corrections of every rater's mask logits from ConP's last decoder map and
    ``y~`` (both detached). Where a rater's habit depends on the image (e.g. drawing wider at
    low contrast), patch tokens of ``y~`` alone cannot tell. It changes the rater masks only,
    not the reliabilities the fusions use, and its output layer starts at zero. Part of the
    rater heads: it stays at the site."""

    def __init__(self, channels: int, num_classes: int, num_raters: int) -> None:
        super().__init__()
        self.num_raters = num_raters
        width = 2 * channels
        self.features = ConvNormAct(channels + num_classes, width)
        self.out = nn.Conv2d(width, num_raters * num_classes, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, decoded: Tensor, calibrated: Tensor) -> Tensor:
        """(B, C, H, W), (B, K, H, W) -> mask-logit corrections (B, M, K, H, W)."""
        x = self.out(self.features(torch.cat([decoded, calibrated], dim=1)))
        return x.unflatten(1, (self.num_raters, -1))


class RaterHeads(nn.Module):
    """The last DivP block: M attention heads, one per rater, each ending in its rater's
    sensitivity and specificity maps; optionally (``context_channels``) a
    :class:`PixelContext` that corrects the rater masks pixel by pixel.

    All heads run as one batched computation: the per-rater layers are grouped 1x1
    convolutions (``groups = M``), so M heads cost one kernel launch per layer.
    """

    def __init__(
        self,
        dim: int,
        num_raters: int,
        num_classes: int,
        patch: int,
        head_dim: int,
        mlp_ratio: int,
        context_channels: int = 0,
    ) -> None:
        super().__init__()
        self.num_raters = num_raters
        self.num_classes = num_classes
        self.patch = patch
        self.head_dim = head_dim
        raters = num_raters
        self.qkv = nn.Linear(dim, 3 * raters * head_dim)
        self.proj = nn.Conv1d(raters * head_dim, raters * dim, 1, groups=raters)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp_in = nn.Conv1d(raters * dim, raters * dim * mlp_ratio, 1, groups=raters)
        self.mlp_out = nn.Conv1d(raters * dim * mlp_ratio, raters * dim, 1, groups=raters)
        self.to_pixels = nn.Conv1d(
            raters * dim, raters * _RELIABILITY_MAPS * num_classes * patch * patch, 1, groups=raters
        )
        # start from equal reliabilities s = q = r (what inference starts from), not from
        # copying ConP; with DivP.forward's parametrisation that is q-logit logit(r) and
        # s-logit a where sigmoid(-a) = (1 - r) / r
        start = float(reliability_from_confidence(torch.tensor(EQUAL_CONFIDENCE)).sensitivity)
        bias = self.to_pixels.bias.detach().view(raters, _RELIABILITY_MAPS, -1)
        bias[:, 0] = -math.log((1.0 - start) / (start - (1.0 - start)))
        bias[:, 1] = math.log(start / (1.0 - start))
        self.pixel_context = (
            PixelContext(context_channels, num_classes, num_raters) if context_channels else None
        )

    def _layer_norm(self, x: Tensor) -> Tensor:
        """Per-rater LayerNorm over the token dimension of a (B, M*dim, T) tensor."""
        batch, channels, tokens = x.shape
        x = x.view(batch, self.num_raters, channels // self.num_raters, tokens)
        x = self.norm(x.transpose(2, 3)).transpose(2, 3)
        return x.reshape(batch, channels, tokens)

    def forward(self, tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """Args: shared tokens (B, T, dim); the (H, W) of ``y~``.

        Returns: reliability logits (B, M, 2, K, H, W): sensitivity, then specificity.
        """
        batch, count, dim = tokens.shape
        raters, head_dim = self.num_raters, self.head_dim
        qkv = self.qkv(tokens).view(batch, count, 3, raters, head_dim).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, M, T, hd)
        attended = attended.permute(0, 1, 3, 2).reshape(batch, raters * head_dim, count)
        residual = tokens.transpose(1, 2).repeat(1, raters, 1)  # (B, M*dim, T)
        x = self._layer_norm(residual + self.proj(attended))
        x = self._layer_norm(x + self.mlp_out(F.gelu(self.mlp_in(x))))
        pixels = self.to_pixels(x)  # (B, M*K*p*p, T)
        p, (gh, gw) = self.patch, grid
        maps = _RELIABILITY_MAPS * self.num_classes
        pixels = pixels.view(batch, raters, maps, p, p, gh, gw)
        pixels = pixels.permute(0, 1, 2, 5, 3, 6, 4).reshape(batch, raters, maps, gh * p, gw * p)
        height, width = size
        pixels = pixels[..., :height, :width]
        return pixels.reshape(batch, raters, _RELIABILITY_MAPS, self.num_classes, height, width)


class DivP(nn.Module):
    """``y~`` (B, K, H, W) probabilities -> each rater's :class:`Reliability` (B, M, K, H, W)."""

    def __init__(
        self,
        num_classes: int,
        num_raters: int,
        dim: int,
        heads: Sequence[int],
        patch: int,
        head_dim: int,
        mlp_ratio: int,
        context_channels: int = 0,
    ) -> None:
        super().__init__()
        self.trunk = DivPTrunk(num_classes, dim, heads, patch, mlp_ratio)
        self.heads = RaterHeads(
            dim, num_raters, num_classes, patch, head_dim, mlp_ratio, context_channels
        )

    def forward(self, calibrated: Tensor) -> Reliability:
        tokens, grid = self.trunk(calibrated)
        logits = self.heads(tokens, grid, tuple(calibrated.shape[-2:]))
        # q = P(z=0 | y=0) is free; s = 1 - q * sigmoid(-a) keeps s + q >= 1: a rater is never
        # read as adversarial (voting against what it sees), so unanimous votes keep their
        # label, yet any mix of missing (small s) and over-drawing (small q) can be expressed
        specificity = torch.sigmoid(logits[:, :, 1])
        sensitivity = 1.0 - specificity * torch.sigmoid(-logits[:, :, 0])
        return Reliability(sensitivity, specificity)

    def rater_masks(
        self, reliability: Reliability, calibrated: Tensor, decoded: Tensor | None = None
    ) -> Tensor:
        """Each rater's mask ``z~`` (B, M, K, H, W) implied by ``reliability`` around
        ``calibrated``, corrected pixel by pixel from ConP's decoder map ``decoded`` when this
        DivP was built with ``context_channels``."""
        masks = reliability.rater_probabilities(calibrated)
        context = self.heads.pixel_context
        if context is None:
            return masks
        if decoded is None:
            raise ValueError("this DivP corrects the rater masks from ConP's decoder map")
        return torch.sigmoid(torch.logit(masks, eps=1e-6) + context(decoded, calibrated))
