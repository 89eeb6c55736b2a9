"""Segmentation quality on synthetic multi-rater data, over several seeds: MrPrism rec0 ...
rec_tau (a Table-1-style table) beside the baselines (U-Net on majority vote / STAPLE,
multi-head U-Net, MRNet, D-Persona, DiFF), and label fusion scored against the truth (paper
000's Table 3 analogue).

``python -m benchmarks.quality [--seeds 3] [--site synthetic_hard] [--epochs 20] [--models ...]
[--mirror]``

Every model trains through ``mrprism_core.train.fit`` (the centralized trainer) on the same
split, keeps the epoch that scored best on the validation split (soft Dice), and is scored on
the same test split: soft Dice (paper 000, Table 1), Dice against the known true mask,
per-rater Dice, GED and ECE, and for MrPrism each of them per recurrence. Soft Dice scores a
model's calibrated output against the raters' mean; D-Persona's calibrated output *is* the mean
of its rater outputs, MrPrism's is its estimate of the structure, so every model with rater
outputs also gets the soft Dice of their mean (``heads_mean_soft_dice``). Then the raters'
masks of the test split are fused by majority vote, STAPLE and MrPrism's Eq. 1 under the
trained DivP's reliabilities, and each fusion is scored against the true mask; the true mask's
own soft Dice is the reference a calibrated mask aims at (``true_mask_soft_dice``). With
``--mirror`` each trained model is also scored under test-time mirroring
(``mrprism_core.mirroring``), a ``<model>+mirror`` row beside its own. Each number is
reported as mean and standard deviation over the seeds (data, initial weights and shuffles
all change with the seed). ``--site`` takes the data block of a site config
(``site_configs/<site>.yaml``, e.g. ``synthetic_hard`` or ``synthetic_nodule_a``); without it
the embedded synthetic default is used. Results: ``benchmarks/results/quality.json`` (or
``--out``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from mrprism_core.cli_types import positive_int
from mrprism_core.data.factory import build_dataset
from mrprism_core.label_fusion import evaluate_label_fusion
from mrprism_core.metrics import RECURRENCE_METRICS, MetricAccumulator, recurrence_table
from mrprism_core.models import MODEL_NAMES
from mrprism_core.train import evaluate, fit, load_model, make_loader

from .common import RESULTS_DIR, spread, write_json

#: Test metrics summarised per model.
MODEL_METRICS = (
    "soft_dice",
    "dice_vs_truth",
    "per_rater_dice",
    "ged",
    "ece",
    "heads_mean_soft_dice",
    "train_seconds",
)


def data_config(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The data block: a site config's (``--site``) or the embedded default, seeded."""
    if args.site:
        from client.site_config import compose_site_config

        data = dict(compose_site_config(args.site)["data"])
        data["seed"] = int(data.get("seed", 0)) + 1000 * seed
        if args.train_cases is not None:
            data["splits"] = {**data["splits"], "train": args.train_cases}
        return data
    return {
        "kind": "synthetic",
        "num_raters": args.raters,
        "num_classes": 2,
        "image_size": args.image_size,
        "seed": seed,
        "splits": {"train": args.train_cases or 96, "val": 16, "test": args.test_cases},
    }


def config(
    model: str, args: argparse.Namespace, seed: int, out_dir: str, options: Mapping[str, Any]
) -> dict:
    return {
        "train": {
            "epochs": args.epochs,
            "batch_size": 8,
            "lr": None,
            "device": "auto",
            "seed": seed,
            "augment": args.augment,
            "progress": False,
            "keep_best": True,
        },
        "model": {"name": model, "preset": "tiny", "options": dict(options)},
        "data": data_config(args, seed),
        "out_dir": out_dir,
        "resume": False,
    }


def true_mask_soft_dice(dataset: Dataset) -> float | None:
    """Soft Dice of the true mask itself against the raters' mean: what an exact estimate of
    the structure scores, the reference for a calibrated mask (the raters' mean scores 1).
    None when the data has no true mask."""
    metrics = MetricAccumulator()  # the one evaluation, scoring the true mask as the output
    for batch in make_loader(dataset, 8, shuffle=False):
        if "truth" not in batch:
            return None
        metrics.update(
            batch["truth"].float(), batch["raters"], rater_valid=batch.get("rater_valid")
        )
    return metrics.compute()["soft_dice"]


def _mean_per_rater(test: Mapping[str, Any]) -> float | None:
    values = [x for x in test.get("per_rater_dice") or [] if x is not None]
    return sum(values) / len(values) if values else None


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-seed runs of one model -> mean/std of every metric and of every recurrence row."""
    summary = {name: spread([run[name] for run in runs]) for name in MODEL_METRICS}
    tables = [run["recurrences"] for run in runs]
    if tables and tables[0]:
        summary["recurrences"] = [
            {name: spread([table[i][name] for table in tables]) for name in RECURRENCE_METRICS}
            for i in range(len(tables[0]))
        ]
    return summary


def _fmt(cell: Mapping[str, float] | None, scale: float = 100.0) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean'] * scale:.1f} ± {cell['std'] * scale:.1f}"


def print_tables(
    models: Mapping[str, Any],
    fusion: Mapping[str, Any] | None,
    truth_soft_dice: Mapping[str, float] | None = None,
) -> None:
    print("\nmodel (test, mean ± std over seeds, x100)")
    print(
        f"{'model':32} {'soft Dice':>12} {'Dice vs truth':>14} {'per-rater':>12} {'GED':>12} "
        f"{'heads mean':>12}"
    )
    for name, row in models.items():
        print(
            f"{name:32} {_fmt(row['soft_dice']):>12} {_fmt(row['dice_vs_truth']):>14} "
            f"{_fmt(row['per_rater_dice']):>12} {_fmt(row['ged']):>12} "
            f"{_fmt(row['heads_mean_soft_dice']):>12}"
        )
    for name, row in models.items():
        if "recurrences" not in row:
            continue
        print(f"\n{name}: per recurrence (Table 1 style)")
        for index, rec in enumerate(row["recurrences"]):
            print(
                f"  rec{index}  soft Dice {_fmt(rec['soft_dice'])}  "
                f"Dice vs truth {_fmt(rec['dice_vs_truth'])}  "
                f"per-rater {_fmt(rec['per_rater_dice'])}  GED {_fmt(rec['ged'])}"
            )
    if fusion:
        print("\nlabel fusion vs truth: " + ", ".join(f"{k} {_fmt(v)}" for k, v in fusion.items()))
    if truth_soft_dice:
        print(f"soft Dice of the true mask itself (raters' mean: 100): {_fmt(truth_soft_dice)}")


def _scores(test: Mapping[str, Any], seconds: float, best_epoch: int | None) -> dict[str, Any]:
    return {
        "soft_dice": test["soft_dice"],
        "dice_vs_truth": test.get("dice_vs_truth"),
        "per_rater_dice": _mean_per_rater(test),
        "ged": test.get("ged"),
        "ece": test.get("ece"),
        "heads_mean_soft_dice": test.get("heads_mean_soft_dice"),
        "train_seconds": seconds,
        "best_epoch": best_epoch,
        "recurrences": recurrence_table(test),
    }


def run_model(
    model: str, args: argparse.Namespace, seed: int, options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, float] | None, dict[str, Any] | None]:
    """Train and test one model at one seed: its scores; for MrPrism the label fusions'; with
    ``args.mirror`` the same trained model's scores under test-time mirroring (else None)."""
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = config(model, args, seed, out_dir, options)
        start = time.perf_counter()
        outcome = fit(cfg)
        seconds = time.perf_counter() - start
        fusion = mirrored = None
        if model == "mrprism" or args.mirror:
            tested = Path(out_dir) / "best.pt"  # absent without a validation split
            trained, _ = load_model(tested if tested.exists() else Path(out_dir) / "last.pt")
            test_loader = make_loader(build_dataset(cfg["data"], "test"), 8, shuffle=False)
            if model == "mrprism":
                fusion = evaluate_label_fusion(trained, test_loader)
            if args.mirror:
                test = evaluate(trained, test_loader, mirror=True)
                mirrored = _scores(test, seconds, outcome.get("best_epoch"))
    return _scores(outcome["test"], seconds, outcome.get("best_epoch")), fusion, mirrored


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``name`` or ``label=name:key=value,key=value`` (a model with options, e.g.
    ``mrprism_mh=mrprism:divp_supervision=shuffle+multihead``)."""
    label, _, rest = text.partition("=") if "=" in text.split(":")[0] else (text, "", text)
    model, _, opts = rest.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            options[key] = value.lower() == "true"
            continue
        try:
            options[key] = float(value) if "." in value else int(value)
        except ValueError:
            options[key] = value
    if model not in MODEL_NAMES:
        raise SystemExit(f"unknown model {model!r} in {text!r}; choose from {list(MODEL_NAMES)}")
    return label, model, options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--site", default=None, help="take the data of this site config")
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--raters", type=positive_int, default=4, help="embedded default only")
    parser.add_argument("--image-size", type=positive_int, default=64, help="embedded default only")
    parser.add_argument(
        "--train-cases",
        type=positive_int,
        default=None,
        help="training cases (default: 96, or the site's)",
    )
    parser.add_argument("--test-cases", type=positive_int, default=64, help="embedded default only")
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODEL_NAMES),
        help="models, or label=model:key=value,... variants with options "
        f"(models: {', '.join(MODEL_NAMES)})",
    )
    parser.add_argument(
        "--augment",
        action="store_true",
        help="flip and turn the training cases at random (train.augment; off by default)",
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="also score each trained model under test-time mirroring (a <model>+mirror row)",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "quality.json"))
    args = parser.parse_args(argv)
    variants = [parse_variant(text) for text in args.models]

    per_seed: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in variants}
    fusions: list[dict[str, float]] = []
    references = [
        true_mask_soft_dice(build_dataset(data_config(args, seed), "test"))
        for seed in range(args.seeds)
    ]
    truth_soft_dice = spread(references)  # None without a true mask
    for seed in range(args.seeds):
        for label, model, options in variants:
            run, fusion, mirrored = run_model(model, args, seed, options)
            per_seed[label].append(run)
            if mirrored is not None:
                per_seed.setdefault(f"{label}+mirror", []).append(mirrored)
            if fusion is not None and label == model:
                fusions.append(fusion)
            print(
                f"seed {seed} {label:28} soft Dice {run['soft_dice']:.4f}  Dice vs truth "
                f"{run['dice_vs_truth'] or float('nan'):.4f}  ({run['train_seconds']:.0f} s)",
                flush=True,
            )
    models = {label: summarise(runs) for label, runs in per_seed.items()}
    fusion = {name: spread([f[name] for f in fusions]) for name in fusions[0]} if fusions else None
    print_tables(models, fusion, truth_soft_dice)
    write_json(
        args.out,
        {
            "settings": {**vars(args), "models": args.models},
            "models": models,
            "label_fusion": fusion,
            "true_mask_soft_dice": truth_soft_dice,
            "per_seed": per_seed,
        },
    )


if __name__ == "__main__":
    main()
