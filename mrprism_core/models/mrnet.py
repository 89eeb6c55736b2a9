"""MRNet (paper 003, Ji et al., CVPR 2021), written from its method section.

* **Expertise-aware inferring module (EIM)**: a ConvLSTM over the U-Net bottleneck feature
  whose initial hidden state is the raters' expertness vector V (T = 2 steps). V is embedded
  into the feature's channels by a linear map; that map is sized by the rater count, so it is
  site-local when federated.
* **Soft label** (Eq. 1): GT_soft = sum_i V_i S_i, with V drawn each step by one of three
  strategies in turn: uniform (majority-vote mode), one random rater, random weights. At
  inference V is uniform.
* **Multi-rater reconstruction module (MRM)**: an encoder-decoder over image + coarse
  prediction P1 (with its own EIM) that reconstructs every rater's mask (one 1x1 output per
  rater, site-local); the same network on image + GT_soft gives the consistency loss between
  the two inputs' encoder features. The uncertainty map is the raters' standard deviation.
* **Multi-rater perception module (MPM)**: soft spatial attention (Eq. 4: the max of a
  learnable Gaussian blur and the map itself) from each class's uncertainty and coarse
  prediction, F~_j = F1 + Soft(A_j) * F1, concatenated into a 1x1 convolution (Eq. 5, 6).
* Loss (Eq. 7): BCE(P1, GT_soft) + BCE(M, GT_soft) + alpha loss_con + (1 - alpha) loss_rec,
  alpha = 0.7.

Departures: the MRM encoder is this project's ResNet-style encoder (the paper uses VGG16);
the Gaussian kernel's size is fixed (1/8 of the image side, odd) and only its width learns.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import mean_over_annotated
from .base import SegmentationModel, SegmentationOutput
from .config import MrPrismArch
from .unet import UNetBackbone

__all__ = ["MRNet"]


class ConvLSTMCell(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gates = nn.Conv2d(2 * channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor, hidden: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        i, f, o, g = self.gates(torch.cat([x, hidden], dim=1)).chunk(4, dim=1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cell), cell


class ExpertiseModule(nn.Module):
    """EIM: T ConvLSTM steps over a feature map, starting from the expertness state."""

    def __init__(self, channels: int, steps: int = 2) -> None:
        super().__init__()
        self.cell = ConvLSTMCell(channels)
        self.steps = steps

    def forward(self, feature: Tensor, expertise: Tensor) -> Tensor:
        hidden = expertise[:, :, None, None].expand_as(feature)
        cell = torch.zeros_like(feature)
        for _ in range(self.steps):
            hidden, cell = self.cell(feature, hidden, cell)
        return hidden


class SoftAttention(nn.Module):
    """Eq. 4: max(Gaussian blur of the map, the map), the blur's width learnable."""

    def __init__(self, kernel: int, sigma: float) -> None:
        super().__init__()
        self.kernel = kernel | 1
        self.log_sigma = nn.Parameter(torch.tensor(float(sigma)).log())

    def forward(self, attention: Tensor) -> Tensor:
        offsets = torch.arange(self.kernel, device=attention.device) - self.kernel // 2
        weights = torch.exp(-(offsets.float() ** 2) / (2 * self.log_sigma.exp() ** 2))
        weights = weights / weights.sum()
        channels = attention.shape[1]
        pad = self.kernel // 2
        row = weights.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
        blurred = F.conv2d(F.pad(attention, (pad, pad, 0, 0)), row, groups=channels)
        column = weights.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        blurred = F.conv2d(F.pad(blurred, (0, 0, pad, pad)), column, groups=channels)
        return torch.maximum(blurred, attention)


class MRNet(SegmentationModel):
    """MRNet with its site-local parts: ``expertise``, ``mrm_expertise`` (embed V) and
    ``reconstruction_heads`` (one output per rater)."""

    local_modules = ("expertise", "mrm_expertise", "reconstruction_heads")

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_raters: int,
        image_size: int,
        arch: MrPrismArch,
        *,
        alpha: float = 0.7,
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(build_args or {})
        self.arch = arch  # its preset's learning rate is the trainers' default
        self.num_classes, self.num_raters, self.alpha = num_classes, num_raters, alpha
        self.backbone = UNetBackbone(in_channels, arch)
        width = self.backbone.out_channels
        self.eim = ExpertiseModule(self.backbone.bottleneck_channels)
        self.expertise = nn.Linear(num_raters, self.backbone.bottleneck_channels, bias=False)
        self.coarse_head = nn.Conv2d(width, num_classes, 1)
        self.mrm = UNetBackbone(in_channels + num_classes, arch)
        self.mrm_eim = ExpertiseModule(self.mrm.bottleneck_channels)
        self.mrm_expertise = nn.Linear(num_raters, self.mrm.bottleneck_channels, bias=False)
        self.reconstruction_heads = nn.Conv2d(self.mrm.out_channels, num_raters * num_classes, 1)
        self.soften = SoftAttention(max(3, image_size // 8), max(1.0, image_size / 64))
        self.fine_head = nn.Conv2d(2 * num_classes * width, num_classes, 1)
        self._strategy = 0

    # --- pieces -------------------------------------------------------------------------
    def expertness(self, batch_size: int, valid: Tensor | None, device: torch.device) -> Tensor:
        """V (B, M), summing to 1 over the annotated raters, by the strategy of this step."""
        mask = (
            torch.ones(batch_size, self.num_raters, device=device)
            if valid is None
            else valid.float()
        )
        if not self.training:
            weights = mask
        else:
            strategy, self._strategy = self._strategy, (self._strategy + 1) % 3
            if strategy == 0:  # majority-vote mode
                weights = mask
            elif strategy == 1:  # one random annotated rater
                pick = torch.multinomial(mask + 1e-9, 1)
                weights = torch.zeros_like(mask).scatter_(1, pick, 1.0)
            else:  # random weights
                weights = torch.rand_like(mask) * mask
        return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)

    def _reconstruct(
        self, images: Tensor, mask: Tensor, expertise: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """MRM on image + mask: per-rater logits (B, M, K, H, W) and the encoder features."""
        inputs = torch.cat([images, mask], dim=1)
        features = self.mrm.encoder(inputs)
        state = self.mrm_expertise(expertise)
        decoded = self.mrm.decode(features, bottleneck=lambda f: self.mrm_eim(f, state))
        logits = self.reconstruction_heads(decoded)
        shape = (logits.shape[0], self.num_raters, self.num_classes, *logits.shape[-2:])
        return logits.view(shape), features

    def _run(self, images: Tensor, expertise: Tensor) -> dict[str, Any]:
        state = self.expertise(expertise)
        features = self.backbone(images, bottleneck=lambda f: self.eim(f, state))
        coarse = self.coarse_head(features)
        coarse_prob = torch.sigmoid(coarse)
        rater_logits, mrm_features = self._reconstruct(images, coarse_prob, expertise)
        uncertainty = torch.sigmoid(rater_logits).std(dim=1, unbiased=False)  # Eq. 3
        attention = self.soften(torch.cat([uncertainty, coarse_prob], dim=1))
        branches = [
            features + attention[:, j : j + 1] * features for j in range(attention.shape[1])
        ]
        fine = self.fine_head(torch.cat(branches, dim=1))
        return {
            "coarse": coarse,
            "fine": fine,
            "raters": rater_logits,
            "mrm_features": mrm_features,
        }

    # --- model API ------------------------------------------------------------------------
    def forward(self, images: Tensor) -> SegmentationOutput:
        expertise = self.expertness(images.shape[0], None, images.device)
        out = self._run(images, expertise)
        calibrated = torch.sigmoid(out["fine"])
        return SegmentationOutput(
            calibrated=calibrated,
            raters=torch.sigmoid(out["raters"]),
            recurrences=[torch.sigmoid(out["coarse"]), calibrated],
        )

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        images, masks = batch["image"], batch["raters"].float()
        valid = batch.get("rater_valid")
        expertise = self.expertness(images.shape[0], valid, images.device)
        target = (masks * expertise[:, :, None, None, None]).sum(dim=1)  # Eq. 1
        out = self._run(images, expertise)
        coarse_loss = F.binary_cross_entropy_with_logits(out["coarse"], target)
        fine_loss = F.binary_cross_entropy_with_logits(out["fine"], target)
        soft_rater_logits, soft_features = self._reconstruct(images, target, expertise)
        rec_terms = []
        for logits in (out["raters"], soft_rater_logits):
            per_pixel = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
            rec_terms.append(mean_over_annotated(per_pixel.flatten(2).mean(-1), valid))
        rec_loss = torch.stack(rec_terms).mean()
        con_loss = torch.stack(
            [0.5 * (a - b).pow(2).mean() for a, b in zip(out["mrm_features"], soft_features)]
        ).mean()
        loss = coarse_loss + fine_loss + self.alpha * con_loss + (1 - self.alpha) * rec_loss
        return loss, {
            "coarse_bce": coarse_loss.item(),
            "fine_bce": fine_loss.item(),
            "consistency": con_loss.item(),
            "reconstruction": rec_loss.item(),
        }
