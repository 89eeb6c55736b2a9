"""D-Persona (paper 004, Wu et al., CVPR 2024), written from its method section.

Stage I, diversification: a probabilistic U-Net. A prior encoder (image) and a posterior
encoder (image + annotations) give diagonal Gaussians over a D-dimensional latent; a code
sampled from the posterior, tiled over the image and concatenated with the U-Net features,
goes through the prediction head and is supervised by one randomly chosen rater (Dice, Eq. 4);
K codes from the prior give predictions whose intersection and union are supervised by the
raters' intersection and union (the bound-constrained loss, Eq. 5); KL aligns the two
distributions (Eq. 2). L_I = KL + alpha L_seg + beta L_bound (Eq. 6).

Stage II, personalisation: one projection head per rater maps the U-Net features to a code
(1x1 conv + global average pooling, Eq. 7), which cross-attends over a bank of codes sampled
from the prior (Eq. 8) and goes through the *frozen* prediction head; each head is supervised
by its own rater (Eq. 9). The projection heads are site-local when federated.

Departures, so that one model trains in one loop (and federated rounds need no stage switch):
both stages train together, and Stage II's loss reaches only the projection heads (backbone
features, prior and head parameters are detached for it), which is what freezing them in a
second stage achieves. The posterior sees the annotations through their mean, intersection and
union (per class), so its weights do not depend on the rater count and can be shared. KL is
taken as KL(posterior || prior), the probabilistic U-Net's direction. In evaluation the bank
is drawn with a fixed noise, so scores are reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call

from ..losses import dice_loss_per_image, mean_over_annotated
from .base import SegmentationModel, SegmentationOutput
from .blocks import DownStack
from .config import MrPrismArch
from .unet import UNetBackbone

__all__ = ["DPersona", "annotation_bounds"]


def annotation_bounds(masks: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, intersection and union (B, K, H, W) over the annotated raters of (B, M, K, H, W)."""
    weights = torch.ones(masks.shape[:2], device=masks.device) if valid is None else valid.float()
    w = weights[:, :, None, None, None]
    mean = (masks * w).sum(1) / w.sum(1).clamp_min(1)
    inter = torch.where(w > 0, masks, torch.ones_like(masks)).amin(1)
    union = (masks * w).amax(1)
    return mean, inter, union


class GaussianEncoder(nn.Module):
    """Image (+ condition) -> a diagonal Gaussian over the latent code."""

    def __init__(self, in_channels: int, latent_dim: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.features = DownStack(in_channels, widths)
        self.out = nn.Conv2d(self.features.out_channels, 2 * latent_dim, 1)

    def forward(self, x: Tensor) -> Normal:
        pooled = self.features(x).mean(dim=(2, 3), keepdim=True)
        mu, log_sigma = self.out(pooled).flatten(1).chunk(2, dim=1)
        return Normal(mu, log_sigma.clamp(-6, 3).exp())


class DPersona(SegmentationModel):
    """D-Persona; ``projection_heads`` (one per rater) stay at the site."""

    local_modules = ("projection_heads",)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_raters: int,
        arch: MrPrismArch,
        *,
        latent_dim: int = 6,
        prior_samples: int = 4,
        bank_size: int = 16,
        alpha: float = 1.0,
        beta: float = 1.0,
        build_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(build_args or {})
        self.arch = arch  # its preset's learning rate is the trainers' default
        self.num_raters, self.latent_dim = num_raters, latent_dim
        self.prior_samples, self.bank_size = prior_samples, bank_size
        self.alpha, self.beta = alpha, beta
        self.backbone = UNetBackbone(in_channels, arch)
        width = self.backbone.out_channels
        encoder_widths = tuple(arch.encoder_widths[:3])
        self.prior = GaussianEncoder(in_channels, latent_dim, encoder_widths)
        self.posterior = GaussianEncoder(in_channels + 3 * num_classes, latent_dim, encoder_widths)
        self.head = nn.Sequential(
            nn.Conv2d(width + latent_dim, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, num_classes, 1),
        )
        self.projection_heads = nn.ModuleList(
            nn.Conv2d(width, latent_dim, 1) for _ in range(num_raters)
        )
        # evaluation draws the prior bank with this fixed noise (reproducible scores)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer(
            "eval_noise", torch.randn(bank_size, latent_dim, generator=generator), persistent=False
        )

    def _decode(self, features: Tensor, code: Tensor, params: dict | None = None) -> Tensor:
        tiled = code[:, :, None, None].expand(-1, -1, *features.shape[-2:])
        inputs = torch.cat([features, tiled], dim=1)
        if params is None:
            return self.head(inputs)
        return functional_call(self.head, params, (inputs,))

    def _experts(self, features: Tensor, prior: Normal, frozen: bool) -> Tensor:
        """Every rater's personalised logits (B, M, K, H, W) (Eq. 7-9)."""
        if self.training:
            bank = prior.rsample((self.bank_size,))  # (S, B, D)
        else:
            bank = prior.loc + prior.scale * self.eval_noise[:, None, :]
        bank = bank.transpose(0, 1)  # (B, S, D)
        params = None
        if frozen:  # Stage II trains the projection heads only
            features, bank = features.detach(), bank.detach()
            params = {k: v.detach() for k, v in self.head.named_parameters()}
        outputs = []
        for projection in self.projection_heads:
            query = projection(features).mean(dim=(2, 3))  # (B, D)
            attention = torch.softmax(torch.einsum("bd,bsd->bs", query, bank), dim=1)
            code = torch.einsum("bs,bsd->bd", attention, bank)
            outputs.append(self._decode(features, code, params))
        return torch.stack(outputs, dim=1)

    def forward(self, images: Tensor) -> SegmentationOutput:
        features = self.backbone(images)
        prior = self.prior(images)
        raters = torch.sigmoid(self._experts(features, prior, frozen=False))
        calibrated = raters.mean(dim=1)
        mean_code = torch.sigmoid(self._decode(features, prior.loc))
        return SegmentationOutput(
            calibrated=calibrated, raters=raters, recurrences=[mean_code, calibrated]
        )

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        images, masks = batch["image"], batch["raters"].float()
        valid = batch.get("rater_valid")
        weights = (
            torch.ones(masks.shape[:2], device=masks.device) if valid is None else valid.float()
        )
        features = self.backbone(images)
        prior = self.prior(images)
        mean, inter, union = annotation_bounds(masks, valid)
        posterior = self.posterior(torch.cat([images, mean, inter, union], dim=1))
        kl = kl_divergence(posterior, prior).sum(dim=1).mean()
        # Eq. 4: a posterior code against one randomly chosen annotated rater
        chosen = torch.multinomial(weights + 1e-9, 1).squeeze(1)
        target = masks[torch.arange(masks.shape[0]), chosen]
        seg = dice_loss_per_image(
            torch.sigmoid(self._decode(features, posterior.rsample())), target
        ).mean()
        # Eq. 5: intersection and union of K prior samples against the raters' bounds
        samples = torch.stack(
            [
                torch.sigmoid(self._decode(features, prior.rsample()))
                for _ in range(self.prior_samples)
            ]
        )
        bound = (
            dice_loss_per_image(samples.amin(0), inter).mean()
            + dice_loss_per_image(samples.amax(0), union).mean()
        )
        stage_one = kl + self.alpha * seg + self.beta * bound
        # Eq. 9: each projection head against its own rater
        experts = torch.sigmoid(self._experts(features, prior, frozen=True))
        per_pair = torch.stack(
            [dice_loss_per_image(experts[:, m], masks[:, m]) for m in range(self.num_raters)], dim=1
        )
        personal = mean_over_annotated(per_pair, valid) * self.num_raters
        loss = stage_one + personal
        return loss, {
            "kl": kl.item(),
            "seg_random": seg.item(),
            "bound": bound.item(),
            "personal": personal.item(),
        }
