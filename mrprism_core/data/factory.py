"""One entry point from a data config (a ``site_configs`` ``data`` block) to a Dataset."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from .cases import DataValidationError
from .files import FileDataset
from .preprocess import CaseCache, Preprocessing
from .readers import READERS
from .synthetic import ImageStyle, RaterProfile, make_dataset
from .views import CaseSubset, RaterSlots, RaterSubset

__all__ = [
    "SPLITS",
    "DataValidationError",
    "DatasetInfo",
    "EmptySplitError",
    "build_dataset",
    "dataset_info",
]

SPLITS = ("train", "val", "test")


class EmptySplitError(ValueError):
    """The data config declares no cases for this split (allowed for val/test)."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a site's data."""

    in_channels: int
    num_classes: int
    num_raters: int
    image_size: int


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (without importing OmegaConf here)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def _synthetic(cfg: dict[str, Any], split: str) -> Dataset:
    splits = cfg.get("splits") or {}
    if not int(splits.get(split) or 0):
        raise EmptySplitError(f"synthetic data config has no cases for split {split!r}: {splits}")
    style = ImageStyle(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.get("style", {}).items()}
    )
    raters = cfg.get("raters")
    profiles = None if raters is None else [RaterProfile(**r) for r in raters]
    return make_dataset(
        int(splits[split]),
        int(cfg["num_raters"]),
        int(cfg["image_size"]),
        # distinct, reproducible streams per split so splits never share a case
        int(cfg.get("seed", 0)) * len(SPLITS) + SPLITS.index(split),
        num_classes=int(cfg.get("num_classes", 2)),
        style=style,
        rater_profiles=profiles,
        name=str(cfg.get("name", "synthetic")),
    )


def _files(cfg: dict[str, Any], split: str) -> Dataset:
    """A file-based source: the reader lists every split's cases (so overlaps are caught),
    this split's become a :class:`FileDataset` over the shared preprocessing cache."""
    cases = READERS[cfg["kind"]](cfg)
    chosen = [case for case in cases if case.split == split]
    if not chosen:
        raise EmptySplitError(f"{cfg['kind']} data has no cases for split {split!r}")
    window = cfg.get("intensity_window")
    settings = Preprocessing(
        int(cfg.get("image_size", 256)), None if window is None else tuple(window)
    )
    return FileDataset(
        chosen,
        CaseCache(cfg.get("cache_dir"), settings),
        num_raters=int(cfg["num_raters"]),
        num_classes=int(cfg.get("num_classes") or chosen[0].num_classes),
    )


_BUILDERS = {"synthetic": _synthetic, **{kind: _files for kind in READERS}}


def build_dataset(data_cfg: Mapping[str, Any], split: str) -> Dataset:
    """Dataset for ``split`` ("train", "val" or "test") described by ``data_cfg``.

    Besides the source's own keys, any data config may re-cut the source:
    ``cases: {split: [indices]}`` keeps those cases of the split (virtual sites),
    ``rater_subset: [indices]`` keeps those raters, and ``rater_slots: {total, offset}`` places
    the raters into wider slots with a ``rater_valid`` mask (pooling sites).

    Raises:
        ValueError: unknown data kind or split, naming the valid ones.
        EmptySplitError: the config declares no cases for this split.
    """
    cfg = _plain(data_cfg)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    kind = cfg.get("kind")
    if kind not in _BUILDERS:
        raise ValueError(f"unknown data kind {kind!r}; choose one of {sorted(_BUILDERS)}")
    dataset = _BUILDERS[kind](cfg, split)
    cases = (cfg.get("cases") or {}).get(split)
    if cases is not None:
        if not cases:
            raise EmptySplitError(f"the data config selects no {split} cases")
        dataset = CaseSubset(dataset, cases)
    if cfg.get("rater_subset"):
        dataset = RaterSubset(dataset, cfg["rater_subset"])
    if cfg.get("rater_slots"):
        slots = cfg["rater_slots"]
        dataset = RaterSlots(dataset, int(slots["total"]), int(slots.get("offset", 0)))
    return dataset


def dataset_info(dataset: Dataset) -> DatasetInfo:
    """Channels, classes, raters and image size, read from the first sample."""
    sample = dataset[0]
    image, raters = sample["image"], sample["raters"]
    return DatasetInfo(
        in_channels=int(image.shape[0]),
        num_classes=int(raters.shape[1]),
        num_raters=int(raters.shape[0]),
        image_size=int(image.shape[-1]),
    )
