"""Reading images as clinicians store them, and writing masks back in the same geometry.

* 2-D: PNG / JPEG (Pillow), channels first, original size kept;
* NIfTI volumes (nibabel): 3-D (one modality) or 4-D (modalities last), cut into slices along
  the third axis, affine and header kept for the output;
* DICOM series (pydicom): the slices of one ``SeriesInstanceUID`` in a folder, ordered along
  the slice normal, with the affine of the series in patient space (converted to NIfTI's RAS).

Every reader raises :class:`ImageReadError` naming the file and the problem. Intensities are
standardised per image and channel (zero mean, unit variance), as the synthetic generator does,
so a model sees the same kind of input whatever the source.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ImageReadError",
    "InputCase",
    "find_inputs",
    "read_2d_pixels",
    "read_case",
    "read_dicom",
    "read_nifti_array",
    "standardize",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# DICOM stores patient coordinates as LPS, NIfTI as RAS
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class ImageReadError(ValueError):
    """An input cannot be used; the message names the file and the problem."""


@dataclass
class InputCase:
    """One case to segment.

    Attributes:
        case_id: name used for the outputs (file stem or series folder name).
        source: the file or folder it came from.
        kind: ``"2d"``, ``"nifti"`` or ``"dicom"``.
        slices: (N, C, H, W) float32, standardised; N = 1 for a 2-D image.
        affine: voxel-to-world (RAS) matrix for volumes, None for 2-D images.
        header: the NIfTI header to copy into the outputs, if any.
        spacing: voxel size in mm along (H, W, slice) where known.
    """

    case_id: str
    source: Path
    kind: str
    slices: np.ndarray
    affine: np.ndarray | None = None
    header: Any = None
    spacing: tuple[float, ...] = field(default_factory=tuple)


def standardize(image: np.ndarray | torch.Tensor) -> Any:
    """Per-channel zero mean and unit variance of a (C, H, W) or (N, C, H, W) image; every
    image the models see (synthetic or read from disk) goes through this."""
    tensor = torch.as_tensor(image, dtype=torch.float32)
    mean = tensor.mean(dim=(-2, -1), keepdim=True)
    std = tensor.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    result = (tensor - mean) / std
    return result.numpy() if isinstance(image, np.ndarray) else result


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def find_inputs(path: str | Path) -> list[Path]:
    """Cases under ``path``: a file, or a folder of images / NIfTI files / DICOM series
    (a sub-folder holding ``.dcm`` files is one series; so is ``path`` itself)."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    found: list[Path] = []
    if any(path.glob("*.dcm")):
        found.append(path)
    for child in sorted(path.iterdir()):
        image = child.is_file() and (child.suffix.lower() in IMAGE_SUFFIXES or _is_nifti(child))
        series = child.is_dir() and any(child.glob("*.dcm"))
        if image or series:
            found.append(child)
    if not found:
        raise ImageReadError(
            f"{path}: no PNG/JPEG images, NIfTI files or DICOM series (*.dcm) found"
        )
    return found


def read_case(path: str | Path) -> InputCase:
    """Read one input found by :func:`find_inputs`."""
    path = Path(path)
    if path.is_dir():
        return _read_dicom_series(sorted(path.glob("*.dcm")), path, path.name)
    if path.suffix.lower() == ".dcm":
        return _read_dicom_series([path], path.parent, _stem(path))
    if _is_nifti(path):
        return _read_nifti(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_2d(path)
    raise ImageReadError(f"{path}: unknown image type (expected PNG, JPEG, NIfTI or DICOM)")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_2d_pixels(
    path: str | Path, draft_size: int | None = None, dtype: Any = np.float32
) -> tuple[np.ndarray, tuple]:
    """Pixels of a PNG/JPEG as (C, H, W) ``dtype`` (None: as stored) and the file's (H, W).

    ``draft_size``: a JPEG may be decoded at a reduced scale (1/2 .. 1/8) that still has at
    least this many pixels per side; much faster for large fundus photographs that are resized
    afterwards anyway.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            full_size = (image.height, image.width)
            if draft_size is not None and image.format == "JPEG":
                image.draft(image.mode, (draft_size, draft_size))
            image.load()
            if image.mode not in ("L", "RGB"):
                image = image.convert("RGB" if image.mode in ("RGBA", "P", "CMYK") else "L")
            pixels = np.asarray(image, dtype=dtype)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"{path}: not a readable PNG/JPEG image ({err})") from err
    channels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return channels, full_size


def _read_2d(path: Path) -> InputCase:
    channels, _ = read_2d_pixels(path)
    return InputCase(_stem(path), path, "2d", standardize(channels)[None])


def read_nifti_array(path: str | Path) -> tuple[Any, np.ndarray]:
    """The nibabel image (header, affine) and its voxels as float32."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as err:
        raise ImageReadError(f"{path}: unreadable or truncated NIfTI ({err})") from err
    return image, data


def read_dicom(path: str | Path, *, pixels: bool = True) -> Any:
    """One DICOM file (pydicom Dataset); ``pixels=False`` reads the header only."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=not pixels)
        if pixels:
            _ = dataset.pixel_array  # decode now, so a truncated file fails here, by name
    except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError) as err:
        raise ImageReadError(f"{path}: unreadable or truncated DICOM ({err})") from err
    return dataset


def _read_nifti(path: Path) -> InputCase:
    image, data = read_nifti_array(path)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ImageReadError(
            f"{path}: expected a 3-D volume (or 4-D with modalities last), got {data.shape}"
        )
    # (X, Y, Z, C) -> slices along Z: (Z, C, X, Y)
    slices = standardize(data.transpose(2, 3, 0, 1))
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    return InputCase(_stem(path), path, "nifti", slices, image.affine, image.header, spacing)


def _read_dicom_series(files: list[Path], folder: Path, name: str) -> InputCase:
    """``files``: the slices of one series; ``folder`` is named in errors."""
    datasets = [read_dicom(file) for file in files]
    series = {str(getattr(d, "SeriesInstanceUID", "")) for d in datasets}
    if len(series) > 1:
        raise ImageReadError(f"{folder}: {len(series)} DICOM series in one folder; split them")
    try:
        orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
        row, column = orientation[:3], orientation[3:]
        normal = np.cross(row, column)
        datasets.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient))))
        pixels = np.stack([d.pixel_array.astype(np.float32) for d in datasets])
        slope = float(getattr(datasets[0], "RescaleSlope", 1.0))
        intercept = float(getattr(datasets[0], "RescaleIntercept", 0.0))
        row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
        first = np.asarray(datasets[0].ImagePositionPatient, dtype=float)
        if len(datasets) > 1:
            last = np.asarray(datasets[-1].ImagePositionPatient, dtype=float)
            step = (last - first) / (len(datasets) - 1)
        else:
            step = normal * float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    except (AttributeError, KeyError, ValueError, TypeError) as err:
        raise ImageReadError(f"{folder}: DICOM series without usable geometry ({err})") from err
    if pixels.ndim != 3:
        raise ImageReadError(f"{folder}: expected grey-level slices, got pixel data {pixels.shape}")
    # voxel (i=row, j=column, k=slice) -> LPS: columns move along `row`, rows along `column`
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = column * row_spacing
    affine_lps[:3, 1] = row * column_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = first
    slices = standardize((pixels * slope + intercept)[:, None])
    spacing = (row_spacing, column_spacing, float(np.linalg.norm(step)))
    return InputCase(name, folder, "dicom", slices, _LPS_TO_RAS @ affine_lps, None, spacing)
