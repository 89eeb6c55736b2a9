"""What a reader finds on disk: one :class:`Case` per image with its raters' masks.

A reader (REFUGE, RIGA, QUBIQ, LIDC, BraTS, manifest) only *lists* cases: cheap, and it fails
early on a missing file or a wrong rater count. ``Case.load()`` decodes the files into a
:class:`RawCase` at their own size; :mod:`.preprocess` resizes and normalises it and
:mod:`.files` turns a list of cases into a Dataset. Every problem raises
:class:`DataValidationError` naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageReadError, read_2d_pixels, read_nifti_array

__all__ = [
    "Case",
    "DataValidationError",
    "FileCase",
    "MaskFile",
    "RawCase",
    "assign_splits",
    "binary_mask",
    "read_array",
    "split_name",
]

# the names users write in manifests and split folders, mapped to ours
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


class DataValidationError(ValueError):
    """A site's data cannot be used; the message starts with the file or folder at fault."""


def split_name(value: str, where: str | Path) -> str:
    """``train`` / ``val`` / ``test`` from the spellings people use."""
    name = _SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise DataValidationError(f"{where}: unknown split {value!r}; use train, val or test")
    return name


@dataclass
class RawCase:
    """A decoded case at its original size.

    Attributes:
        image: (N, C, H, W) float32; N slices (1 for a 2-D image), C channels / modalities.
        raters: (N, M, K, H, W) uint8 in {0, 1}.
        spacing: pixel size in mm along (H, W, slice); NaN where unknown.
    """

    image: np.ndarray
    raters: np.ndarray
    spacing: tuple[float, float, float] = (float("nan"),) * 3


@dataclass(frozen=True)
class MaskFile:
    """One rater's mask of one class: a binary mask file, or a label map of which ``labels``
    are this class (e.g. BraTS tumour core = labels 1 and 4)."""

    path: Path
    labels: tuple[int, ...] | None = None


@dataclass
class Case:
    """One listed case. Subclasses implement :meth:`load` (and :meth:`slice_count` for volumes).

    Attributes:
        case_id: unique within the data set.
        split: ``train``, ``val``, ``test`` or None (assigned later by :func:`assign_splits`).
        num_raters: M this case has (checked against the config before anything is decoded).
        files: every file the case is read from: named in errors, fingerprinted for the cache.
        group: cases of one group (e.g. one patient) always land in the same split.
        source: the reader's name, kept in the sample's metadata.
        num_classes: K this case has.
        diagnosis: a case-level label (e.g. 1 = glaucoma) where the source has one; DiFF
            needs it.
    """

    case_id: str
    split: str | None
    num_raters: int
    files: tuple[Path, ...]
    group: str = ""
    source: str = ""
    num_classes: int = 1
    diagnosis: float | None = None

    def load(self) -> RawCase:
        raise NotImplementedError

    def slice_count(self) -> int:
        return 1

    def fingerprint(self) -> str:
        """Changes when any of the case's files changes (path, size or modification time)."""
        digest = hashlib.sha1(f"{type(self).__name__}|{self.case_id}".encode())
        for path in self.files:
            try:
                stat = path.stat()
            except OSError as err:
                raise DataValidationError(f"{path}: cannot be read ({err.strerror})") from err
            digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


@dataclass
class _Pixels:
    values: np.ndarray  # PNG/JPEG: (C, H, W); NIfTI: as stored, (X, Y[, Z][, C])
    spacing: tuple[float, ...]
    full_size: tuple[int, ...]  # PNG/JPEG: the file's (H, W) even when decoded smaller
    planar: bool  # PNG/JPEG rather than NIfTI


def read_array(path: Path, draft_size: int | None = None, dtype: Any = np.float32) -> _Pixels:
    """Pixels of an image or mask file, its spacing (mm, NaN where unknown) and size;
    ``dtype=None`` keeps PNG/JPEG pixels as stored (masks: no float copy)."""
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            image, data = read_nifti_array(path)
            zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
            return _Pixels(data, zooms, data.shape, planar=False)
        pixels, full_size = read_2d_pixels(path, draft_size, dtype)
        return _Pixels(pixels, (float("nan"),) * 3, full_size, planar=True)
    except ImageReadError as err:
        raise DataValidationError(str(err)) from err


def binary_mask(pixels: _Pixels, mask: MaskFile) -> np.ndarray:
    """A mask file's pixels -> uint8 {0, 1}; refuses anything that is not a clean mask.

    Binary files may hold {0, 1} or {0, 255} (one "on" value); label maps (``mask.labels``)
    hold whole-number labels, of which ``labels`` are this class.
    """
    values = pixels.values
    if pixels.planar:  # (C, H, W): an RGB-saved mask counts where any channel is set
        values = values[0] if values.shape[0] == 1 else values.max(axis=0)
    if mask.labels is not None:
        present = np.unique(values)
        fractional = present[present != np.round(present)]
        if fractional.size:
            raise DataValidationError(
                f"{mask.path}: label map holds non-integer values {fractional[:6].tolist()}"
            )
        return np.isin(values, mask.labels).astype(np.uint8)
    on = values != 0
    lit = values[on]
    if lit.size and (lit.min() != lit.max() or float(lit.flat[0]) not in (1.0, 255.0)):
        shown = np.unique(lit)[:6].tolist()
        raise DataValidationError(
            f"{mask.path}: non-binary mask values (non-zero values {shown}); expected 0 and "
            "1 (or 0 and 255). Label maps need the class labels in the data config (labels:)"
        )
    return on.astype(np.uint8)


@dataclass
class FileCase(Case):
    """A case whose image (one file per channel / modality) and masks (rater x class) are
    plain files: PNG/JPEG or NIfTI. 2-D files give one slice; NIfTI volumes are cut into
    slices along their third axis.

    Attributes:
        images: one file per modality, concatenated along channels in this order.
        masks: ``masks[m][k]``: rater m's mask of class k.
        draft_size: JPEG images may be decoded at a reduced scale of at least this size.
    """

    images: tuple[Path, ...] = ()
    masks: tuple[tuple[MaskFile, ...], ...] = ()
    draft_size: int | None = None
    _slices: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.num_classes = len(self.masks[0]) if self.masks else 0

    def slice_count(self) -> int:
        first = self.masks[0][0].path
        if not first.name.lower().endswith((".nii", ".nii.gz")):
            return 1
        if self._slices is None:
            import nibabel as nib

            try:
                shape = nib.load(str(first)).shape
            except Exception as err:  # noqa: BLE001 - nibabel raises many types for bad files
                raise DataValidationError(f"{first}: unreadable NIfTI header ({err})") from err
            self._slices = int(shape[2]) if len(shape) >= 3 and shape[2] > 1 else 1
        return self._slices

    def load(self) -> RawCase:
        decoded: dict[Path, _Pixels] = {}

        def read(path: Path, draft: int | None = None, dtype: Any = np.float32) -> _Pixels:
            if path not in decoded:  # a label map serves several classes: decode it once
                decoded[path] = read_array(path, draft, dtype)
            return decoded[path]

        reference = self.masks[0][0].path
        masks = [[binary_mask(read(m.path, dtype=None), m) for m in rater] for rater in self.masks]
        spatial = masks[0][0].shape
        if len(spatial) not in (2, 3):
            raise DataValidationError(f"{reference}: masks must be 2-D or 3-D, got {spatial}")
        for rater, files in zip(masks, self.masks):
            for values, mask in zip(rater, files):
                if values.shape != spatial:
                    raise DataValidationError(
                        f"{mask.path}: mask size {values.shape} differs from "
                        f"{reference.name} {spatial}"
                    )
        channels = [_as_slices(read(p, self.draft_size), spatial, p) for p in self.images]
        image = np.concatenate(channels, axis=1)
        raters = np.stack([np.stack(rater) for rater in masks])  # (M, K, *spatial)
        raters = raters[None] if len(spatial) == 2 else np.moveaxis(raters, -1, 0)
        spacing = read(self.images[0]).spacing
        return RawCase(image, np.ascontiguousarray(raters), _spacing3(spacing))


def _as_slices(pixels: _Pixels, spatial: tuple[int, ...], path: Path) -> np.ndarray:
    """An image file's pixels -> (N, C, H, W) slices matching the masks' spatial shape."""
    values = pixels.values
    if pixels.planar and pixels.full_size == spatial:
        return values[None]  # (1, C, H, W), possibly decoded smaller (JPEG draft)
    if not pixels.planar and values.shape == spatial:
        volume = values[..., None]  # one channel
    elif (
        not pixels.planar
        and values.shape[: len(spatial)] == spatial
        and (values.ndim == len(spatial) + 1)
    ):
        volume = values  # channels / modalities last
    else:
        raise DataValidationError(
            f"{path}: image size {pixels.full_size} does not match its masks {spatial}"
        )
    if len(spatial) == 2:
        return volume.transpose(2, 0, 1)[None]  # (1, C, X, Y)
    return volume.transpose(2, 3, 0, 1)  # (Z, C, X, Y)


def _spacing3(spacing: Sequence[float]) -> tuple[float, float, float]:
    padded = [*spacing, float("nan"), float("nan"), float("nan")][:3]
    return (float(padded[0]), float(padded[1]), float(padded[2]))


def assign_splits(
    cases: Sequence[Case], fractions: Mapping[str, float] | None, seed: int, where: str
) -> None:
    """Give every case without a split one, by group, reproducibly: groups are shuffled with
    ``seed`` and cut by ``fractions`` (e.g. ``{train: 0.7, val: 0.1, test: 0.2}``)."""
    pending = [case for case in cases if case.split is None]
    if not pending:
        return
    fractions = dict(fractions or {"train": 0.7, "val": 0.1, "test": 0.2})
    names = [split_name(name, where) for name in fractions]
    total = float(sum(fractions.values()))
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise DataValidationError(f"{where}: split_fractions must be >= 0, got {fractions}")
    groups = sorted({case.group or case.case_id for case in pending})
    order = np.random.default_rng(seed).permutation(len(groups))
    bounds = np.cumsum([v / total for v in fractions.values()]) * len(groups)
    assigned: dict[str, str] = {}
    for rank, index in enumerate(order):
        position = int(np.searchsorted(bounds, rank, side="right"))
        assigned[groups[index]] = names[min(position, len(names) - 1)]
    for case in pending:
        case.split = assigned[case.group or case.case_id]
