"""How fast a site segments new cases: ``predict_inputs`` end to end (read, resize, tau
recurrences, resample back, write PNG / NIfTI, summary), on freshly initialised models.

``python -m benchmarks.predict [--presets tiny paper] [--cases 8] [--devices cpu cuda]``

* 2-D: ``--cases`` RGB PNGs of 256 x 256 px, a 256 px model;
* 3-D: one NIfTI volume of 256 x 256 x ``--slices`` (one channel), slice by slice.

Results: ``benchmarks/results/predict.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrprism_core.cli_types import positive_int
from mrprism_core.models import build_model
from mrprism_core.predict import predict_inputs

from .common import RESULTS_DIR, write_json

SIZE = 256


def _write_inputs(root: Path, cases: int, slices: int) -> tuple[Path, Path]:
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    images = root / "png"
    images.mkdir()
    for i in range(cases):
        pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"case{i:03d}.png")
    volumes = root / "nifti"
    volumes.mkdir()
    volume = rng.random((SIZE, SIZE, slices), dtype=np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.0, 1.0])), volumes / "volume.nii.gz")
    return images, volumes


def _time(model, inputs: Path, out: Path, device: str, batch: int) -> float:
    started = time.perf_counter()
    rows = predict_inputs(model, inputs, out, device=device, batch_size=batch, progress=False)
    assert all(r["status"] == "ok" for r in rows)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    parser.add_argument("--cases", type=positive_int, default=8, help="2-D cases")
    parser.add_argument("--slices", type=positive_int, default=16, help="slices of the 3-D volume")
    parser.add_argument("--raters", type=positive_int, default=7)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument(
        "--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "predict.json"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, volumes = _write_inputs(root, args.cases, args.slices)
        for device in args.devices:
            for preset in args.presets:
                for channels, inputs, unit, count in (
                    (3, images, "2d_cases_per_s", args.cases),
                    (1, volumes, "volume_slices_per_s", args.slices),
                ):
                    model = build_model(
                        "mrprism", in_channels=channels, num_classes=2,
                        num_raters=args.raters, image_size=SIZE, preset=preset,
                    )  # fmt: skip
                    seconds = _time(model, inputs, root / f"out-{device}-{preset}", device, 1)
                    seconds = _time(
                        model, inputs, root / f"out-{device}-{preset}", device, args.batch_size
                    )
                    row = {"device": device, "preset": preset, unit: count / seconds}
                    row["seconds"] = seconds
                    rows.append(row)
                    print(f"{device:5s} {preset:6s} {unit:22s} {count / seconds:7.2f}")
    write_json(args.out, {"settings": vars(args), "results": rows})


if __name__ == "__main__":
    main()
