"""How the default experiment's federated settings were chosen: a sweep of rounds x local
epochs, learning rate and server optimizer at a fixed number of passes over the data, each
federated run set against centralized training with the same passes, learning rate and
batch size.

``python -m benchmarks.defaults [--seeds 1] [--first-seed 0] [--candidates NAME ...] [--out PATH]``

A candidate is a named list of ``python -m simulation.run`` overrides (``CANDIDATES``). Every
candidate runs the embedded default (``preset=default``) with those overrides; centralized
training runs once per distinct (passes, learning rate, batch size, seed) and is shared by
the candidates that match it. Reported per candidate: federated and centralized soft Dice
(site mean), their difference in points, and seconds, as mean and standard deviation over the
seeds. Results:
``benchmarks/results/defaults.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from mrprism_core.cli_types import positive_int

from .common import RESULTS_DIR, simulation_config, spread, write_json


def _candidate(rounds: int, epochs: int, lr: float, *extra: str) -> list[str]:
    return [
        f"federation.rounds={rounds}",
        f"federation.local_epochs={epochs}",
        f"federation.lr={lr}",
        *extra,
    ]


FEDAVGM = "federation.strategy=fedavgm"
#: name -> simulation overrides; all make 20 passes over each site's data except
#: ``old_default`` (the previous default: 15 rounds x 2 epochs at lr 1e-3)
CANDIDATES: dict[str, list[str]] = {
    "old_default": _candidate(15, 2, 1e-3),
    "fedavg_10x2_lr5e-3": _candidate(10, 2, 5e-3),
    "fedavg_5x4_lr5e-3": _candidate(5, 4, 5e-3),
    "fedavg_20x1_lr5e-3": _candidate(20, 1, 5e-3),
    "fedavgm0.5_10x2_lr5e-3": _candidate(10, 2, 5e-3, FEDAVGM, "federation.server_momentum=0.5"),
    "fedavgm0.9_10x2_lr5e-3": _candidate(10, 2, 5e-3, FEDAVGM, "federation.server_momentum=0.9"),
    "fedadam_10x2_lr5e-3": _candidate(10, 2, 5e-3, "federation.strategy=fedadam"),
    "fedavg_10x2_lr5e-3_batch4": _candidate(10, 2, 5e-3, "federation.batch_size=4"),
    "fedavg_10x2_lr1e-2": _candidate(10, 2, 1e-2),
    "fedavg_20x1_lr1e-2": _candidate(20, 1, 1e-2),
    "fedavgm0.9_10x2_lr1e-2": _candidate(10, 2, 1e-2, FEDAVGM, "federation.server_momentum=0.9"),
}


def _run(overrides: list[str], work: Path, method: str, seed: int) -> dict[str, Any]:
    from simulation.run import run_experiment

    cfg = simulation_config(
        [*overrides, f"out_dir={work}", "progress=false", f"methods=[{method}]", f"seed={seed}"]
    )
    outcome = run_experiment(cfg)["methods"][method]
    fed = cfg["federation"]
    return {
        "soft_dice": 100 * outcome["mean"]["soft_dice"],
        "seconds": outcome["seconds"],
        "passes": int(fed["rounds"]) * int(fed["local_epochs"]),
        "lr": fed["lr"],
    }


def _centralized_overrides(overrides: list[str]) -> list[str]:
    """Centralized training with the candidate's passes, learning rate and batch size (what
    it depends on; the strategy does not matter to it), one epoch per evaluation."""
    fed = simulation_config(overrides)["federation"]
    passes = int(fed["rounds"]) * int(fed["local_epochs"])
    kept = [o for o in overrides if o.split("=")[0] in ("federation.lr", "federation.batch_size")]
    return sorted([f"federation.rounds={passes}", "federation.local_epochs=1", *kept])


def sweep(names: list[str], seeds: list[int], work: Path) -> dict[str, Any]:
    centralized: dict[tuple, dict[str, Any]] = {}
    rows: dict[str, Any] = {}
    for name in names:
        overrides = CANDIDATES[name]
        reference = _centralized_overrides(overrides)
        runs = []
        for seed in seeds:
            key = (*reference, seed)
            if key not in centralized:
                folder = work / f"centralized-{len(centralized)}"
                centralized[key] = _run(reference, folder, "centralized", seed)
            federated = _run(overrides, work / f"{name}-{seed}", "federated", seed)
            runs.append({"federated": federated, "centralized": centralized[key]})
        gaps = [r["federated"]["soft_dice"] - r["centralized"]["soft_dice"] for r in runs]
        rows[name] = {
            "overrides": overrides,
            "passes": runs[0]["federated"]["passes"],
            "federated_soft_dice": spread([r["federated"]["soft_dice"] for r in runs], 2),
            "centralized_soft_dice": spread([r["centralized"]["soft_dice"] for r in runs], 2),
            "federated_minus_centralized": spread(gaps, 2),
            "federated_seconds": spread([r["federated"]["seconds"] for r in runs], 2),
            "runs": runs,
        }
        row = rows[name]
        print(
            f"{name:18s} passes {row['passes']:3d}"
            f"  federated {row['federated_soft_dice']['mean']:5.1f}"
            f"  centralized {row['centralized_soft_dice']['mean']:5.1f}"
            f"  gap {row['federated_minus_centralized']['mean']:+5.1f}"
            f" (sd {row['federated_minus_centralized']['std']:.1f})"
            f"  {row['federated_seconds']['mean']:.0f} s",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.defaults",
        description="Sweep the default experiment's federated settings against centralized "
        "training at the same passes over the data.",
    )
    parser.add_argument("--seeds", type=positive_int, default=1, help="seeds per candidate")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed")
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=list(CANDIDATES),
        choices=list(CANDIDATES),
        metavar="NAME",
        help=f"which settings to run (default: all): {', '.join(CANDIDATES)}",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "defaults.json"), help="JSON path")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        rows = sweep(args.candidates, seeds, Path(tmp))
    write_json(args.out, {"seeds": seeds, "candidates": rows})


if __name__ == "__main__":
    from simulation.run import ends_on_error

    with ends_on_error():  # Ctrl-C or a crashed simulation runtime: no hang on Flower's thread
        main()
