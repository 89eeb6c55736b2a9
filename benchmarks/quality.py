"""Segmentation quality on synthetic multi-rater data: MrPrism (rec0 ... rec_tau) beside a
plain U-Net on the same encoder trained on majority-vote labels.

``python -m benchmarks.quality [--epochs 20] [--raters 4] [--image-size 64]``

Both models train through ``mrprism_core.train.fit`` (the centralized trainer) on the same
split and are scored on the same test split: soft Dice (paper 000, Table 1) per recurrence,
Dice against the known true mask, per-rater Dice, GED and ECE. Results:
``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from mrprism_core.train import fit

from .common import RESULTS_DIR, write_json


def config(model: str, args: argparse.Namespace, out_dir: str) -> dict:
    return {
        "train": {
            "epochs": args.epochs,
            "batch_size": 8,
            "lr": None,
            "device": "auto",
            "seed": args.seed,
            "progress": False,
        },
        "model": {"name": model, "preset": "tiny", "options": {}},
        "data": {
            "kind": "synthetic",
            "num_raters": args.raters,
            "num_classes": 2,
            "image_size": args.image_size,
            "seed": args.seed,
            "splits": {"train": args.train_cases, "val": 16, "test": args.test_cases},
        },
        "out_dir": out_dir,
        "resume": False,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--raters", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-cases", type=int, default=96)
    parser.add_argument("--test-cases", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR / "quality.json"))
    args = parser.parse_args(argv)

    results = {}
    for model in ("mrprism", "unet_mv"):
        with tempfile.TemporaryDirectory() as out_dir:
            start = time.perf_counter()
            outcome = fit(config(model, args, out_dir))
            seconds = time.perf_counter() - start
        test = outcome["test"]
        results[model] = {"test": test, "train_seconds": seconds}
        recs = {k: round(v, 4) for k, v in test.items() if k.startswith("soft_dice_rec")}
        print(
            f"{model:8} soft Dice {test['soft_dice']:.4f}  "
            f"Dice vs truth {test['dice_vs_truth']:.4f}  ECE {test['ece']:.4f}  "
            f"{recs}  ({seconds:.0f} s)"
        )
    mr = results["mrprism"]["test"]
    summary = {
        "recurrence_gain_soft_dice": mr["soft_dice"] - mr["soft_dice_rec0"],
        "mrprism_minus_unet_soft_dice": mr["soft_dice"] - results["unet_mv"]["test"]["soft_dice"],
        "mrprism_minus_unet_dice_vs_truth": mr["dice_vs_truth"]
        - results["unet_mv"]["test"]["dice_vs_truth"],
    }
    print(summary)
    write_json(args.out, {"settings": vars(args), "results": results, "summary": summary})


if __name__ == "__main__":
    main()
