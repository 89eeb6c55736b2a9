"""Annotation-quality-aware aggregation, measured: one hospital with poor raters among clean
ones (``python -m simulation.run preset=noisy_site``).

``python -m benchmarks.quality_weighting [--seeds 3] [--noisy synthetic_noisy] [key=value ...]``

Per seed, the preset's methods on the same sites: FedAvg by examples (``federated``), updates
weighted by the sites' annotation-quality scores (``federated_quality``) and the federation
without the noisy site (``federated_without_<noisy>``). Reported per method: soft Dice and Dice
vs truth, in points, on the clean sites' test sets (their mean) and on the noisy site's, as mean
and standard deviation over the seeds, plus the differences to FedAvg; and the quality scores
and weight shares the server used. Extra ``key=value`` arguments are simulation overrides (e.g.
``federation.quality_weight=quality``). Results: ``benchmarks/results/quality_weighting.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from mrprism_core.cli_types import positive_int

from .common import RESULTS_DIR, simulation_config, spread, write_json

METRICS = ("soft_dice", "dice_vs_truth")


def _points(value: float | None) -> float | None:
    return None if value is None else 100.0 * float(value)


def one_seed(seed: int, noisy: str, overrides: list[str], work: Path) -> dict[str, Any]:
    from simulation.run import run_experiment

    cfg = simulation_config(
        ["preset=noisy_site", "progress=false", f"seed={seed}", f"out_dir={work}", *overrides]
    )
    if noisy not in cfg["partition"]["sources"]:
        raise SystemExit(f"--noisy {noisy} is not one of {cfg['partition']['sources']}")
    results = run_experiment(cfg)["methods"]
    row: dict[str, Any] = {}
    for method, result in results.items():
        sites = result["sites"]
        clean = [name for name in sites if name != noisy]
        row[method] = {
            **{
                f"clean_{m}": _points(sum(sites[s][m] for s in clean) / len(clean)) for m in METRICS
            },
            **{f"noisy_{m}": _points(sites[noisy][m]) for m in METRICS},
            "aggregation_weights": result.get("aggregation_weights", {}),
        }
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_weighting",
        description="FedAvg by examples vs annotation-quality-aware weighting vs leaving the "
        "noisy site out, on the noisy_site preset.",
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds (0, 1, ...)")
    parser.add_argument("--noisy", default="synthetic_noisy", help="the site with poor raters")
    parser.add_argument(
        "--out", default=str(RESULTS_DIR / "quality_weighting.json"), help="JSON path"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="simulation overrides")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            runs.append(one_seed(seed, args.noisy, args.overrides, Path(tmp) / str(seed)))
    summary: dict[str, Any] = {}
    baseline = "federated"
    for method in runs[0]:
        keys = [k for k in runs[0][method] if k != "aggregation_weights"]
        summary[method] = {k: spread([r[method][k] for r in runs], 2) for k in keys}
        if method != baseline and baseline in runs[0]:
            for k in keys:
                gaps = [
                    None
                    if r[method][k] is None or r[baseline][k] is None
                    else r[method][k] - r[baseline][k]
                    for r in runs
                ]
                summary[method][f"{k}_minus_fedavg"] = spread(gaps, 2)
    for method, row in summary.items():
        parts = [f"{method:36s}"]
        for k in (
            "clean_dice_vs_truth",
            "clean_soft_dice",
            "noisy_dice_vs_truth",
            "noisy_soft_dice",
        ):
            value = row.get(k)
            parts.append(f"{k} {'n/a' if value is None else format(value['mean'], '5.1f')}")
            gap = row.get(f"{k}_minus_fedavg")
            if gap is not None:
                parts.append(f"({gap['mean']:+.1f})")
        print("  ".join(parts))
    write_json(
        args.out,
        {"seeds": args.seeds, "noisy": args.noisy, "overrides": args.overrides,
         "summary": summary, "runs": runs},
    )  # fmt: skip


if __name__ == "__main__":
    from simulation.run import ends_on_error

    with ends_on_error():  # Ctrl-C or a crashed simulation runtime: no hang on Flower's thread
        main()
