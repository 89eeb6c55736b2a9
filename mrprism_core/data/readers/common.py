"""What every reader needs from its data config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..cases import Case, DataValidationError, MaskFile, assign_splits
from ..files import check_split_overlap

__all__ = ["class_names", "class_masks", "data_root", "finish", "setting"]


def setting(cfg: Mapping[str, Any], key: str, kind: str) -> Any:
    """A required data-config key, with a message that says which."""
    if cfg.get(key) in (None, "", "???"):
        raise DataValidationError(f"data config of kind {kind!r} needs data.{key}")
    return cfg[key]


def data_root(cfg: Mapping[str, Any], kind: str) -> Path:
    root = Path(str(setting(cfg, "root", kind))).expanduser()
    if not root.is_dir():
        raise DataValidationError(f"{root}: data.root does not exist or is not a folder")
    return root


def class_names(cfg: Mapping[str, Any], default: list[str]) -> list[str]:
    """``data.classes`` (or ``data.labels``' keys), checked against ``data.num_classes``."""
    labels = cfg.get("labels")
    names = [str(c) for c in (cfg.get("classes") or (list(labels) if labels else default))]
    declared = cfg.get("num_classes")
    if declared is not None and int(declared) != len(names):
        raise DataValidationError(
            f"data.num_classes={declared} but the classes are {names}; make them agree"
        )
    return names


def class_masks(path: Path, classes: list[str], cfg: Mapping[str, Any]) -> tuple[MaskFile, ...]:
    """One file holding all classes of a rater: a label map (``data.labels``) or, with one
    class, a binary mask."""
    labels = cfg.get("labels")
    if labels:
        return tuple(MaskFile(path, tuple(int(v) for v in _as_list(labels[c]))) for c in classes)
    if len(classes) != 1:
        raise DataValidationError(
            f"{path}: one mask file per rater for {len(classes)} classes {classes}: give "
            "data.labels (class -> label values) or one file per class"
        )
    return (MaskFile(path),)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def finish(cases: list[Case], cfg: Mapping[str, Any], where: str | Path) -> list[Case]:
    """Splits for cases the source does not split, overlap check, and no empty data set."""
    if not cases:
        raise DataValidationError(f"{where}: empty data set, no cases found")
    assign_splits(cases, cfg.get("split_fractions"), int(cfg.get("split_seed", 0)), str(where))
    check_split_overlap(cases, str(where))
    return cases
