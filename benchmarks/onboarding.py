"""Onboarding a site that joins late: how close its rater heads, trained on a few cases with
the federation's shared weights frozen (``python -m client --site X --adapt --cases N``), come
to the same site's heads when it took part from round 1.

``python -m benchmarks.onboarding [--site synthetic_hard] [--cases 8] [--seeds 1]``

Per seed, on the default experiment (``python -m simulation.run``'s sources and settings):

1. ``present``: the federation with every source; the site's per-rater Dice after the last
   round (its heads were trained in every round);
2. ``newcomer``: the federation without the site; then the site adapts its heads on its first
   ``--cases`` training cases from that federation's ``global_model.pt`` (``SiteRuntime.adapt``,
   the code behind ``--adapt``) and is scored on the same test split.

Reported: per-rater Dice and soft Dice of both, and the newcomer's shortfall, as mean and
standard deviation over the seeds. Results: ``benchmarks/results/onboarding.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from mrprism_core.cli_types import positive_int

from .common import RESULTS_DIR, simulation_config, spread, write_json


def _per_rater(row: dict[str, Any]) -> float:
    values = row.get("per_rater_dice") or row.get("per-rater-dice-list") or []
    return 100 * sum(values) / len(values)


def one_seed(site: str, cases: list[int], epochs: int, seed: int, work: Path) -> dict[str, Any]:
    from client.site import SiteRuntime
    from simulation.methods import Experiment, evaluate_at_sites, write_site_dirs
    from simulation.run import resolve_sites, run_experiment

    base = ["progress=false", f"seed={seed}", "methods=[federated]"]
    present_cfg = simulation_config([*base, f"out_dir={work / 'present'}"])
    if site not in present_cfg["partition"]["sources"]:
        raise SystemExit(f"--site {site} is not one of {present_cfg['partition']['sources']}")
    present = run_experiment(present_cfg)["methods"]["federated"]["sites"][site]

    without_cfg = simulation_config([*base, f"out_dir={work / 'without'}"])
    without_cfg["partition"]["sources"].remove(site)
    run_experiment(without_cfg)
    global_model = work / "without" / "work" / "federated" / "server" / "global_model.pt"

    fed = without_cfg["federation"]
    newcomer_cfg = {**without_cfg, "partition": {**without_cfg["partition"], "sources": [site]}}
    exp = Experiment(
        sites=resolve_sites(newcomer_cfg),
        work_dir=work / "newcomer",
        preset=str(fed["preset"]),
        batch_size=int(fed["batch_size"]),
        device=str(fed["device"]),
        eval_split=str(fed["eval_split"]),
        seed=seed,
    )
    row: dict[str, Any] = {
        "present": {"per_rater_dice": _per_rater(present), "soft_dice": 100 * present["soft_dice"]}
    }
    for count in cases:
        dirs = write_site_dirs(replace(exp, work_dir=work / f"newcomer-{count}"), "newcomer")
        SiteRuntime.from_state_dir(dirs[0]).adapt(
            cases=count, epochs=epochs, lr=None, source=str(global_model)
        )
        scored = evaluate_at_sites(exp, dirs, global_model.parent)[site]
        row[f"newcomer_{count}"] = {
            "per_rater_dice": _per_rater(scored),
            "soft_dice": 100 * scored["soft-dice"],
        }
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.onboarding",
        description="A late site's rater heads trained on a few cases (--adapt) against the "
        "same site's heads when it took part from round 1.",
    )
    parser.add_argument("--site", default="synthetic_hard", help="the site that joins late")
    parser.add_argument(
        "--cases",
        type=positive_int,
        nargs="+",
        default=[8],
        help="training cases the newcomer adapts on",
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=20, help="--adapt's passes over them"
    )
    parser.add_argument("--seeds", type=positive_int, default=1, help="seeds (0, 1, ...)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "onboarding.json"), help="JSON path")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            runs.append(one_seed(args.site, args.cases, args.epochs, seed, Path(tmp) / str(seed)))
    summary: dict[str, Any] = {}
    for key in runs[0]:
        summary[key] = {m: spread([r[key][m] for r in runs], 2) for m in runs[0][key]}
        if key != "present":
            gaps = [r[key]["per_rater_dice"] - r["present"]["per_rater_dice"] for r in runs]
            summary[key]["per_rater_minus_present"] = spread(gaps, 2)
    for key, row in summary.items():
        line = f"{key:14s} per-rater Dice {row['per_rater_dice']['mean']:5.1f}"
        line += f"  soft Dice {row['soft_dice']['mean']:5.1f}"
        if "per_rater_minus_present" in row:
            line += f"  vs present {row['per_rater_minus_present']['mean']:+5.1f}"
        print(line)
    write_json(
        args.out,
        {"site": args.site, "epochs": args.epochs, "seeds": args.seeds, "summary": summary,
         "runs": runs},
    )  # fmt: skip


if __name__ == "__main__":
    from simulation.run import ends_on_error

    with ends_on_error():  # Ctrl-C or a crashed simulation runtime: no hang on Flower's thread
        main()
