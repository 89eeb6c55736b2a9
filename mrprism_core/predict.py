"""Segment new cases with a trained model and write files clinicians can open.

``python -m mrprism_core.predict --checkpoint CKPT INPUT --out OUT`` for a centrally trained
checkpoint (``python -m mrprism_core.train``); hospitals use ``python -m client --site X
--predict INPUT --out OUT``, which runs the same :func:`predict_inputs` with the site's own
personalised model (shared weights + its rater heads).

For every case it writes, in the input's own format and geometry:

* ``calibrated_class<k>``: the calibrated mask of class k (MrPrism's ConP output after tau
  recurrences, thresholded at 0.5);
* ``rater<m>_class<k>``: rater m's personalised mask (DivP head m);
* ``uncertainty``: per-pixel disagreement of the raters: the entropy (bits) of the raters'
  mean probability, averaged over classes; 0 where every rater head is sure, 1 at most.

2-D inputs give PNGs at the original resolution; NIfTI inputs give NIfTI volumes with the
input's affine and header; DICOM series give NIfTI volumes in the series' patient space.
``summary.csv`` lists every case (area or volume per class, mean uncertainty, or the reason it
failed); a case that cannot be read is reported and skipped, the others are still predicted.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import atomic_write_bytes
from .cli_types import positive_int
from .data.images import ImageReadError, InputCase, find_inputs, read_case
from .mirroring import mirrored_forward
from .models.base import SegmentationModel

__all__ = ["CasePrediction", "predict_case", "predict_inputs", "write_case"]

SUMMARY = "summary.csv"


@dataclass
class CasePrediction:
    """Probabilities at the input's resolution: calibrated (N, K, H, W), raters
    (N, M, K, H, W) or None, uncertainty (N, H, W); N = slices (1 for 2-D)."""

    calibrated: np.ndarray
    raters: np.ndarray | None
    uncertainty: np.ndarray


def _model_size(model: SegmentationModel) -> int:
    return int(model.build_args.get("image_size", 256))


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


@torch.no_grad()
def predict_case(
    model: SegmentationModel,
    case: InputCase,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    mirror: bool = False,
) -> CasePrediction:
    """Run ``model`` on every slice of ``case`` at the model's training size, then resample the
    probabilities back to the input's size. ``mirror``: average over the 4 mirrorings of each
    slice (:func:`~mrprism_core.mirroring.mirrored_forward`).

    Raises:
        ImageReadError: the case's channel count is not the model's.
    """
    expected = int(model.build_args["in_channels"])
    if case.slices.shape[1] != expected:
        raise ImageReadError(
            f"{case.source}: {case.slices.shape[1]} channel(s), the model takes {expected}"
        )
    model.eval()
    size = _model_size(model)
    height, width = case.slices.shape[-2:]
    calibrated, raters = [], []
    for start in range(0, len(case.slices), batch_size):
        batch = torch.from_numpy(case.slices[start : start + batch_size]).to(device)
        resized = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
        output = mirrored_forward(model, resized) if mirror else model(resized)
        back = dict(size=(height, width), mode="bilinear", align_corners=False)
        calibrated.append(F.interpolate(output.calibrated, **back).cpu())
        if output.raters is not None:
            per_rater = output.raters.flatten(1, 2)
            raters.append(
                F.interpolate(per_rater, **back).unflatten(1, output.raters.shape[1:3]).cpu()
            )
    calibrated_t = torch.cat(calibrated)
    raters_t = torch.cat(raters) if raters else None
    consensus = raters_t.mean(dim=1) if raters_t is not None else calibrated_t
    uncertainty = _binary_entropy(consensus).mean(dim=1)
    return CasePrediction(
        calibrated_t.numpy(),
        raters_t.numpy() if raters_t is not None else None,
        uncertainty.numpy(),
    )


def _masks(prediction: CasePrediction) -> dict[str, np.ndarray]:
    """Output name -> (N, H, W) uint8 mask or float map."""
    maps: dict[str, np.ndarray] = {}
    for k in range(prediction.calibrated.shape[1]):
        maps[f"calibrated_class{k}"] = (prediction.calibrated[:, k] >= 0.5).astype(np.uint8)
    if prediction.raters is not None:
        for m in range(prediction.raters.shape[1]):
            for k in range(prediction.raters.shape[2]):
                maps[f"rater{m}_class{k}"] = (prediction.raters[:, m, k] >= 0.5).astype(np.uint8)
    maps["uncertainty"] = prediction.uncertainty.astype(np.float32)
    return maps


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_case(case: InputCase, prediction: CasePrediction, out_dir: Path) -> dict[str, Any]:
    """Write the case's outputs under ``out_dir/<case_id>/``; returns its summary row."""
    target = out_dir / case.case_id
    maps = _masks(prediction)
    if case.kind == "2d":
        for name, array in maps.items():
            pixels = array[0]
            if name == "uncertainty":
                pixels = np.round(np.clip(pixels, 0, 1) * 255)
            else:
                pixels = pixels * 255
            atomic_write_bytes(target / f"{name}.png", _png_bytes(pixels.astype(np.uint8)))
        unit, voxel = "pixels", 1.0
    else:
        import nibabel as nib

        for name, array in maps.items():
            volume = array.transpose(1, 2, 0)  # (N, H, W) slices back to (X, Y, Z)
            header = case.header.copy() if case.header is not None else None
            image = nib.Nifti1Image(volume, case.affine, header=header)
            image.set_data_dtype(np.float32 if name == "uncertainty" else np.uint8)
            if name != "uncertainty":
                image.header.set_slope_inter(1, 0)
            atomic_write_bytes(target / f"{name}.nii.gz", _nifti_bytes(image))
        unit, voxel = "mm3", float(np.prod(case.spacing)) if case.spacing else 1.0
    row: dict[str, Any] = {"case": case.case_id, "input": str(case.source), "status": "ok"}
    for k in range(prediction.calibrated.shape[1]):
        row[f"class{k}_{unit}"] = float(maps[f"calibrated_class{k}"].sum()) * voxel
    row["mean_uncertainty"] = float(prediction.uncertainty.mean())
    return row


def _nifti_bytes(image: Any) -> bytes:
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def predict_inputs(
    model: SegmentationModel,
    inputs: str | Path,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    mirror: bool = False,
) -> list[dict[str, Any]]:
    """Predict every case under ``inputs`` into ``out_dir``; writes ``summary.csv``.

    A case that cannot be read or does not fit the model is listed as failed (with the
    reason) and skipped. Returns the summary rows.
    """
    out = Path(out_dir)
    model = model.to(device)
    rows: list[dict[str, Any]] = []
    for path in tqdm(find_inputs(inputs), desc="predict", unit="case", disable=not progress):
        try:
            case = read_case(path)
            prediction = predict_case(model, case, device, batch_size, mirror=mirror)
            rows.append(write_case(case, prediction, out))
        except ImageReadError as err:
            rows.append({"case": path.name, "input": str(path), "status": f"failed: {err}"})
            print(f"skipped: {err}", file=sys.stderr)
    _write_summary(out / SUMMARY, rows)
    return rows


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode())


def run_cli(
    model: SegmentationModel,
    inputs: str,
    out_dir: str,
    device: str = "auto",
    batch_size: int = 8,
    mirror: bool = False,
) -> int:
    """Shared by both command lines: predict, print where the files went, exit status 0 only
    if every case was predicted."""
    from .train import resolve_device

    try:
        rows = predict_inputs(
            model, inputs, out_dir, resolve_device(device), batch_size, mirror=mirror
        )
    except ImageReadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"predicted {len(rows) - len(failed)} of {len(rows)} case(s) into {out_dir}")
    print(f"summary: {Path(out_dir) / SUMMARY}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mrprism_core.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input", help="an image, NIfTI file, DICOM series folder, or a folder of them"
    )
    parser.add_argument(
        "--checkpoint", required=True, help="model checkpoint (from mrprism_core.train)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 ..."
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="slices per forward pass"
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="average each slice's prediction over its 4 mirrorings (test-time mirroring, as "
        "nnU-Net predicts; 4x the inference time)",
    )
    args = parser.parse_args(argv)

    from .checkpoint import CorruptCheckpointError
    from .train import load_model

    try:
        model, _ = load_model(args.checkpoint)
    except (FileNotFoundError, CorruptCheckpointError, KeyError) as err:
        print(f"error: cannot load {args.checkpoint}: {err}", file=sys.stderr)
        return 2
    return run_cli(model, args.input, args.out, args.device, args.batch_size, args.mirror)


if __name__ == "__main__":
    sys.exit(main())
