"""Fundus photographs with optic disc and cup: REFUGE's multi-rater release and RIGA.

Per-case folders (REFUGE, and RIGA prepared as masks)::

    <id>/<id>.jpg                      the photograph (.jpg, .jpeg, .png, .tif)
    <id>/<id>_seg_disc_<r>.png         rater r's disc mask, r = 1..M
    <id>/<id>_seg_cup_<r>.png          rater r's cup mask

REFUGE keeps the case folders in ``Training-400``, ``Validation-400`` and ``Test-400``.
RIGA's original release instead has, per image, the unannotated photograph
``<name>prime.<ext>`` and one copy per rater, ``<name>-<r>.<ext>``, with the disc and cup drawn
on it as outlines; :func:`masks_from_outlines` recovers the masks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cases import Case, DataValidationError, FileCase, MaskFile, RawCase, read_array
from .common import class_names, data_root, finish, setting

__all__ = ["REFUGE_SPLITS", "RigaOutlineCase", "list_refuge", "list_riga", "masks_from_outlines"]

REFUGE_SPLITS = {"Training-400": "train", "Validation-400": "val", "Test-400": "test"}
RIGA_SOURCES = ("BinRushed", "Magrabia", "MESSIDOR")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
_MASK = re.compile(r"_seg_(?P<cls>[a-z]+)_(?P<rater>\d+)\.png$", re.IGNORECASE)
_DEFAULT_CLASSES = ["disc", "cup"]


def case_folder(
    folder: Path, classes: list[str], num_raters: int, split: str | None, cfg: Mapping[str, Any]
) -> FileCase:
    """One per-case folder -> a case; a missing photograph or rater mask is named."""
    case_id = folder.name
    photos = [folder / f"{case_id}{suffix}" for suffix in PHOTO_SUFFIXES]
    photo = next((p for p in photos if p.is_file()), None)
    if photo is None:
        raise DataValidationError(f"{folder}: no photograph {case_id}.jpg (or .png/.tif)")
    found = {int(m["rater"]) for p in folder.iterdir() if (m := _MASK.search(p.name))}
    if len(found) != num_raters:
        raise DataValidationError(
            f"{folder}: masks of {len(found)} raters ({sorted(found)}), the data config says "
            f"num_raters={num_raters}"
        )
    masks = []
    for rater in range(1, num_raters + 1):
        per_class = []
        for name in classes:
            path = folder / f"{case_id}_seg_{name}_{rater}.png"
            if not path.is_file():
                raise DataValidationError(f"{path}: missing rater mask (rater {rater}, {name})")
            per_class.append(MaskFile(path))
        masks.append(tuple(per_class))
    return FileCase(
        case_id,
        split,
        num_raters,
        files=(photo, *(m.path for rater in masks for m in rater)),
        group=case_id,
        source=str(cfg.get("kind")),
        images=(photo,),
        masks=tuple(masks),
        draft_size=int(cfg.get("image_size", 256)),
    )


def list_refuge(cfg: Mapping[str, Any]) -> list[Case]:
    """REFUGE multi-rater release under ``data.root`` (a missing split folder is allowed)."""
    root = data_root(cfg, "refuge")
    classes = class_names(cfg, _DEFAULT_CLASSES)
    num_raters = int(setting(cfg, "num_raters", "refuge"))
    present = [name for name in REFUGE_SPLITS if (root / name).is_dir()]
    if not present:
        raise DataValidationError(
            f"{root}: none of the REFUGE split folders {list(REFUGE_SPLITS)} is there"
        )
    cases: list[Case] = []
    for name in present:
        for folder in sorted(p for p in (root / name).iterdir() if p.is_dir()):
            cases.append(case_folder(folder, classes, num_raters, REFUGE_SPLITS[name], cfg))
    return finish(cases, cfg, root)


def _source_folder(root: Path, source: str) -> Path:
    for child in root.iterdir():
        if child.is_dir() and child.name.lower() == source.lower():
            return child
    raise DataValidationError(
        f"{root}: no folder for RIGA source {source!r} (expected one of {list(RIGA_SOURCES)})"
    )


def list_riga(cfg: Mapping[str, Any]) -> list[Case]:
    """One RIGA source (``data.source``): outline copies of the original release, or per-case
    mask folders, whichever the folder holds (``data.layout``: auto, outlines or masks)."""
    root = data_root(cfg, "riga")
    folder = _source_folder(root, str(setting(cfg, "source", "riga")))
    num_raters = int(setting(cfg, "num_raters", "riga"))
    classes = class_names(cfg, _DEFAULT_CLASSES)
    layout = str(cfg.get("layout", "auto"))
    plains = sorted(p for p in folder.rglob("*prime.*") if p.suffix.lower() in PHOTO_SUFFIXES)
    if layout not in ("auto", "outlines", "masks"):
        raise DataValidationError(f"data.layout must be auto, outlines or masks, got {layout!r}")
    cases: list[Case] = []
    if layout == "outlines" or (layout == "auto" and plains):
        if classes != _DEFAULT_CLASSES:
            raise DataValidationError(
                f"RIGA outlines give classes {_DEFAULT_CLASSES}, not {classes}"
            )
        for plain in plains:
            cases.append(_outline_case(folder, plain, num_raters, cfg))
    else:
        for mask_dir in sorted({p.parent for p in folder.rglob("*_seg_*.png")}):
            cases.append(case_folder(mask_dir, classes, num_raters, None, cfg))
    return finish(cases, cfg, folder)


def _outline_case(folder: Path, plain: Path, num_raters: int, cfg: Mapping[str, Any]) -> Case:
    stem = plain.name[: -len("prime" + plain.suffix)]
    copies = sorted(
        plain.parent.glob(f"{stem}-*{plain.suffix}"),
        key=lambda p: int(p.stem.rsplit("-", 1)[-1]) if p.stem.rsplit("-", 1)[-1].isdigit() else 0,
    )
    copies = [p for p in copies if p.stem.rsplit("-", 1)[-1].isdigit()]
    if len(copies) != num_raters:
        raise DataValidationError(
            f"{plain}: {len(copies)} annotated copies ({[p.name for p in copies]}), the data "
            f"config says num_raters={num_raters}"
        )
    case_id = str(plain.parent.relative_to(folder) / stem).replace("\\", "/").lstrip("./")
    return RigaOutlineCase(
        case_id or stem,
        None,
        num_raters,
        files=(plain, *copies),
        group=case_id or stem,
        source="riga",
        num_classes=2,
        threshold=float(cfg.get("outline_threshold", 60)),
        min_area=int(cfg.get("outline_min_area", 30)),
    )


@dataclass
class RigaOutlineCase(Case):
    """A RIGA image: ``files[0]`` unannotated, ``files[1:]`` one outlined copy per rater."""

    threshold: float = 60.0  # grey-level difference that counts as a drawn line
    min_area: int = 30  # smallest region (pixels) an outline may enclose

    def load(self) -> RawCase:
        plain = read_array(self.files[0])
        masks = []
        for copy in self.files[1:]:
            annotated = read_array(copy)
            if annotated.values.shape != plain.values.shape:
                raise DataValidationError(
                    f"{copy}: size {annotated.values.shape} differs from the unannotated "
                    f"{self.files[0].name} {plain.values.shape}"
                )
            masks.append(
                masks_from_outlines(
                    plain.values, annotated.values, self.threshold, self.min_area, copy
                )
            )
        return RawCase(plain.values[None], np.stack(masks)[None], plain.spacing)  # type: ignore[arg-type]


def masks_from_outlines(
    plain: np.ndarray,
    annotated: np.ndarray,
    threshold: float = 60.0,
    min_area: int = 30,
    where: Path | str = "annotation",
) -> np.ndarray:
    """Disc and cup masks (2, H, W) uint8 from a copy of ``plain`` with both drawn as outlines.

    The drawn pixels are where the copy differs from the original by more than ``threshold``;
    small gaps in a line are closed; each closed line is filled; the largest filled region is
    the disc and the next the cup (kept inside the disc).
    """
    from scipy import ndimage

    drawn = np.abs(annotated.astype(np.float32) - plain.astype(np.float32)).max(axis=0) > threshold
    drawn = ndimage.binary_closing(drawn, structure=np.ones((3, 3)), border_value=0) | drawn
    labels, count = ndimage.label(drawn, structure=np.ones((3, 3)))
    regions = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        line = labels[box] == index
        filled = ndimage.binary_fill_holes(line)
        if int(filled.sum() - line.sum()) >= min_area:
            region = np.zeros(drawn.shape, dtype=bool)
            region[box] = filled
            regions.append(region)
    if len(regions) < 2:
        raise DataValidationError(
            f"{where}: found {len(regions)} closed outline(s), expected two (disc and cup); "
            "check data.outline_threshold"
        )
    regions.sort(key=lambda r: int(r.sum()), reverse=True)
    disc, cup = regions[0], regions[1] & regions[0]
    return np.stack([disc, cup]).astype(np.uint8)
