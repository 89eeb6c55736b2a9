"""ResNet-34-like CNN encoder with GroupNorm."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvNormAct, group_norm
from .config import MrPrismArch

__all__ = ["ResNetEncoder"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual shortcut (ResNet-18/34 block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = group_norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), group_norm(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """Stem (stride 2) + max-pool + four residual stages (strides 4, 8, 16, 32).

    ``forward`` returns the five feature maps from shallow to deep; the last one is ``f_0``.
    With ``full_resolution_width`` a sixth, full-resolution map (one 3x3 conv of the image)
    comes first. ``channels`` lists their channel counts in the same order.
    """

    def __init__(
        self,
        in_channels: int,
        stem_width: int,
        widths: Sequence[int],
        depths: Sequence[int],
        full_resolution_width: int = 0,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError(f"encoder needs 4 stage widths and depths, got {widths} / {depths}")
        self.stem = ConvNormAct(in_channels, stem_width, kernel=7, stride=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages = []
        cin = stem_width
        for index, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock(cin, width, 1 if index == 0 else 2)]
            blocks += [BasicBlock(width, width, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.channels = [stem_width, *widths]
        self.full_resolution = None
        if full_resolution_width:  # created last: the other layers' initial weights stay
            self.full_resolution = ConvNormAct(in_channels, full_resolution_width)
            self.channels.insert(0, full_resolution_width)

    @classmethod
    def from_arch(cls, in_channels: int, arch: MrPrismArch) -> ResNetEncoder:
        """The encoder an architecture preset describes."""
        return cls(
            in_channels,
            arch.stem_width,
            arch.encoder_widths,
            arch.encoder_depths,
            arch.full_resolution_width,
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [] if self.full_resolution is None else [self.full_resolution(x)]
        x = self.stem(x)
        features.append(x)
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
