"""A hospital's own data, listed in a manifest (CSV or YAML). Paths are relative to the
manifest's folder unless absolute.

CSV, one row per case::

    id,split,image,rater1_disc,rater1_cup,rater2_disc,rater2_cup
    case001,train,img/case001.png,masks/case001_r1_disc.png,...

* ``image``, or several ``image_<name>`` columns (modalities, stacked as channels in column
  order); PNG/JPEG or NIfTI;
* ``rater<r>_<class>`` per rater and class (classes from ``data.classes``), or ``rater<r>``:
  one file per rater, a binary mask for one class or a label map with ``data.labels``;
* ``id`` (default: the image's file name), ``split`` (train/val/test; default: assigned by
  ``data.split_fractions``) and ``diagnosis`` (0 or 1 per case, e.g. glaucoma; what DiFF
  needs) are optional. Every case or none must have a diagnosis.

YAML: ``cases:`` a list of ``{id, split, image: path or [paths], raters: [path or
{class: path}]}``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..cases import Case, DataValidationError, FileCase, MaskFile, split_name
from .common import class_masks, class_names, finish, setting

__all__ = ["list_manifest"]

_RATER_COLUMN = re.compile(r"^rater(?P<rater>\d+)(?:_(?P<cls>.+))?$")


def list_manifest(cfg: Mapping[str, Any]) -> list[Case]:
    manifest = Path(str(setting(cfg, "manifest", "manifest"))).expanduser()
    if not manifest.is_file():
        raise DataValidationError(f"{manifest}: data.manifest does not exist")
    rows = (
        _yaml_rows(manifest)
        if manifest.suffix.lower() in (".yaml", ".yml")
        else _csv_rows(manifest)
    )
    classes = class_names(cfg, ["foreground"])
    cases: list[Case] = []
    for number, row in enumerate(rows, start=1):
        cases.append(_case(row, manifest, number, classes, cfg))
    diagnosed = {case.diagnosis is not None for case in cases}
    if len(diagnosed) > 1:  # a batch would mix samples with and without the key
        raise DataValidationError(f"{manifest}: some cases have a diagnosis and some do not")
    return finish(cases, cfg, manifest)


def _csv_rows(manifest: Path) -> list[dict[str, Any]]:
    """CSV rows -> the YAML row form."""
    try:
        with manifest.open(newline="") as handle:
            table = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataValidationError(f"{manifest}: unreadable CSV ({err})") from err
    rows = []
    for line in table:
        images = [v for k, v in line.items() if k and (k == "image" or k.startswith("image_"))]
        raters: dict[int, Any] = {}
        for column, value in line.items():
            match = _RATER_COLUMN.match(column or "")
            if not match:
                continue
            rater = int(match["rater"])
            if match["cls"] is None:
                raters[rater] = value
            else:
                raters.setdefault(rater, {})[match["cls"]] = value
        rows.append(
            {
                "id": line.get("id") or None,
                "split": line.get("split") or None,
                "diagnosis": line.get("diagnosis") or None,
                "image": images,
                "raters": [raters[r] for r in sorted(raters)],
            }
        )
    return rows


def _yaml_rows(manifest: Path) -> list[dict[str, Any]]:
    from omegaconf import OmegaConf

    try:
        loaded = OmegaConf.to_container(OmegaConf.load(manifest))
    except Exception as err:  # noqa: BLE001 - YAML and OmegaConf errors vary
        raise DataValidationError(f"{manifest}: unreadable YAML ({err})") from err
    rows = loaded.get("cases") if isinstance(loaded, dict) else None
    if not isinstance(rows, list):
        raise DataValidationError(f"{manifest}: expected a top-level 'cases:' list")
    return rows


def _case(
    row: Mapping[str, Any], manifest: Path, number: int, classes: list[str], cfg: Mapping[str, Any]
) -> Case:
    where = f"{manifest} case {number}"
    images = row.get("image")
    images = [images] if isinstance(images, str) else list(images or [])
    if not images or not all(images):
        raise DataValidationError(f"{where}: no image path")
    image_paths = tuple(_existing(manifest, p, "image", where) for p in images)
    raters = row.get("raters") or []
    num_raters = int(setting(cfg, "num_raters", "manifest"))
    if len(raters) != num_raters:
        raise DataValidationError(
            f"{where}: {len(raters)} raters listed, the data config says num_raters={num_raters}"
        )
    masks = []
    for rater, entry in enumerate(raters, start=1):
        if isinstance(entry, Mapping):
            per_class = []
            for name in classes:
                path = entry.get(name)
                if not path:
                    raise DataValidationError(
                        f"{where}: missing rater mask (rater {rater}, {name})"
                    )
                per_class.append(
                    MaskFile(
                        _existing(manifest, path, f"rater mask (rater {rater}, {name})", where)
                    )
                )
            masks.append(tuple(per_class))
        elif entry:
            path = _existing(manifest, entry, f"rater mask (rater {rater})", where)
            masks.append(class_masks(path, classes, cfg))
        else:
            raise DataValidationError(f"{where}: missing rater mask (rater {rater})")
    case_id = str(row.get("id") or image_paths[0].name.split(".")[0])
    split = row.get("split")
    diagnosis = row.get("diagnosis")
    if diagnosis is not None:
        try:
            diagnosis = float(diagnosis)
        except (TypeError, ValueError) as err:
            raise DataValidationError(f"{where}: diagnosis {diagnosis!r} is not 0 or 1") from err
        if diagnosis not in (0.0, 1.0):
            raise DataValidationError(f"{where}: diagnosis {diagnosis!r} is not 0 or 1")
    return FileCase(
        case_id,
        None if split is None else split_name(split, where),
        num_raters,
        files=(*image_paths, *dict.fromkeys(m.path for r in masks for m in r)),
        group=case_id,
        source="manifest",
        images=image_paths,
        masks=tuple(masks),
        diagnosis=diagnosis,
    )


def _existing(manifest: Path, value: Any, what: str, where: str) -> Path:
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else manifest.parent / path
    if not path.is_file():
        raise DataValidationError(f"{path}: missing {what}, listed in {where}")
    return path
