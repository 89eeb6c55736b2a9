"""MrPrism: encoder + ConP + DivP run in recurrence (Algorithm 1 of paper 000)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..fusion import fuse, initial_confidence
from ..losses import (
    MrPrismLossConfig,
    multihead_loss,
    random_permutations,
    recurrence_loss,
    shuffle_loss,
)
from .base import SegmentationModel, SegmentationOutput
from .confidence import ConfidenceEmbedding
from .config import MrPrismArch
from .conp import ConP
from .divp import DivP
from .encoder import ResNetEncoder

__all__ = ["MrPrism"]

#: Confidence every rater gets at inference before DivP has spoken ("equal confidence").
EVAL_INITIAL_CONFIDENCE = 0.5


class MrPrism(SegmentationModel):
    """Self-calibrated multi-rater segmentation.

    Training (``loss``): the encoder runs once; for ``i = 1..tau`` ConP predicts ``y~_i`` from
    the features and the confidences ``w_{i-1}`` (``w_0`` from Eq. 14, drawn once per batch),
    DivP splits it into ``z~_i``, and ``w_i = log z~_i`` (detached) feeds the next recurrence.
    Inference (``forward``): the same, starting from equal confidences, plus one last ConP pass
    so that ``recurrences`` holds rec0 ... rec_tau as in Table 1.
    """

    local_modules = ("confidence.rater_identity", "divp.heads")

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_raters: int,
        arch: MrPrismArch,
        loss_config: MrPrismLossConfig | None = None,
        local_modules: Sequence[str] | None = None,
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(build_args or {})
        self.num_classes = num_classes
        self.num_raters = num_raters
        self.arch = arch
        self.loss_config = loss_config or MrPrismLossConfig()
        if local_modules is not None:
            self.local_modules = tuple(local_modules)
        self.encoder = ResNetEncoder(
            in_channels, arch.stem_width, arch.encoder_widths, arch.encoder_depths
        )
        self.confidence = ConfidenceEmbedding(
            num_classes, num_raters, arch.confidence_width, levels=len(arch.conp_widths)
        )
        self.conp = ConP(
            self.encoder.channels,
            arch.conp_widths,
            arch.conp_patch_sizes,
            arch.confidence_width,
            arch.conp_dim,
            arch.conp_heads,
            arch.mlp_ratio,
            num_classes,
        )
        self.divp = DivP(
            num_classes,
            num_raters,
            arch.divp_dim,
            arch.divp_heads,
            arch.divp_patch_size,
            arch.rater_head_dim,
            arch.mlp_ratio,
        )

    def recurrence(self, features: Sequence[Tensor], confidence: Tensor) -> tuple[Tensor, Tensor]:
        """One ConP -> DivP pass.

        Args:
            features: encoder features (computed once per batch).
            confidence: ``exp(w)``, (B, M, K, H, W).

        Returns:
            ``(y~, z~)``: calibrated probabilities (B, K, H, W) and rater probabilities
            (B, M, K, H, W). DivP sees ``y~`` detached: each prism learns only from its own
            target (Eq. 6).
        """
        calibrated = torch.sigmoid(self.conp(features, self.confidence(confidence)))
        return calibrated, self.divp(calibrated.detach())

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"image sides must be multiples of 32, got {tuple(images.shape[-2:])}")

    def forward(self, images: Tensor, recurrences: int | None = None) -> SegmentationOutput:
        self._check_images(images)
        steps = self.arch.recurrences if recurrences is None else recurrences
        batch, _, height, width = images.shape
        features = self.encoder(images)
        confidence = images.new_full(
            (batch, self.num_raters, self.num_classes, height, width), EVAL_INITIAL_CONFIDENCE
        )
        maps = []
        for _ in range(steps):
            calibrated, rater_probs = self.recurrence(features, confidence)
            maps.append(calibrated)
            confidence = rater_probs.detach()
        calibrated, rater_probs = self.recurrence(features, confidence)
        maps.append(calibrated)
        return SegmentationOutput(calibrated=calibrated, raters=rater_probs, recurrences=maps)

    def _check_labels(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
        images, labels = batch["image"], batch["raters"]
        self._check_images(images)
        if labels.dim() != 5 or labels.shape[1] != self.num_raters:
            raise ValueError(
                f"rater masks must be (B, {self.num_raters}, K, H, W) for this model, "
                f"got {tuple(labels.shape)}"
            )
        return images, labels, batch.get("rater_valid")

    def _recurrence_losses(
        self, features: Sequence[Tensor], labels: Tensor, valid: Tensor | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(L_rec^i + zeta L_sff^i, detached parts)`` for i = 1..tau (Eq. 13).

        ``valid`` (B, M) marks the rater slots with an annotation (pooled data); the others
        neither vote in the fusions nor supervise their head."""
        cfg = self.loss_config
        confidence = initial_confidence(
            self.num_raters, tuple(labels.shape[2:]), device=labels.device
        ).expand_as(labels)
        for _ in range(self.arch.recurrences):
            calibrated, rater_probs = self.recurrence(features, confidence)
            target = fuse(confidence, labels, cfg.prior, valid)
            conp_term, divp_term = recurrence_loss(
                calibrated, target, rater_probs, cfg.ssim_window, cfg.prior, valid
            )
            if cfg.divp_supervision == "shuffle":
                permutations = random_permutations(self.num_raters, cfg.shuffles)
                rater_term = shuffle_loss(rater_probs, labels, permutations, cfg.prior, valid)
            else:
                rater_term = multihead_loss(rater_probs, labels, valid)
            parts = torch.stack([conp_term, divp_term, rater_term]).detach()
            yield conp_term + divp_term + cfg.zeta * rater_term, parts
            confidence = rater_probs.detach()

    @staticmethod
    def _named_parts(parts: Sequence[Tensor]) -> dict[str, float]:
        conp, divp, raters = torch.stack(list(parts)).sum(dim=0).tolist()  # one device sync
        return {"conp": conp, "divp": divp, "divp_raters": raters}

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Total loss of Eq. 13 over ``tau`` recurrences, and its parts (floats) for logging."""
        images, labels, valid = self._check_labels(batch)
        losses, parts = zip(*self._recurrence_losses(self.encoder(images), labels, valid))
        return torch.stack(losses).sum(), self._named_parts(parts)

    def backward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Gradients of :meth:`loss`, back-propagating each recurrence as soon as its loss is
        known: only one recurrence's graph is alive at a time. The encoder runs once; its
        feature gradients are collected on detached leaves and pushed through it at the end."""
        images, labels, valid = self._check_labels(batch)
        features = self.encoder(images)
        leaves = [f.detach().requires_grad_() for f in features]
        losses, parts = [], []
        for loss, part in self._recurrence_losses(leaves, labels, valid):
            loss.backward()
            losses.append(loss.detach())
            parts.append(part)
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        torch.autograd.backward(features, grads)
        return torch.stack(losses).sum(), self._named_parts(parts)
