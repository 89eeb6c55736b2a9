"""Shared preprocessing of every file-based reader, and its on-disk cache.

A decoded case is resized to ``image_size`` x ``image_size`` (images bilinear with
anti-aliasing, masks nearest neighbour so they stay binary), optionally clipped to an
intensity window (CT in Hounsfield units), and standardised per slice and channel with the
same :func:`~mrprism_core.data.images.standardize` the synthetic generator and prediction use.
The result is cached as ``.npy`` files keyed by the case's file fingerprints and these
settings, so the second epoch reads arrays instead of decoding JPEG/NIfTI/DICOM again.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import atomic_write_bytes
from .cases import Case, RawCase
from .images import standardize

__all__ = ["CaseCache", "PreparedCase", "Preprocessing"]

# bump when the preprocessing itself changes, so old caches are not reused
_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """Settings that define the arrays a model sees."""

    image_size: int = 256  # side of the square the images and masks are resized to
    intensity_window: tuple[float, float] | None = None  # clip before standardising (CT: HU)

    def key(self) -> str:
        return json.dumps({**asdict(self), "version": _VERSION}, sort_keys=True)


@dataclass
class PreparedCase:
    """A case ready for training: images (N, C, S, S) float32, raters (N, M, K, S, S) uint8."""

    image: np.ndarray
    raters: np.ndarray
    spacing: tuple[float, float, float]


def _nearest_indices(source: int, target: int) -> np.ndarray:
    """Pixel-centre nearest neighbour: target pixel i samples source floor((i+0.5)*s/t)."""
    return np.minimum(((np.arange(target) + 0.5) * source / target).astype(np.int64), source - 1)


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W) binary masks -> (..., size, size) by nearest neighbour (stays binary)."""
    rows = _nearest_indices(masks.shape[-2], size)
    cols = _nearest_indices(masks.shape[-1], size)
    return np.ascontiguousarray(masks[..., rows[:, None], cols[None, :]])


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) float -> (N, C, size, size), bilinear with anti-aliasing when shrinking."""
    if images.shape[-2:] == (size, size):
        return images.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    resized = F.interpolate(
        tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized.numpy()


def prepare(raw: RawCase, settings: Preprocessing) -> PreparedCase:
    image = raw.image.astype(np.float32, copy=False)
    if settings.intensity_window is not None:
        low, high = settings.intensity_window
        image = np.clip(image, low, high)
    image = standardize(resize_images(image, settings.image_size))
    raters = resize_masks(raw.raters, settings.image_size).astype(np.uint8, copy=False)
    return PreparedCase(image, raters, raw.spacing)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class CaseCache:
    """Prepared cases on disk (``root``) or, with ``root=None``, in this process's memory.

    Entries are written atomically, image last, so a killed writer leaves no entry that
    looks complete. Reading memory-maps the arrays: one slice of a volume costs one slice.
    """

    def __init__(self, root: str | Path | None, settings: Preprocessing) -> None:
        self.root = None if root is None else Path(root)
        self.settings = settings
        self._memory: dict[str, PreparedCase] = {}

    def _key(self, case: Case) -> str:
        text = f"{case.fingerprint()}|{self.settings.key()}"
        return hashlib.sha1(text.encode()).hexdigest()

    def get(self, case: Case) -> PreparedCase:
        """The prepared case: from the cache, or decoded, prepared and stored."""
        key = self._key(case)
        if key in self._memory:
            return self._memory[key]
        if self.root is not None:
            image_path = self.root / f"{key}.image.npy"
            if image_path.exists():
                meta = json.loads((self.root / f"{key}.json").read_text())
                return PreparedCase(
                    np.load(image_path, mmap_mode="r"),
                    np.load(self.root / f"{key}.raters.npy", mmap_mode="r"),
                    tuple(meta["spacing"]),  # type: ignore[arg-type]
                )
        prepared = prepare(case.load(), self.settings)
        if self.root is None:
            self._memory[key] = prepared
        else:
            atomic_write_bytes(self.root / f"{key}.raters.npy", _npy_bytes(prepared.raters))
            meta = {"case": case.case_id, "spacing": list(prepared.spacing)}
            atomic_write_bytes(self.root / f"{key}.json", json.dumps(meta).encode())
            atomic_write_bytes(self.root / f"{key}.image.npy", _npy_bytes(prepared.image))
        return prepared
