"""Training and inference speed and peak memory of MrPrism beside a plain U-Net.

``python -m benchmarks.speed [--presets tiny paper] [--devices cpu cuda] [--steps 3]``

Every (model, preset, device) runs in a fresh process, so its peak memory is its own: peak
resident memory (RSS) on CPU, ``torch.cuda.max_memory_allocated`` on GPU. The paper preset
runs at 256 px with batch 2, the tiny preset at 64 px with batch 8; M = 7 raters, K = 2.
Results: ``benchmarks/results/speed.json`` with MrPrism / U-Net ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch
from torch.utils.data import default_collate

from mrprism_core.cli_types import positive_int

from .common import RESULTS_DIR, write_json

SETTINGS = {"paper": {"image_size": 256, "batch": 2}, "tiny": {"image_size": 64, "batch": 8}}
RATERS = 7


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, preset: str, device_name: str, steps: int) -> dict[str, Any]:
    """One configuration, in this process."""
    from mrprism_core.data import make_dataset
    from mrprism_core.models import build_model
    from mrprism_core.train import move_batch

    device = torch.device(device_name)
    setting = SETTINGS[preset]
    size, batch_size = setting["image_size"], setting["batch"]
    data = make_dataset(batch_size, RATERS, size, seed=0)
    batch = move_batch(default_collate([data[i] for i in range(batch_size)]), device)
    torch.manual_seed(0)
    model = build_model(
        name, in_channels=3, num_classes=2, num_raters=RATERS, image_size=size, preset=preset
    ).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.backward(batch)
        optimizer.step()

    model.train()
    train_step()  # warm-up: kernel selection, allocator
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train_seconds = (time.perf_counter() - start) / steps

    model.eval()
    with torch.no_grad():
        model(batch["image"])
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(batch["image"])
        _sync(device)
    infer_seconds = (time.perf_counter() - start) / steps

    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": name,
        "preset": preset,
        "device": device_name,
        "image_size": size,
        "batch": batch_size,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_s_per_image": train_seconds / batch_size,
        "train_images_per_s": batch_size / train_seconds,
        "infer_s_per_image": infer_seconds / batch_size,
        "infer_images_per_s": batch_size / infer_seconds,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_rss",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"], choices=list(SETTINGS))
    parser.add_argument(
        "--devices", nargs="+", default=None, help="default: cpu (+ cuda if present)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=3, help="timed steps after one warm-up step"
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "speed.json"))
    parser.add_argument(
        "--worker", nargs=3, metavar=("MODEL", "PRESET", "DEVICE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(measure(*args.worker, steps=args.steps)))
        return

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows, ratios = [], []
    for device in devices:
        for preset in args.presets:
            pair = {}
            for name in ("mrprism", "unet_mv"):
                command = [sys.executable, "-m", "benchmarks.speed", "--steps", str(args.steps)]
                command += ["--worker", name, preset, device]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                row = json.loads(result.stdout.strip().splitlines()[-1])
                rows.append(row)
                pair[name] = row
                print(
                    f"{device:5} {preset:6} {name:8} train {row['train_s_per_image']:.3f} s/img  "
                    f"infer {row['infer_s_per_image']:.3f} s/img  "
                    f"peak {row['peak_memory_mb']:.0f} MB"
                )
            ratios.append(
                {
                    "device": device,
                    "preset": preset,
                    "train_time_ratio_mrprism_over_unet": pair["mrprism"]["train_s_per_image"]
                    / pair["unet_mv"]["train_s_per_image"],
                    "infer_time_ratio_mrprism_over_unet": pair["mrprism"]["infer_s_per_image"]
                    / pair["unet_mv"]["infer_s_per_image"],
                    "peak_memory_ratio_mrprism_over_unet": pair["mrprism"]["peak_memory_mb"]
                    / pair["unet_mv"]["peak_memory_mb"],
                }
            )
    write_json(args.out, {"settings": SETTINGS, "raters": RATERS, "runs": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
