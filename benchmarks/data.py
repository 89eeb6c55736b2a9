"""How fast a site's data is read: the first epoch decodes every file (and fills the cache),
later epochs read the preprocessed arrays.

``python -m benchmarks.data [--cases 100] [--raters 7] [--height 2124 --width 2056]``

Writes a REFUGE-like tree of synthetic fundus JPEGs (``--height`` x ``--width``) with
``--raters`` disc and cup PNG masks each into a temp dir, then times passes over
``build_dataset(kind=refuge, image_size=256)``: the first epoch with ``cache_dir: null``
(decode, arrays kept in memory, nothing written), and the first and second epoch with the
disk cache, each on a fresh Dataset as a new round or process would build it. Also times a
full-resolution JPEG decode against the draft mode the reader uses (reduced DCT scale).

Results: ``benchmarks/results/data.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mrprism_core.cli_types import positive_int
from mrprism_core.data.factory import build_dataset
from mrprism_core.data.images import read_2d_pixels

from .common import RESULTS_DIR, write_json


def write_tree(root: Path, cases: int, raters: int, height: int, width: int) -> None:
    """Fundus-like JPEGs (smooth background, bright disc) and per-rater disc / cup PNGs."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    for case in tqdm(range(cases), desc="writing the tree", unit="case"):
        case_id = f"g{case:04d}"
        folder = root / "Training-400" / case_id
        folder.mkdir(parents=True)
        cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
        radius = min(height, width) * 0.08
        distance = np.hypot(rows - cy, cols - cx)
        red = 120 + 90 * np.exp(-((distance / (3 * radius)) ** 2))
        pixels = np.stack([red, red * 0.55, red * 0.3], axis=-1)
        pixels += rng.normal(0, 4, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"{case_id}.jpg", quality=90
        )
        for rater in range(1, raters + 1):
            for name, scale in (("disc", 1.0), ("cup", 0.5)):
                r = radius * scale * (1 + 0.05 * (rater - raters / 2))
                mask = Image.new("L", (width, height), 0)
                ImageDraw.Draw(mask).ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
                mask.save(folder / f"{case_id}_seg_{name}_{rater}.png")


def _epoch(dataset: Any, label: str) -> float:
    start = time.perf_counter()
    for index in tqdm(range(len(dataset)), desc=label, unit="case", leave=False):
        dataset[index]
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root / "refuge", args.cases, args.raters, args.height, args.width)
        cfg = {
            "kind": "refuge",
            "root": str(root / "refuge"),
            "num_raters": args.raters,
            "image_size": args.size,
        }
        photos = sorted((root / "refuge").rglob("*.jpg"))
        start = time.perf_counter()
        for photo in photos:
            read_2d_pixels(photo)
        full_jpeg = time.perf_counter() - start
        start = time.perf_counter()
        for photo in photos:
            read_2d_pixels(photo, draft_size=args.size)
        draft_jpeg = time.perf_counter() - start

        in_memory = _epoch(build_dataset({**cfg, "cache_dir": None}, "train"), "epoch 1 (memory)")
        cached_cfg = {**cfg, "cache_dir": str(root / "cache")}
        first = _epoch(build_dataset(cached_cfg, "train"), "epoch 1 (decode + cache)")
        # a fresh Dataset, as a new round or process would build: only the disk cache helps
        second = _epoch(build_dataset(cached_cfg, "train"), "epoch 2 (cached)")
        cache_bytes = sum(p.stat().st_size for p in (root / "cache").iterdir())
    n = args.cases
    result = {
        "cases": n,
        "raters": args.raters,
        "source_size": [args.height, args.width],
        "image_size": args.size,
        "epoch1_decode_cases_per_s": n / first,
        "epoch2_cached_cases_per_s": n / second,
        "cached_vs_decode_speedup": first / second,
        "epoch1_memory_cache_cases_per_s": n / in_memory,
        "jpeg_full_decode_per_s": n / full_jpeg,
        "jpeg_draft_decode_per_s": n / draft_jpeg,
        "cache_mb_per_case": cache_bytes / n / 2**20,
    }
    for key, value in result.items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=positive_int, default=100, help="cases in the tree")
    parser.add_argument("--raters", type=positive_int, default=7, help="raters per case")
    parser.add_argument("--height", type=positive_int, default=2124, help="photograph height (px)")
    parser.add_argument("--width", type=positive_int, default=2056, help="photograph width (px)")
    parser.add_argument("--size", type=positive_int, default=256, help="resize target (px)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "data.json"), help="JSON output")
    args = parser.parse_args()
    write_json(args.out, run(args))


if __name__ == "__main__":
    main()
