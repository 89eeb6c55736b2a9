"""ConP, the converging prism: a UNet decoder whose five stages attend from the raters'
confidence embedding (query) to the segmentation features (key, value), Eq. 7."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (
    Attention,
    FullResolutionSkip,
    Mlp,
    PatchEmbed,
    PatchUnembed,
    UpBlock,
    sincos_position_encoding,
)

__all__ = ["ConP", "ConfidenceAttention"]

#: Foreground probability ConP starts from (segmented structures are a small part of an image).
INITIAL_FOREGROUND = 0.05


class ConfidenceAttention(nn.Module):
    """One attention stage of ConP over flattened patches.

    ``f_bar = Attention(w_e + E_w, f + E_f, f)``, then residual + LayerNorm, MLP, residual +
    LayerNorm; the tokens are mapped back to the feature map and added to it.
    """

    def __init__(
        self, channels: int, confidence_width: int, dim: int, heads: int, patch: int, mlp_ratio: int
    ) -> None:
        super().__init__()
        self.dim = dim
        self.feature_tokens = PatchEmbed(channels, dim, patch)
        self.confidence_tokens = PatchEmbed(confidence_width, dim, patch)
        self.attention = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.unembed = PatchUnembed(dim, channels, patch)

    def forward(self, features: Tensor, confidence: Tensor) -> Tensor:
        tokens, grid = self.feature_tokens(features)
        query, _ = self.confidence_tokens(confidence)
        position = sincos_position_encoding(grid, self.dim, tokens)
        # the residual runs through the query (as in a transformer decoder), so the raters'
        # confidences reach the decoder directly and not only through the attention weights
        x = self.norm1(query + self.attention(query + position, tokens + position, tokens))
        x = self.norm2(x + self.mlp(x))
        return features + self.unembed(x, grid, features.shape[-2:])


class ConP(nn.Module):
    """Decoder from the encoder features to K calibrated-mask logits at full resolution.

    Args:
        encoder_channels: channels of the encoder features, shallow to deep (5 values, or 6
            with a full-resolution map first).
        widths: channels after each stage's deconvolution, deep to shallow (5 values).
        patch_sizes: attention patch per stage, deep to shallow.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        widths: Sequence[int],
        patch_sizes: Sequence[int],
        confidence_width: int,
        dim: int,
        heads: int,
        mlp_ratio: int,
        num_classes: int,
        confidence_head: bool = False,
    ) -> None:
        super().__init__()
        self.confidence_head = confidence_head
        deep_to_shallow = list(encoder_channels)[::-1]
        self.attention = nn.ModuleList()
        self.up = nn.ModuleList()
        cin = deep_to_shallow[0]
        for stage, (width, patch) in enumerate(zip(widths, patch_sizes)):
            skip = 0 if stage == 0 else deep_to_shallow[stage]
            self.attention.append(
                ConfidenceAttention(cin, confidence_width, dim, heads, patch, mlp_ratio)
            )
            self.up.append(UpBlock(cin, skip, width))
            cin = width
        self.full_resolution = FullResolutionSkip.for_decoder(cin, deep_to_shallow)
        # the output layer may also see the finest confidence embedding, pixel by pixel, so
        # the raters' reliabilities can move a boundary directly
        extra = confidence_width if confidence_head else 0
        self.out_channels = cin
        self.head = nn.Conv2d(cin + extra, num_classes, 1)
        # Start from a low foreground probability ("prior" initialisation): SSIM's luminance
        # term gives almost no gradient once a background window drifts far from 0, so a
        # decoder that starts at 0.5 everywhere barely learns the background.
        nn.init.constant_(self.head.bias, math.log(INITIAL_FOREGROUND / (1 - INITIAL_FOREGROUND)))

    def forward(self, features: Sequence[Tensor], confidence: Sequence[Tensor]) -> Tensor:
        """Args: encoder features shallow to deep; confidence pyramid deep to shallow.

        Returns: logits (B, K, H, W).
        """
        return self.output(self.decode(features, confidence), confidence)

    def decode(self, features: Sequence[Tensor], confidence: Sequence[Tensor]) -> Tensor:
        """The decoder's last, full-resolution feature map (B, ``widths[-1]``, H, W)."""
        skips = list(features)[::-1]
        x = skips[0]
        for stage, (attend, up) in enumerate(zip(self.attention, self.up)):
            x = attend(x, confidence[stage])
            x = up(x, None if stage == 0 else skips[stage])
        if self.full_resolution is not None:
            x = self.full_resolution(x, skips[len(self.up)])
        return x

    def output(self, decoded: Tensor, confidence: Sequence[Tensor]) -> Tensor:
        """Logits (B, K, H, W) from :meth:`decode`'s map (and the finest confidences)."""
        if self.confidence_head:
            finest = F.interpolate(confidence[-1], size=decoded.shape[-2:], mode="nearest")
            decoded = torch.cat([decoded, finest], dim=1)
        return self.head(decoded)
