"""U-Net baselines on the MrPrism encoder: one fused label (majority vote or STAPLE) or one
output head per rater.

* ``unet_mv``: trained with BCE + Dice on the raters' majority vote;
* ``unet_staple``: the same on the STAPLE estimate (SimpleITK), computed once per case;
* ``multihead_unet``: one shared encoder-decoder and one 1x1 output head per rater, each head
  trained on its rater's masks; the heads stay at the site when federated. The calibrated
  output is the mean of the heads' probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..fusion import majority_vote, staple
from ..losses import bce_dice_loss, bce_dice_per_image, mean_over_annotated
from .base import SegmentationModel, SegmentationOutput
from .blocks import FullResolutionSkip, UpBlock
from .config import MrPrismArch
from .encoder import ResNetEncoder

__all__ = ["MultiHeadUNet", "UNetBackbone", "UNetMV", "UNetStaple", "per_rater_loss"]


class UNetBackbone(nn.Module):
    """ResNet encoder + plain U-Net decoder: full-resolution features (B, out_channels, H, W).

    ``forward(images, bottleneck=f)`` lets a model rewrite the deepest feature map before it
    is decoded (MRNet's expertise module sits there).
    """

    def __init__(self, in_channels: int, arch: MrPrismArch) -> None:
        super().__init__()
        self.encoder = ResNetEncoder.from_arch(in_channels, arch)
        deep_to_shallow = self.encoder.channels[::-1]
        self.up = nn.ModuleList()
        cin = deep_to_shallow[0]
        for stage, width in enumerate(arch.conp_widths):
            self.up.append(UpBlock(cin, 0 if stage == 0 else deep_to_shallow[stage], width))
            cin = width
        self.full_resolution = FullResolutionSkip.for_decoder(cin, deep_to_shallow)
        self.out_channels = cin
        self.bottleneck_channels = deep_to_shallow[0]

    def forward(
        self, images: Tensor, bottleneck: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        return self.decode(self.encoder(images), bottleneck)

    def decode(
        self, features: list[Tensor], bottleneck: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        """Decode the encoder's features (shallow to deep, as it returns them)."""
        skips = features[::-1]
        x = skips[0] if bottleneck is None else bottleneck(skips[0])
        for stage, up in enumerate(self.up):
            x = up(x, None if stage == 0 else skips[stage])
        if self.full_resolution is not None:
            x = self.full_resolution(x, skips[len(self.up)])
        return x


class UNetMV(SegmentationModel):
    """Encoder-decoder trained with BCE + Dice on one fused label (the majority vote)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        arch: MrPrismArch,
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(build_args or {})
        self.arch = arch
        self.backbone = UNetBackbone(in_channels, arch)
        self.head = nn.Conv2d(self.backbone.out_channels, num_classes, 1)

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def forward(self, images: Tensor) -> SegmentationOutput:
        prob = torch.sigmoid(self.logits(images))
        return SegmentationOutput(calibrated=prob, raters=None, recurrences=[prob])

    def target(self, batch: dict[str, Any]) -> Tensor:
        return majority_vote(batch["raters"], batch.get("rater_valid")).float()

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        loss = bce_dice_loss(self.logits(batch["image"]), self.target(batch))
        return loss, {"bce_dice": loss.item()}


class UNetStaple(UNetMV):
    """The same network trained on the raters' STAPLE estimate.

    STAPLE runs once per case (the first time a case is seen) and is kept in memory: the
    raters' masks of a case never change between epochs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._targets: dict[str, Tensor] = {}

    def target(self, batch: dict[str, Any]) -> Tensor:
        ids = batch.get("id")
        if ids is None:  # no case ids: nothing to key a cache on
            return staple(batch["raters"], batch.get("rater_valid")).float()
        missing = [i for i, case in enumerate(ids) if case not in self._targets]
        if missing:
            picked = torch.tensor(missing, device=batch["raters"].device)
            valid = batch.get("rater_valid")
            fused = staple(
                batch["raters"][picked], None if valid is None else valid[picked]
            ).float()
            for row, index in enumerate(missing):  # binary: kept as bool, 1 byte a pixel
                self._targets[ids[index]] = fused[row].bool().cpu()
        stacked = torch.stack([self._targets[case] for case in ids])
        return stacked.to(batch["raters"].device, torch.float32)


class MultiHeadUNet(SegmentationModel):
    """Shared encoder-decoder, one output head per rater (site-local)."""

    local_modules = ("rater_heads",)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_raters: int,
        arch: MrPrismArch,
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(build_args or {})
        self.arch = arch  # its preset's learning rate is the trainers' default
        self.backbone = UNetBackbone(in_channels, arch)
        self.rater_heads = nn.ModuleList(
            nn.Conv2d(self.backbone.out_channels, num_classes, 1) for _ in range(num_raters)
        )

    def rater_logits(self, images: Tensor) -> Tensor:
        features = self.backbone(images)
        return torch.stack([head(features) for head in self.rater_heads], dim=1)

    def forward(self, images: Tensor) -> SegmentationOutput:
        raters = torch.sigmoid(self.rater_logits(images))
        calibrated = raters.mean(dim=1)
        return SegmentationOutput(calibrated=calibrated, raters=raters, recurrences=[calibrated])

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        logits = self.rater_logits(batch["image"])
        loss = per_rater_loss(logits, batch["raters"].float(), batch.get("rater_valid"))
        return loss, {"bce_dice": loss.item()}


def per_rater_loss(logits: Tensor, masks: Tensor, valid: Tensor | None) -> Tensor:
    """BCE + Dice of each rater's output (B, M, K, H, W) against that rater's masks, averaged
    over the (case, rater) pairs that are annotated (empty slots of pooled sites train nothing)."""
    per_pair = torch.stack(
        [bce_dice_per_image(logits[:, m], masks[:, m]) for m in range(masks.shape[1])], dim=1
    )
    return mean_over_annotated(per_pair, valid)
