"""Plain U-Net on the MrPrism encoder, trained on majority-vote labels (``unet_mv``).

The reference the benchmarks compare MrPrism with: same encoder, a plain UNet decoder without
attention or recurrence, one output per class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..fusion import majority_vote
from ..losses import bce_dice_loss
from .base import SegmentationModel, SegmentationOutput
from .blocks import UpBlock
from .config import MrPrismArch
from .encoder import ResNetEncoder

__all__ = ["UNetMV"]


class UNetMV(SegmentationModel):
    """Encoder-decoder trained with BCE + Dice on the raters' majority vote."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        arch: MrPrismArch,
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(build_args or {})
        self.arch = arch
        self.encoder = ResNetEncoder(
            in_channels, arch.stem_width, arch.encoder_widths, arch.encoder_depths
        )
        deep_to_shallow = self.encoder.channels[::-1]
        self.up = nn.ModuleList()
        cin = deep_to_shallow[0]
        for stage, width in enumerate(arch.conp_widths):
            self.up.append(UpBlock(cin, 0 if stage == 0 else deep_to_shallow[stage], width))
            cin = width
        self.head = nn.Conv2d(cin, num_classes, 1)

    def logits(self, images: Tensor) -> Tensor:
        skips = self.encoder(images)[::-1]
        x = skips[0]
        for stage, up in enumerate(self.up):
            x = up(x, None if stage == 0 else skips[stage])
        return self.head(x)

    def forward(self, images: Tensor) -> SegmentationOutput:
        prob = torch.sigmoid(self.logits(images))
        return SegmentationOutput(calibrated=prob, raters=None, recurrences=[prob])

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        target = majority_vote(batch["raters"], batch.get("rater_valid")).float()
        loss = bce_dice_loss(self.logits(batch["image"]), target)
        return loss, {"bce_dice": loss.item()}
