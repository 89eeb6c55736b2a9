"""Synthetic multi-rater data with a known true mask.

Each case is a fundus-like (or MRI-like, one channel) image of a blob with K = 1 or 2 nested
structures (disc and cup), or a CT-like slice with one small nodule among vessels
(``ImageStyle.structure = "nodule"``), its true mask, and M raters who each redraw the truth
with their own habits: a systematic dilation or erosion, a wobbly boundary, occasional misses
of the inner structure, and errors that grow as the case's contrast falls
(``RaterProfile.low_contrast_bias`` / ``low_contrast_noise`` with ``ImageStyle.contrast_range``).
Raters who only err symmetrically make the majority vote optimal; a majority that errs the same
way at low contrast does not. Rater 0 is by default an expert close to the truth. Everything is
drawn from a generator seeded by ``(seed, case index)``, so a case is the same whatever order
it is read in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .images import standardize

#: cup-to-disc ratio (square root of the area ratio) above which a synthetic case counts as
#: glaucomatous: the diagnosis label DiFF's diagnosis-first fusion needs
GLAUCOMA_CUP_TO_DISC = 0.55

__all__ = [
    "ImageStyle",
    "RaterProfile",
    "default_rater_profiles",
    "SyntheticMultiRaterDataset",
    "make_dataset",
]


@dataclass(frozen=True)
class ImageStyle:
    """How a site's images look; vary these to make non-IID sites."""

    channels: int = 3  # 3 = colour fundus-like, 1 = grey MRI/CT-like
    tint: tuple[float, float, float] = (1.0, 0.55, 0.3)  # per-channel gain (first C used)
    background: float = 0.25  # mean background brightness in [0, 1]
    disc_contrast: float = 0.35  # brightness step at the outer structure
    cup_contrast: float = 0.15  # brightness step at the inner structure (low: ambiguous cup)
    edge_softness: float = 0.08  # width of the blurred boundary, as a fraction of the radius
    texture: float = 0.08  # amplitude of the smooth background texture
    noise: float = 0.03  # per-pixel Gaussian noise
    structure: str = "disc"  # "disc": nested disc/cup; "nodule": one small blob (K = 1)
    contrast_range: tuple[float, float] = (1.0, 1.0)  # per-case contrast factor, drawn uniformly
    nodule_radius: tuple[float, float] = (0.06, 0.2)  # nodule radius range (log-uniform), of side
    vessels: int = 0  # bright vessel-like curves crossing the image (CT-like distractors)
    vessel_contrast: float = 0.3  # brightness of the vessels

    def __post_init__(self) -> None:
        if self.structure not in ("disc", "nodule"):
            raise ValueError(f"style.structure must be 'disc' or 'nodule', got {self.structure!r}")
        low, high = self.contrast_range
        if not 0 < low <= high:
            raise ValueError(f"style.contrast_range must be 0 < low <= high, got {low}, {high}")


@dataclass(frozen=True)
class RaterProfile:
    """One simulated rater's habits."""

    bias: float = 0.0  # systematic dilation (>0) or erosion (<0), fraction of the radius
    boundary_noise: float = 0.03  # amplitude of the smooth boundary wobble, fraction of radius
    miss_rate: float = 0.0  # probability of leaving the innermost structure empty
    low_contrast_bias: float = 0.0  # extra dilation (>0) on the lowest-contrast cases
    low_contrast_noise: float = 0.0  # extra boundary wobble on the lowest-contrast cases


def default_rater_profiles(num_raters: int) -> list[RaterProfile]:
    """M raters with different, fixed behaviours: rater 0 is the expert close to the truth,
    the others alternate between dilating and eroding with growing boundary noise."""
    if num_raters < 1:
        raise ValueError(f"num_raters must be >= 1, got {num_raters}")
    profiles = [RaterProfile(bias=0.0, boundary_noise=0.02, miss_rate=0.0)]
    for index in range(1, num_raters):
        sign = 1.0 if index % 2 == 1 else -1.0
        step = (index + 1) // 2
        profiles.append(
            RaterProfile(
                bias=sign * (0.06 + 0.04 * (step - 1)),
                boundary_noise=0.03 + 0.015 * step,
                miss_rate=0.05 if index % 3 == 0 else 0.0,
            )
        )
    return profiles


def _smooth_field(size: int, grid: int, generator: torch.Generator, channels: int = 1) -> Tensor:
    """A smooth random field in about [-1, 1], shape (channels, size, size)."""
    coarse = torch.rand((1, channels, grid, grid), generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0]


@dataclass(frozen=True)
class _Shape:
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float

    def radius_field(self, coords: tuple[Tensor, Tensor]) -> Tensor:
        """Normalised elliptic radius: < 1 inside the ellipse."""
        y, x = coords
        dx, dy = x - self.cx, y - self.cy
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u = (dx * cos + dy * sin) / self.rx
        v = (-dx * sin + dy * cos) / self.ry
        return torch.sqrt(u * u + v * v)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class SyntheticMultiRaterDataset(Dataset):
    """Synthetic multi-rater segmentation cases.

    Items are dicts with ``image`` (C, H, W) float32 (standardised per channel), ``raters``
    (M, K, H, W) float32 in {0, 1}, ``truth`` (K, H, W) float32 in {0, 1}, ``id`` (str) and,
    with two classes, ``diagnosis`` (a 0-dim float: 1 when the true cup-to-disc ratio exceeds
    :data:`GLAUCOMA_CUP_TO_DISC`).
    """

    def __init__(
        self,
        num_cases: int,
        num_raters: int,
        image_size: int,
        seed: int = 0,
        *,
        num_classes: int = 2,
        style: ImageStyle | None = None,
        rater_profiles: Sequence[RaterProfile] | None = None,
        name: str = "synthetic",
    ) -> None:
        if num_cases < 1:
            raise ValueError(f"num_cases must be >= 1, got {num_cases}")
        if num_classes not in (1, 2):
            raise ValueError(f"num_classes must be 1 or 2 (nested structures), got {num_classes}")
        if (style or ImageStyle()).structure == "nodule" and num_classes != 1:
            raise ValueError(f"a nodule style has one class, got num_classes={num_classes}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.num_cases = num_cases
        self.num_raters = num_raters
        self.image_size = image_size
        self.seed = seed
        self.num_classes = num_classes
        self.style = style or ImageStyle()
        self.rater_profiles = list(rater_profiles or default_rater_profiles(num_raters))
        if len(self.rater_profiles) != num_raters:
            raise ValueError(
                f"{len(self.rater_profiles)} rater profiles given for num_raters={num_raters}"
            )
        self.name = name
        axis = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
        self._coords = torch.meshgrid(axis, axis, indexing="ij")

    @property
    def in_channels(self) -> int:
        return self.style.channels

    def __len__(self) -> int:
        return self.num_cases

    def _shapes(self, generator: torch.Generator) -> list[_Shape]:
        if self.style.structure == "nodule":
            low, high = self.style.nodule_radius
            radius = math.exp(_uniform(generator, math.log(low), math.log(high)))
            aspect = _uniform(generator, 0.8, 1.25)
            return [
                _Shape(
                    cx=_uniform(generator, 0.25, 0.75),
                    cy=_uniform(generator, 0.25, 0.75),
                    rx=radius * aspect,
                    ry=radius / aspect,
                    angle=_uniform(generator, 0.0, math.pi),
                )
            ]
        radius = _uniform(generator, 0.16, 0.26)
        aspect = _uniform(generator, 0.85, 1.15)
        disc = _Shape(
            cx=_uniform(generator, 0.35, 0.65),
            cy=_uniform(generator, 0.35, 0.65),
            rx=radius * aspect,
            ry=radius / aspect,
            angle=_uniform(generator, 0.0, math.pi),
        )
        ratio = _uniform(generator, 0.4, 0.65)
        offset = (1 - ratio) * 0.3 * radius
        cup = _Shape(
            cx=disc.cx + _uniform(generator, -offset, offset),
            cy=disc.cy + _uniform(generator, -offset, offset),
            rx=disc.rx * ratio * _uniform(generator, 0.9, 1.1),
            ry=disc.ry * ratio * _uniform(generator, 0.9, 1.1),
            angle=disc.angle + _uniform(generator, -0.3, 0.3),
        )
        return [disc, cup][: self.num_classes]

    def _vessels(self, generator: torch.Generator) -> Tensor:
        """Thin bright curves (quadratic Bezier paths across the image), in [0, 1]."""
        y, x = self._coords
        out = torch.zeros_like(x)
        width = 0.012
        for _ in range(self.style.vessels):
            ends = torch.rand((3, 2), generator=generator)
            ends[0, 0], ends[2, 0] = 0.0, 1.0  # from the left edge to the right edge
            if float(torch.rand((), generator=generator)) < 0.5:
                ends = ends.flip(1)  # or top to bottom
            t = torch.linspace(0, 1, 64).view(-1, 1)
            path = (1 - t) ** 2 * ends[0] + 2 * (1 - t) * t * ends[1] + t**2 * ends[2]
            distance = torch.cdist(torch.stack([x, y], -1).view(-1, 2), path).min(dim=1).values
            out = torch.maximum(out, torch.exp(-((distance.view_as(x) / width) ** 2)))
        return out

    def _image(self, radii: list[Tensor], contrast: float, generator: torch.Generator) -> Tensor:
        style, size = self.style, self.image_size
        texture = _smooth_field(size, 6, generator)[0] * style.texture
        intensity = style.background + texture
        if style.vessels:
            intensity = intensity + style.vessel_contrast * self._vessels(generator)
        contrasts = (style.disc_contrast, style.cup_contrast)
        for radius, step in zip(radii, contrasts):
            soft = torch.sigmoid((1.0 - radius) / max(style.edge_softness, 1e-3) * 2.0)
            intensity = intensity + contrast * step * soft
        gains = torch.tensor(style.tint[: style.channels], dtype=torch.float32)
        if gains.numel() < style.channels:
            raise ValueError(f"style.tint has {gains.numel()} gains for {style.channels} channels")
        image = intensity.unsqueeze(0) * gains.view(-1, 1, 1)
        image = image + torch.randn(image.shape, generator=generator) * style.noise
        return standardize(image)

    def _hardness(self, contrast: float) -> float:
        """0 on the style's highest-contrast cases, 1 on its lowest."""
        low, high = self.style.contrast_range
        return 0.0 if high == low else (high - contrast) / (high - low)

    def _rater_masks(
        self, radii: list[Tensor], contrast: float, generator: torch.Generator
    ) -> Tensor:
        hardness = self._hardness(contrast)
        masks = []
        for profile in self.rater_profiles:
            bias = profile.bias + profile.low_contrast_bias * hardness
            noise = profile.boundary_noise + profile.low_contrast_noise * hardness
            per_class = []
            for radius in radii:
                wobble = _smooth_field(self.image_size, 5, generator)[0] * noise
                per_class.append(radius < 1.0 + bias + wobble)
            if self.num_classes == 2:
                per_class[1] = per_class[1] & per_class[0]  # the cup lies inside the disc
            if float(torch.rand((), generator=generator)) < profile.miss_rate:
                per_class[-1] = torch.zeros_like(per_class[-1])
            masks.append(torch.stack(per_class))
        return torch.stack(masks).float()

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        if not 0 <= index < self.num_cases:
            raise IndexError(f"case {index} out of range for {self.num_cases} cases")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        shapes = self._shapes(generator)
        radii = [shape.radius_field(self._coords) for shape in shapes]
        truth = torch.stack([radius < 1.0 for radius in radii]).float()
        low, high = self.style.contrast_range
        # drawn only when it varies, so styles without it keep their cases bit for bit
        contrast = high if low == high else _uniform(generator, low, high)
        sample = {
            "image": self._image(radii, contrast, generator),
            "raters": self._rater_masks(radii, contrast, generator),
            "truth": truth,
            "id": f"{self.name}-{self.seed}-{index:05d}",
        }
        if self.num_classes == 2:  # a diagnosis from the true cup-to-disc ratio (DiFF uses it)
            ratio = (truth[1].sum() / truth[0].sum().clamp_min(1)).sqrt()
            sample["diagnosis"] = (ratio > GLAUCOMA_CUP_TO_DISC).float()
        return sample


def make_dataset(
    num_cases: int,
    num_raters: int,
    image_size: int,
    seed: int,
    *,
    num_classes: int = 2,
    style: ImageStyle | None = None,
    rater_profiles: Sequence[RaterProfile] | None = None,
    name: str = "synthetic",
) -> SyntheticMultiRaterDataset:
    """Build a reproducible synthetic multi-rater dataset (see module docstring)."""
    return SyntheticMultiRaterDataset(
        num_cases,
        num_raters,
        image_size,
        seed,
        num_classes=num_classes,
        style=style,
        rater_profiles=rater_profiles,
        name=name,
    )
