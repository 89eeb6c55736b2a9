"""LIDC-IDRI: CT series (DICOM) with the radiologists' reads (XML), as 2-D nodule crops.

Layout as the public release unpacks (any depth under ``data.root``): a series folder holds
its ``*.dcm`` slices and the XML of up to four blinded/unblinded reading sessions. Each reading
session is one rater (in the XML's order). Nodules of 3 mm or more (those drawn as contours)
are matched across sessions by centroid distance (``data.match_distance_mm``); each matched
nodule gives one case: the slice where the raters' contours cover the most area, cropped to
``data.crop_size`` pixels around the nodule. A session that did not mark the nodule gives an
empty mask. Contours follow the LIDC convention (the drawn line lies just outside the nodule),
so the mask is the polygon's interior without its outline; ``inclusion=FALSE`` contours are
holes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cases import Case, DataValidationError, RawCase
from ..images import ImageReadError, read_dicom
from .common import data_root, finish, setting

__all__ = ["LidcNoduleCase", "list_lidc"]

Contour = tuple[bool, tuple[tuple[int, int], ...]]  # (inclusion, ((x, y), ...)) in pixels


@dataclass
class _Roi:
    sop_uid: str
    z: float
    inclusion: bool
    points: np.ndarray  # (P, 2) x (column), y (row)


@dataclass
class _Nodule:
    members: dict[int, list[_Roi]] = field(default_factory=dict)  # session -> its contours
    centroids: list[np.ndarray] = field(default_factory=list)

    @property
    def centroid(self) -> np.ndarray:
        return np.mean(self.centroids, axis=0)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _reads(xml: Path) -> list[list[list[_Roi]]] | None:
    """Per reading session, its nodules (each a list of contours); None if the XML is not a
    CT read (the release also holds radiograph reads)."""
    try:
        tree = ElementTree.parse(xml)
    except (ElementTree.ParseError, OSError) as err:
        raise DataValidationError(f"{xml}: unreadable XML ({err})") from err
    if _local(tree.getroot().tag) != "LidcReadMessage":
        return None
    sessions = []
    for session in tree.getroot().iterfind(".//{*}readingSession"):
        nodules = []
        for nodule in session.iterfind("{*}unblindedReadNodule"):
            rois = []
            for roi in nodule.iterfind("{*}roi"):
                try:
                    points = np.array(
                        [
                            (int(edge.findtext("{*}xCoord")), int(edge.findtext("{*}yCoord")))
                            for edge in roi.iterfind("{*}edgeMap")
                        ]
                    )
                    rois.append(
                        _Roi(
                            roi.findtext("{*}imageSOP_UID", "").strip(),
                            float(roi.findtext("{*}imageZposition", "nan")),
                            roi.findtext("{*}inclusion", "TRUE").strip().upper() == "TRUE",
                            points,
                        )
                    )
                except (TypeError, ValueError) as err:
                    raise DataValidationError(f"{xml}: malformed contour ({err})") from err
            if any(len(r.points) >= 3 for r in rois):  # < 3 mm nodules are a single point
                nodules.append([r for r in rois if len(r.points) >= 3])
        sessions.append(nodules)
    return sessions


def _series(folder: Path) -> dict[str, tuple[Path, tuple[float, float], float]]:
    """SOP instance UID -> (file, pixel spacing (row, column), slice thickness)."""
    index = {}
    for path in sorted(folder.glob("*.dcm")):
        try:
            header = read_dicom(path, pixels=False)
            spacing = tuple(float(v) for v in header.PixelSpacing)
        except (ImageReadError, AttributeError) as err:
            raise DataValidationError(f"{path}: unusable DICOM header ({err})") from err
        thickness = float(getattr(header, "SliceThickness", "nan") or "nan")
        index[str(header.SOPInstanceUID)] = (path, spacing, thickness)
    return index


def _match(
    sessions: list[list[list[_Roi]]], spacing: tuple[float, float], distance_mm: float
) -> list[_Nodule]:
    """Group the sessions' nodules that are the same nodule (centroids within distance_mm)."""
    found: list[_Nodule] = []
    for session, nodules in enumerate(sessions):
        for rois in nodules:
            points = np.concatenate([r.points for r in rois]).astype(float)
            z = np.mean([r.z for r in rois])
            centroid = np.array([*(points.mean(0) * (spacing[1], spacing[0])), z])
            candidates = [
                n
                for n in found
                if session not in n.members and np.linalg.norm(n.centroid - centroid) < distance_mm
            ]
            if candidates:
                nodule = min(candidates, key=lambda n: float(np.linalg.norm(n.centroid - centroid)))
            else:
                nodule = _Nodule()
                found.append(nodule)
            nodule.members[session] = rois
            nodule.centroids.append(centroid)
    return found


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def list_lidc(cfg: Mapping[str, Any]) -> list[Case]:
    root = data_root(cfg, "lidc")
    num_raters = int(setting(cfg, "num_raters", "lidc"))
    crop = int(cfg.get("crop_size", 64))
    distance_mm = float(cfg.get("match_distance_mm", 8.0))
    cases: list[Case] = []
    xmls = sorted(root.rglob("*.xml"))
    if not xmls:
        raise DataValidationError(f"{root}: no LIDC reads (*.xml beside the DICOM series)")
    for xml in xmls:
        sessions = _reads(xml)
        if sessions is None:
            continue
        if len(sessions) > num_raters:
            raise DataValidationError(
                f"{xml}: {len(sessions)} reading sessions, the data config says "
                f"num_raters={num_raters}"
            )
        series = _series(xml.parent)
        if not series:
            raise DataValidationError(f"{xml.parent}: XML reads but no *.dcm slices")
        spacing = next(iter(series.values()))[1]
        patient = xml.relative_to(root).parts[0] if len(xml.relative_to(root).parts) > 1 else ""
        for number, nodule in enumerate(_match(sessions, spacing, distance_mm), start=1):
            cases.append(_nodule_case(xml, series, nodule, number, patient, num_raters, crop))
    return finish(cases, cfg, root)


def _nodule_case(
    xml: Path,
    series: Mapping[str, tuple[Path, tuple[float, float], float]],
    nodule: _Nodule,
    number: int,
    patient: str,
    num_raters: int,
    crop: int,
) -> Case:
    area: dict[str, float] = {}
    for rois in nodule.members.values():
        for roi in rois:
            if roi.sop_uid not in series:
                raise DataValidationError(
                    f"{xml}: a contour refers to image {roi.sop_uid}, which is not among the "
                    f"DICOM files in {xml.parent}"
                )
            sign = 1.0 if roi.inclusion else -1.0
            area[roi.sop_uid] = area.get(roi.sop_uid, 0.0) + sign * _polygon_area(roi.points)
    central = max(sorted(area), key=lambda uid: area[uid])
    on_slice = [r for rois in nodule.members.values() for r in rois if r.sop_uid == central]
    centre_x, centre_y = np.concatenate([r.points for r in on_slice]).mean(0)
    contours = tuple(
        tuple(
            (r.inclusion, tuple((int(x), int(y)) for x, y in r.points))
            for r in nodule.members.get(session, [])
            if r.sop_uid == central
        )
        for session in range(num_raters)
    )
    path, pixel_spacing, thickness = series[central]
    stem = f"{patient}_" if patient else ""
    return LidcNoduleCase(
        f"{stem}{xml.stem}_nodule{number:02d}",
        None,
        num_raters,
        files=(path, xml),
        group=patient or xml.stem,
        source="lidc",
        contours=contours,
        centre=(float(centre_y), float(centre_x)),
        crop_size=crop,
        spacing=(*pixel_spacing, thickness),
    )


@dataclass
class LidcNoduleCase(Case):
    """One nodule on one CT slice (``files[0]``), each rater's contours on that slice."""

    contours: tuple[tuple[Contour, ...], ...] = ()
    centre: tuple[float, float] = (0.0, 0.0)  # (row, column) of the nodule in the slice
    crop_size: int = 64
    spacing: tuple[float, ...] = ()

    def window(self, height: int, width: int) -> tuple[slice, slice]:
        """The ``crop_size`` square around the nodule, kept inside the slice."""
        size = self.crop_size
        if size > min(height, width):
            raise DataValidationError(
                f"{self.files[0]}: crop_size {size} exceeds the slice {height}x{width}"
            )
        top = int(np.clip(round(self.centre[0] - size / 2), 0, height - size))
        left = int(np.clip(round(self.centre[1] - size / 2), 0, width - size))
        return slice(top, top + size), slice(left, left + size)

    def load(self) -> RawCase:
        from PIL import Image, ImageDraw

        try:
            dicom = read_dicom(self.files[0])
            pixels = dicom.pixel_array.astype(np.float32)
        except (ImageReadError, AttributeError, ValueError) as err:
            raise DataValidationError(str(err)) from err
        hounsfield = pixels * float(getattr(dicom, "RescaleSlope", 1.0)) + float(
            getattr(dicom, "RescaleIntercept", 0.0)
        )
        rows, cols = self.window(*hounsfield.shape)
        masks = []
        for rater in self.contours:
            canvas = Image.new("L", (hounsfield.shape[1], hounsfield.shape[0]), 0)
            draw = ImageDraw.Draw(canvas)
            for inclusion, points in sorted(rater, key=lambda c: not c[0]):  # holes last
                draw.polygon(list(points), fill=1 if inclusion else 0, outline=0)
            masks.append(np.asarray(canvas, dtype=np.uint8)[rows, cols][None])
        image = hounsfield[rows, cols][None, None]
        spacing = (*self.spacing, float("nan"), float("nan"), float("nan"))[:3]
        return RawCase(image, np.stack(masks)[None], spacing)  # type: ignore[arg-type]
