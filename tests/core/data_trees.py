"""Small on-disk data trees in the public releases' layouts, written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def disc_cup_masks(size: tuple[int, int], rater: int, case: int) -> tuple[np.ndarray, np.ndarray]:
    """Rater-dependent disc and cup ellipses (uint8 {0, 1}), cup inside disc."""
    height, width = size
    disc = Image.new("L", (width, height), 0)
    cup = Image.new("L", (width, height), 0)
    cx, cy = width // 2 + case, height // 2
    grow = 2 * rater
    ImageDraw.Draw(disc).ellipse(
        (cx - 14 - grow, cy - 12 - grow, cx + 14 + grow, cy + 12 + grow), 1
    )
    ImageDraw.Draw(cup).ellipse((cx - 6 - rater, cy - 5, cx + 6 + rater, cy + 5), 1)
    return np.asarray(disc), np.asarray(cup)


def photo(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    height, width = size
    base = np.linspace(40, 200, width, dtype=np.float32)[None, :, None].repeat(height, 0)
    return np.clip(base + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)


def write_refuge(
    root: Path,
    splits: dict[str, int],
    num_raters: int = 3,
    size: tuple[int, int] = (48, 64),
    photo_suffix: str = ".png",
) -> dict[str, dict[tuple[int, str], np.ndarray]]:
    """REFUGE tree; returns id -> {(rater index, class): mask as written}."""
    written: dict[str, dict[tuple[int, str], np.ndarray]] = {}
    for folder, count in splits.items():
        for case in range(count):
            case_id = f"{folder[:2]}{case:04d}"
            case_dir = root / folder / case_id
            case_dir.mkdir(parents=True)
            Image.fromarray(photo(size, case)).save(case_dir / f"{case_id}{photo_suffix}")
            written[case_id] = {}
            for rater in range(num_raters):
                disc, cup = disc_cup_masks(size, rater, case)
                for name, mask in (("disc", disc), ("cup", cup)):
                    Image.fromarray(mask * 255).save(
                        case_dir / f"{case_id}_seg_{name}_{rater + 1}.png"
                    )
                    written[case_id][(rater, name)] = mask
    return written


def write_nifti(path: Path, array: np.ndarray, zooms: tuple[float, ...] | None = None) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(array, np.eye(4))
    if zooms is not None:
        image.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
