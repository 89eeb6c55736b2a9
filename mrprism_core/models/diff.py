"""DiFF (paper 002, Wu et al., diagnosis-first fusion), written from its method section.

DiFF needs a diagnosis label per case (e.g. glaucoma for fundus images): the fused training
target (DF-GT) is the rater-weighted mask that a diagnosis network finds most diagnostic.
Where a data set has no diagnosis label, DiFF is not applicable and says so.

* A diagnosis network (image + mask -> logit) learns the diagnosis from the raters' mean mask.
* DF-GT (Eq. 2-5): per-case expertness maps m (softmax over raters), DF-GT = sum_i s_i * m_i;
  m is found by a few gradient steps that minimise the frozen diagnosis network's loss on
  image + DF-GT. The paper keeps the maps smooth with a small coordinate network (ExpG); here
  they are smooth by construction: a coarse grid (``fusion_grid`` x ``fusion_grid`` per rater)
  upsampled bilinearly.
* The segmentation network learns DF-GT with BCE (Eq. 1). The paper's Take-and-Give attention
  between the diagnosis and segmentation networks is not implemented: the segmentation network
  is the plain U-Net of the other baselines.

Nothing in DiFF is sized by the rater count, so all of it is shared when federated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics import soft_truth
from .base import SegmentationModel, SegmentationOutput
from .blocks import DownStack
from .config import MrPrismArch
from .unet import UNetBackbone

__all__ = ["DiFF", "DiagnosisNotAvailable", "diagnosis_first_fusion"]


class DiagnosisNotAvailable(ValueError):
    """DiFF was asked to train on cases without a diagnosis label."""


def diagnosis_first_fusion(
    diagnose: Any,
    images: Tensor,
    masks: Tensor,
    diagnosis: Tensor,
    valid: Tensor | None = None,
    *,
    grid: int = 8,
    steps: int = 5,
    lr: float = 1.0,
) -> Tensor:
    """DF-GT (B, K, H, W): the raters' masks (B, M, K, H, W) weighted per pixel by expertness
    maps that minimise ``diagnose``'s loss for the true ``diagnosis`` (B,).

    Only the expertness maps are optimised; the diagnosis network's parameters get no
    gradient from here.
    """
    batch, raters = masks.shape[:2]
    logits = torch.zeros(batch, raters, grid, grid, device=masks.device, requires_grad=True)
    blocked = None if valid is None else (valid[:, :, None, None] <= 0)

    def fused_from(maps_logits: Tensor) -> Tensor:
        upsampled = F.interpolate(
            maps_logits, size=masks.shape[-2:], mode="bilinear", align_corners=False
        )
        if blocked is not None:
            upsampled = upsampled.masked_fill(blocked, float("-inf"))
        weights = torch.softmax(upsampled, dim=1)  # over raters, per pixel
        return (weights[:, :, None] * masks).sum(dim=1)

    with torch.enable_grad():
        for _ in range(steps):
            fused = fused_from(logits)
            loss = F.binary_cross_entropy_with_logits(
                diagnose(torch.cat([images, fused], dim=1)), diagnosis
            )
            (gradient,) = torch.autograd.grad(loss, logits)
            logits = (logits - lr * gradient).detach().requires_grad_(True)
    return fused_from(logits.detach()).detach()


class DiagnosisNet(nn.Module):
    """Image + mask -> diagnosis logit (a small CNN)."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.features = DownStack(in_channels, widths)
        self.out = nn.Linear(self.features.out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x).mean(dim=(2, 3))).squeeze(1)


class DiFF(SegmentationModel):
    """U-Net trained on DF-GT, with the diagnosis network that defines it."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        arch: MrPrismArch,
        *,
        fusion_grid: int = 8,
        fusion_steps: int = 5,
        fusion_lr: float = 1.0,
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(build_args or {})
        self.arch = arch  # its preset's learning rate is the trainers' default
        self.backbone = UNetBackbone(in_channels, arch)
        self.head = nn.Conv2d(self.backbone.out_channels, num_classes, 1)
        self.diagnoser = DiagnosisNet(in_channels + num_classes, tuple(arch.encoder_widths[:3]))
        self.fusion_grid, self.fusion_steps, self.fusion_lr = fusion_grid, fusion_steps, fusion_lr

    def forward(self, images: Tensor) -> SegmentationOutput:
        prob = torch.sigmoid(self.head(self.backbone(images)))
        return SegmentationOutput(calibrated=prob, raters=None, recurrences=[prob])

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        if "diagnosis" not in batch:
            raise DiagnosisNotAvailable(
                "diff needs a diagnosis label per case (sample key 'diagnosis'); this data "
                "set has none, so DiFF is not applicable to it"
            )
        images, masks = batch["image"], batch["raters"].float()
        valid, diagnosis = batch.get("rater_valid"), batch["diagnosis"].float()
        diagnosis_loss = F.binary_cross_entropy_with_logits(
            self.diagnoser(torch.cat([images, soft_truth(masks, valid)], dim=1)), diagnosis
        )
        frozen = {k: v.detach() for k, v in self.diagnoser.named_parameters()}

        def diagnose(x: Tensor) -> Tensor:
            return torch.func.functional_call(self.diagnoser, frozen, (x,))

        target = diagnosis_first_fusion(
            diagnose,
            images,
            masks,
            diagnosis,
            valid,
            grid=self.fusion_grid,
            steps=self.fusion_steps,
            lr=self.fusion_lr,
        )
        segmentation_loss = F.binary_cross_entropy_with_logits(
            self.head(self.backbone(images)), target
        )
        loss = segmentation_loss + diagnosis_loss
        return loss, {"segmentation": segmentation_loss.item(), "diagnosis": diagnosis_loss.item()}
