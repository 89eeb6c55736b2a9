"""One reader per on-disk format. A reader maps a data config to the listed cases; the
Dataset, preprocessing and cache around it are shared (:mod:`mrprism_core.data.files`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..cases import Case
from .fundus import list_refuge, list_riga, masks_from_outlines
from .lidc import list_lidc
from .manifest import list_manifest
from .nifti import list_brats, list_qubiq

__all__ = ["READERS", "masks_from_outlines"]

READERS: dict[str, Callable[[Mapping[str, Any]], list[Case]]] = {
    "manifest": list_manifest,
    "refuge": list_refuge,
    "riga": list_riga,
    "qubiq": list_qubiq,
    "brats": list_brats,
    "lidc": list_lidc,
}
