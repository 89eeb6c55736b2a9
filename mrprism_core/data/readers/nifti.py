"""NIfTI multi-rater sets: QUBIQ and BraTS-style multi-modal volumes.

QUBIQ (``data.task``, e.g. ``prostate``)::

    <root>/<task>/<case>/image.nii.gz              2-D image, 2-D multi-channel, or a volume
    <root>/<task>/<case>/task01_seg01.nii.gz       sub-task 01 (a class), rater 01

BraTS-style (``data.modalities``, rater label maps)::

    <root>/<case>/<case>_t1.nii.gz ... <case>_flair.nii.gz
    <root>/<case>/<case>_seg_1.nii.gz ...          rater r's label map (``data.rater_pattern``)

Volumes are cut into slices along their third axis.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..cases import Case, DataValidationError, FileCase, MaskFile
from .common import class_masks, class_names, data_root, finish, setting

__all__ = ["list_brats", "list_qubiq"]

_QUBIQ_MASK = re.compile(r"^task(?P<task>\d+)_seg(?P<rater>\d+)\.nii(\.gz)?$", re.IGNORECASE)


def _nifti(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def list_qubiq(cfg: Mapping[str, Any]) -> list[Case]:
    """One QUBIQ task; each sub-task in ``data.subtasks`` is a class."""
    root = data_root(cfg, "qubiq")
    task = str(setting(cfg, "task", "qubiq"))
    subtasks = [int(s) for s in (cfg.get("subtasks") or [1])]
    classes = class_names(cfg, [f"task{s:02d}" for s in subtasks])
    if len(classes) != len(subtasks):
        raise DataValidationError(f"data.classes {classes} do not match data.subtasks {subtasks}")
    num_raters = int(setting(cfg, "num_raters", "qubiq"))
    task_dir = root / task
    if not task_dir.is_dir():
        raise DataValidationError(f"{task_dir}: no QUBIQ task folder {task!r} under data.root")
    cases: list[Case] = []
    for folder in sorted(p for p in task_dir.iterdir() if p.is_dir()):
        image = _nifti(folder, "image")
        if image is None:
            raise DataValidationError(f"{folder}: no image.nii.gz")
        found: dict[int, set[int]] = {}
        for path in folder.iterdir():
            if match := _QUBIQ_MASK.match(path.name):
                found.setdefault(int(match["task"]), set()).add(int(match["rater"]))
        counts = {len(found.get(subtask, ())) for subtask in subtasks}
        if max(counts) > num_raters or (len(counts) == 1 and counts != {num_raters}):
            raise DataValidationError(
                f"{folder}: masks of {max(counts)} raters, the data config says "
                f"num_raters={num_raters}"
            )
        masks = []
        for rater in range(1, num_raters + 1):
            per_class = []
            for subtask in subtasks:
                path = _nifti(folder, f"task{subtask:02d}_seg{rater:02d}")
                if path is None:
                    raise DataValidationError(
                        f"{folder / f'task{subtask:02d}_seg{rater:02d}.nii.gz'}: missing rater "
                        f"mask (rater {rater}, sub-task {subtask:02d})"
                    )
                per_class.append(MaskFile(path))
            masks.append(tuple(per_class))
        cases.append(_file_case(f"{task}/{folder.name}", image, masks, "qubiq"))
    return finish(cases, cfg, task_dir)


def list_brats(cfg: Mapping[str, Any]) -> list[Case]:
    """BraTS-style cases: one NIfTI per modality and one label map per rater."""
    root = data_root(cfg, "brats")
    modalities = [str(m) for m in setting(cfg, "modalities", "brats")]
    classes = class_names(cfg, ["tumor"])
    num_raters = int(setting(cfg, "num_raters", "brats"))
    pattern = str(cfg.get("rater_pattern", "{case}_seg_{rater}"))
    cases: list[Case] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        case_id = folder.name
        images = []
        for modality in modalities:
            path = _nifti(folder, f"{case_id}_{modality}")
            if path is None:
                raise DataValidationError(
                    f"{folder / f'{case_id}_{modality}.nii.gz'}: missing modality {modality!r}"
                )
            images.append(path)
        masks = []
        for rater in range(1, num_raters + 1):
            stem = pattern.format(case=case_id, rater=rater)
            path = _nifti(folder, stem)
            if path is None:
                raise DataValidationError(
                    f"{folder / (stem + '.nii.gz')}: missing rater mask (rater {rater})"
                )
            masks.append(class_masks(path, classes, cfg))
        extra = _nifti(folder, pattern.format(case=case_id, rater=num_raters + 1))
        if extra is not None:
            raise DataValidationError(
                f"{extra}: more rater masks than the data config's num_raters={num_raters}"
            )
        cases.append(_file_case(case_id, tuple(images), masks, "brats"))
    return finish(cases, cfg, root)


def _file_case(
    case_id: str, images: Path | tuple[Path, ...], masks: list[tuple[MaskFile, ...]], source: str
) -> FileCase:
    images = images if isinstance(images, tuple) else (images,)
    mask_files = tuple(dict.fromkeys(m.path for rater in masks for m in rater))
    return FileCase(
        case_id,
        None,
        len(masks),
        files=(*images, *mask_files),
        group=case_id,
        source=source,
        images=images,
        masks=tuple(masks),
    )
