"""MrPrism: encoder + ConP + DivP run in recurrence (Algorithm 1 of paper 000)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..fusion import (
    EQUAL_CONFIDENCE,
    Reliability,
    fuse,
    initial_reliability,
    reliability_from_confidence,
)
from ..losses import (
    MrPrismLossConfig,
    multihead_loss,
    random_permutations,
    recurrence_loss,
    scale_gradient,
    shuffle_loss,
)
from .base import SegmentationModel, SegmentationOutput
from .confidence import ConfidenceEmbedding
from .config import MrPrismArch
from .conp import ConP
from .divp import DivP
from .encoder import ResNetEncoder

__all__ = ["MrPrism"]


class MrPrism(SegmentationModel):
    """Self-calibrated multi-rater segmentation.

    Training (``loss``): the encoder runs once; for ``i = 1..tau`` ConP predicts ``y~_i`` from
    the features and the confidences ``w_{i-1} = log P(z | y)`` (``w_0`` from Eq. 14, drawn
    once per batch), DivP estimates every rater's reliability around ``y~_i`` (hence ``w_i``
    and the rater masks ``z~_i``), and ``w_i`` (detached) feeds the next recurrence.
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
        self.encoder = ResNetEncoder.from_arch(in_channels, arch)
        self.confidence = ConfidenceEmbedding(
            (4 if arch.conp_whole_likelihood else 2) * num_classes,
            num_raters,
            arch.confidence_width,
            levels=len(arch.conp_widths),
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
            arch.conp_confidence_head,
        )
        self.divp = DivP(
            num_classes,
            num_raters,
            arch.divp_dim,
            arch.divp_heads,
            arch.divp_patch_size,
            arch.rater_head_dim,
            arch.mlp_ratio,
            self.conp.out_channels if arch.divp_pixel_context else 0,
        )

    def recurrence(
        self, features: Sequence[Tensor], reliability: Reliability
    ) -> tuple[Tensor, Reliability, Tensor]:
        """One ConP -> DivP pass.

        Args:
            features: encoder features (computed once per batch).
            reliability: the raters' reliabilities ConP is given, (B, M, K, H, W) each.

        Returns:
            ``(y~, reliability, z~)``: calibrated probabilities (B, K, H, W), DivP's new
            reliabilities and the rater masks they imply (B, M, K, H, W; with
            ``divp_pixel_context`` corrected from ConP's decoder map). DivP sees ``y~`` and
            that map detached: each prism learns only from its own target (Eq. 6).
        """
        embedded = self.confidence(reliability.log_confidence(self.arch.conp_whole_likelihood))
        decoded = self.conp.decode(features, embedded)
        calibrated = torch.sigmoid(self.conp.output(decoded, embedded))
        seen = calibrated.detach()
        new_reliability = self.divp(seen)
        # same values; the masks' losses reach the reliabilities at the configured share only
        share = self.loss_config.rater_mask_reliability_grad
        mask_reliability = Reliability(*(scale_gradient(r, share) for r in new_reliability))
        rater_masks = self.divp.rater_masks(mask_reliability, seen, decoded.detach())
        return calibrated, new_reliability, rater_masks

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
        reliability = reliability_from_confidence(
            images.new_full(
                (batch, self.num_raters, self.num_classes, height, width), EQUAL_CONFIDENCE
            )
        )
        maps, rater_maps = [], []
        for _ in range(steps + 1):
            calibrated, reliability, rater_probs = self.recurrence(features, reliability)
            maps.append(calibrated)
            rater_maps.append(rater_probs)
        return SegmentationOutput(
            calibrated=calibrated,
            raters=rater_probs,
            recurrences=maps,
            recurrence_raters=rater_maps,
            reliability=reliability,
        )

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
        """Yield ``(L_rec^i + zeta L_sff^i, detached parts)`` for i = 1..tau (Eq. 13,
        Algorithm 1).

        ``valid`` (B, M) marks the rater slots with an annotation (pooled data); the others
        neither vote in the fusions nor supervise their head."""
        cfg = self.loss_config
        reliability = initial_reliability(
            self.num_raters, tuple(labels.shape[2:]), device=labels.device
        ).expand_as(labels)
        target = fuse(reliability, labels, cfg.prior, valid)  # y_0^fuse, Eq. 15
        for _ in range(self.arch.recurrences):
            calibrated, reliability, rater_probs = self.recurrence(features, reliability)
            divp_fusion = fuse(reliability, labels, cfg.prior, valid)  # y_i^fuse
            conp_term, divp_term = recurrence_loss(calibrated, target, divp_fusion, cfg)
            rater_term = calibrated.new_zeros(())
            if "shuffle" in cfg.divp_supervision:
                permutations = random_permutations(self.num_raters, cfg.shuffles)
                rater_term = shuffle_loss(
                    reliability, rater_probs, labels, permutations, cfg.prior, valid
                )
            if "multihead" in cfg.divp_supervision:
                rater_term = rater_term + multihead_loss(rater_probs, labels, valid)
            parts = torch.stack([conp_term, divp_term, rater_term]).detach()
            yield conp_term + divp_term + cfg.zeta * rater_term, parts
            reliability = reliability.detach()
            target = divp_fusion.detach()

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
        if features[0].requires_grad:  # a frozen encoder (onboarding) has nothing to learn
            torch.autograd.backward(features, grads)
        return torch.stack(losses).sum(), self._named_parts(parts)
