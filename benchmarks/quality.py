"""Segmentation quality on synthetic multi-rater data: MrPrism (rec0 ... rec_tau) beside the
baselines (U-Net on majority vote / STAPLE, multi-head U-Net, MRNet, D-Persona, DiFF), and
label fusion scored against the truth (paper 000's Table 3 analogue).

``python -m benchmarks.quality [--epochs 20] [--raters 4] [--image-size 64] [--models ...]``

Every model trains through ``mrprism_core.train.fit`` (the centralized trainer) on the same
split and is scored on the same test split: soft Dice (paper 000, Table 1) per recurrence,
Dice against the known true mask, per-rater Dice, GED and ECE. Then the raters' masks of the
test split are fused by majority vote, STAPLE and MrPrism's Eq. 1 with the trained DivP's
confidences, and each fusion is scored against the true mask. Results:
``benchmarks/results/quality.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from mrprism_core.data.factory import build_dataset
from mrprism_core.label_fusion import evaluate_label_fusion
from mrprism_core.models import MODEL_NAMES
from mrprism_core.train import fit, load_model, make_loader

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
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODEL_NAMES),
        choices=MODEL_NAMES,
        help="models to train (mrprism first: its DivP scores the label fusion)",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "quality.json"))
    args = parser.parse_args(argv)

    results, fusion = {}, None
    for model in args.models:
        with tempfile.TemporaryDirectory() as out_dir:
            cfg = config(model, args, out_dir)
            start = time.perf_counter()
            outcome = fit(cfg)
            seconds = time.perf_counter() - start
            if model == "mrprism":
                trained, _ = load_model(Path(out_dir) / "last.pt")
                test_set = build_dataset(cfg["data"], "test")
                fusion = evaluate_label_fusion(trained, make_loader(test_set, 8, shuffle=False))
        test = outcome["test"]
        results[model] = {"test": test, "train_seconds": seconds}
        recs = {k: round(v, 4) for k, v in test.items() if k.startswith("soft_dice_rec")}
        ged = "-" if test.get("ged") is None else f"{test['ged']:.4f}"
        print(
            f"{model:15} soft Dice {test['soft_dice']:.4f}  "
            f"Dice vs truth {test['dice_vs_truth']:.4f}  GED {ged}  ECE {test['ece']:.4f}  "
            f"{recs}  ({seconds:.0f} s)"
        )
    if fusion is not None:
        print(
            "label fusion, Dice vs truth: " + ", ".join(f"{k} {v:.4f}" for k, v in fusion.items())
        )
    if "mrprism" not in results or "unet_mv" not in results:
        write_json(args.out, {"settings": vars(args), "results": results, "label_fusion": fusion})
        return
    mr = results["mrprism"]["test"]
    summary = {
        "recurrence_gain_soft_dice": mr["soft_dice"] - mr["soft_dice_rec0"],
        "mrprism_minus_unet_soft_dice": mr["soft_dice"] - results["unet_mv"]["test"]["soft_dice"],
        "mrprism_minus_unet_dice_vs_truth": mr["dice_vs_truth"]
        - results["unet_mv"]["test"]["dice_vs_truth"],
    }
    print(summary)
    write_json(
        args.out,
        {"settings": vars(args), "results": results, "summary": summary, "label_fusion": fusion},
    )


if __name__ == "__main__":
    main()
