"""The experiment report: results.json (the contract outside checks read), results.md (the
tables a person reads) and three plots."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mrprism_core.checkpoint import atomic_write_bytes, atomic_write_json
from mrprism_core.metrics import spread

__all__ = [
    "cases_source",
    "console_summary",
    "over_seeds",
    "targets",
    "write_report",
    "write_seed_report",
]


def cases_source(methods: Mapping[str, Any]) -> str | None:
    """The method whose final personalised models draw ``cases.png``: the federation, else
    local-only training (None: neither ran, no picture)."""
    return next((m for m in ("federated", "local") if m in methods), None)


FEDERATED_VS_CENTRAL_POINTS = 1.0
FEDERATED_VS_LOCAL_POINTS = 3.0


def _points(value: float) -> float:
    return round(100 * value, 2)


def targets(methods: Mapping[str, Any], train_cases: Mapping[str, int]) -> list[dict[str, Any]]:
    """The three questions of the default experiment, answered from the results."""
    out = []
    fed = methods.get("federated")
    if fed and "centralized" in methods:
        gap = fed["mean"]["soft_dice"] - methods["centralized"]["mean"]["soft_dice"]
        out.append(
            {
                "target": "federated within 1.0 soft-Dice point of centralized (site mean)",
                "measured_points": _points(gap),
                "met": 100 * gap >= -FEDERATED_VS_CENTRAL_POINTS,
            }
        )
    if fed and "local" in methods:
        smallest = min(train_cases, key=lambda s: train_cases[s])
        gap = fed["sites"][smallest]["soft_dice"] - methods["local"]["sites"][smallest]["soft_dice"]
        out.append(
            {
                "target": "federated >= 3 points above local-only on the smallest site "
                f"({smallest})",
                "measured_points": _points(gap),
                "met": 100 * gap >= FEDERATED_VS_LOCAL_POINTS,
            }
        )
    if fed and "federated_shared" in methods:
        gap = fed["mean"].get("per_rater_dice", 0.0) - methods["federated_shared"]["mean"].get(
            "per_rater_dice", 0.0
        )
        out.append(
            {
                "target": "personalised rater heads beat shared-everything on per-rater Dice",
                "measured_points": _points(gap),
                "met": gap > 0,
            }
        )
    return out


def _scalar(value: Any) -> float | None:
    """A row's metric as one number: per-rater Dice (a list, one per rater) by its mean."""
    if isinstance(value, list):
        return float(np.mean(value)) if value else None
    return None if value is None else float(value)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}"


def _setup(results: Mapping[str, Any]) -> str:
    """The experiment in one sentence, for the reports' heads."""
    federation = results["config"]["federation"]
    chosen = (
        "the round with the best validation soft Dice (local: each site its own; "
        "`selected` in results.json)"
        if federation.get("select", "last") == "best_val"
        else "the last round"
    )
    return (
        f"{len(results['sites'])} sites; {federation['rounds']} rounds x "
        f"{federation['local_epochs']} local epoch(s); strategy {federation['strategy']}; "
        f"model preset {federation['preset']}. Scores in points (x100) on each site's test "
        f"split, of {chosen}."
    )


def _score_tables(
    methods: Mapping[str, Any], sites: Sequence[str], show: Callable[[Any], str]
) -> list[str]:
    """Soft Dice, per-rater Dice and Dice vs truth: method x site, and the site mean; ``show``
    writes one cell from what the results hold there."""
    lines = []
    for metric, title in (
        ("soft_dice", "Soft Dice (paper 000, Table 1)"),
        (
            "per_rater_dice",
            "Per-rater Dice of the personalised heads (mean over the site's raters)",
        ),
        ("dice_vs_truth", "Dice against the true mask (synthetic data)"),
    ):
        lines += ["", f"## {title}", "", "| method | " + " | ".join(sites) + " | mean |"]
        lines.append("|---" * (len(sites) + 2) + "|")
        for name, method in methods.items():
            cells = [show(method["sites"][site].get(metric)) for site in sites]
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {show(method['mean'].get(metric))} |"
            )
    return lines


def _markdown(results: Mapping[str, Any]) -> str:
    methods = results["methods"]
    sites = [s["name"] for s in results["sites"]]
    lines = [
        "# Simulation results",
        "",
        f"Seed {results['config']['seed']}; {_setup(results)}",
        "",
        "| site | raters | train cases |",
        "|---|---|---|",
    ]
    for site in results["sites"]:
        lines.append(f"| {site['name']} | {site['num_raters']} | {site['cases'].get('train', 0)} |")
    lines += _score_tables(methods, sites, lambda value: _fmt(_scalar(value)))
    lines += ["", "## Targets", "", "| target | measured (points) | met |", "|---|---|---|"]
    for target in results["targets"]:
        lines.append(
            f"| {target['target']} | {target['measured_points']:+.2f} | "
            f"{'yes' if target['met'] else '**no**'} |"
        )
    lines += _selected_table(methods, sites)
    private = {name: m["privacy"] for name, m in methods.items() if m.get("privacy")}
    if private:
        lines += [
            "",
            "## Privacy spent (DP-SGD at the sites, Opacus RDP accountant)",
            "",
            "Record-level epsilon each site reported after its last round; the budget was "
            "calibrated for all planned rounds.",
            "",
            "| method | " + " | ".join(sites) + " | delta |",
            "|---" * (len(sites) + 2) + "|",
        ]
        for name, spent in private.items():
            cells = [f"{spent[s]['epsilon']:.2f}" if s in spent else "-" for s in sites]
            delta = next(iter(spent.values()))["delta"] if spent else "-"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {delta} |")
    weighted = {
        n: m["aggregation_weights"] for n, m in methods.items() if m.get("aggregation_weights")
    }
    if weighted:
        lines += [
            "",
            "## Annotation-quality weighting (last round)",
            "",
            "Each site's annotation-quality score as the server used it, and its share of the "
            "aggregation weight (share by examples alone in brackets).",
            "",
            "| method | " + " | ".join(sites) + " |",
            "|---" * (len(sites) + 1) + "|",
        ]
        cases = {site["name"]: site["cases"].get("train", 0) for site in results["sites"]}
        total = sum(cases.values()) or 1
        for name, rows in weighted.items():
            cells = [
                f"{rows[s]['quality']:.3f}: {100 * rows[s]['weight-share']:.0f} % "
                f"({100 * cases[s] / total:.0f} %)"
                if s in rows
                else "-"
                for s in sites
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "federated_secagg" in methods:
        lines += [
            "",
            "`federated_secagg` ran every round under SecAgg+ (the server saw only the sum of "
            "the updates) and was scored once, after the last round.",
        ]

    means = {name: _recurrence_means(method, sites) for name, method in methods.items()}
    lines += _recurrence_table(means, _metric_cell)
    lines += _model_table(methods, sites)
    lines += ["", "## Time", "", "| method | seconds |", "|---|---|"]
    for name, method in methods.items():
        lines.append(f"| {name} | {method['seconds']:.0f} |")
    lines += ["", "Plots: `rounds.png` (soft Dice per round per site), `methods.png` (each site)."]
    drawn = cases_source(methods)
    if drawn is not None:
        lines += [
            "`cases.png`: one test case per site (image, raters, calibrated and personalised",
            f"masks) through `{drawn}`'s final models, whichever round the tables report.",
        ]
    lines.append("")
    return "\n".join(lines)


def _selected_table(methods: Mapping[str, Any], sites: Sequence[str]) -> list[str]:
    """Which round each method's scores come from, when rounds were chosen on validation
    (over seeds: each seed's round, ``17 / 20 / 18``)."""
    chosen = {
        name: method["selected"]
        for name, method in methods.items()
        if any(row["by"] != "last round" for row in method.get("selected", {}).values())
    }
    if not chosen:
        return []

    def rounds(row: Mapping[str, Any]) -> str:
        return " / ".join(map(str, row["rounds"])) if "rounds" in row else str(row["round"])

    lines = ["", "## Round reported (best validation soft Dice)", ""]
    lines += ["| method | " + " | ".join(sites) + " |", "|---" * (len(sites) + 1) + "|"]
    for name, selected in chosen.items():
        lines.append(f"| {name} | " + " | ".join(rounds(selected[s]) for s in sites) + " |")
    return lines


_MODEL_METRICS = ("soft_dice", "per_rater_dice", "dice_vs_truth", "ged")


def _metric_cell(metric: str, value: float | None) -> str:
    """One run's cell: a score in points, GED (a distance, not a score) as is."""
    if metric == "ged":
        return "-" if value is None else f"{value:.3f}"
    return _fmt(value)


def _recurrence_table(
    rows_by_method: Mapping[str, Sequence[Mapping[str, Any]]], show: Callable[[str, Any], str]
) -> list[str]:
    """rec0 ... rec_tau (site means) of every method whose model recurs (paper 000, Table 1
    style); ``rows_by_method`` holds each method's rows, ``show(metric, value)`` writes a cell."""
    recurring = {name: rows for name, rows in rows_by_method.items() if len(rows) > 1}
    if not recurring:
        return []
    lines = [
        "",
        "## Per recurrence (paper 000, Table 1 style)",
        "",
        "rec0 starts from equal confidences; each later recurrence feeds ConP the raters' "
        "reliabilities DivP estimated in the one before. Site means in points; GED as is.",
        "",
        "| method | recurrence | soft Dice | per-rater Dice | Dice vs truth | GED |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in recurring.items():
        for index, row in enumerate(rows):
            cells = [show(metric, row[metric]) for metric in _MODEL_METRICS]
            lines.append(f"| {name} | rec{index} | " + " | ".join(cells) + " |")
    return lines


def _recurrence_means(
    method: Mapping[str, Any], sites: Sequence[str]
) -> list[dict[str, float | None]]:
    """rec0 ... rec_tau of one method, each metric the mean over the sites (None when a site
    has no value); empty when its model does not recur."""
    tables = [method["sites"][site].get("recurrences") or [] for site in sites]
    rows = []
    for index in range(min(len(table) for table in tables)):
        row = {}
        for metric in _MODEL_METRICS:
            values = [table[index].get(metric) for table in tables]
            row[metric] = None if None in values else float(np.mean(values))
        rows.append(row)
    return rows


def _model_table(methods: Mapping[str, Any], sites: Sequence[str]) -> list[str]:
    """Every model x setting x site (when the grid has more than one model), and where MrPrism
    is beaten."""
    models = {m.get("model", "mrprism") for m in methods.values()}
    if len(models) < 2:
        return []
    lines = [
        "",
        "## Models compared (MrPrism and the baselines, same sites, same training loop)",
        "",
        "Scores in points; GED (generalised energy distance between the personalised outputs "
        "and the raters' masks, 0 to 2) as is, lower is better; models without per-rater "
        "outputs have none.",
        "",
        "| model | setting | site | soft Dice | per-rater Dice | Dice vs truth | GED |",
        "|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, method in methods.items():
        model = method.get("model", "mrprism")
        setting = name.rpartition(":")[2]
        rows[(model, setting)] = method["mean"]
        for site in [*sites, "mean"]:
            row = method["mean"] if site == "mean" else method["sites"][site]
            cells = [_metric_cell(metric, _scalar(row.get(metric))) for metric in _MODEL_METRICS]
            label = f"**{site}**" if site == "mean" else site
            lines.append(f"| {model} | {setting} | {label} | " + " | ".join(cells) + " |")
    beaten = []
    for (model, setting), mean in sorted(rows.items()):
        ours = rows.get(("mrprism", setting))
        if model == "mrprism" or ours is None:
            continue
        for metric, label, sign in (
            ("soft_dice", "soft Dice", 1),
            ("per_rater_dice", "per-rater Dice", 1),
            ("dice_vs_truth", "Dice vs truth", 1),
            ("ged", "GED (lower)", -1),
        ):
            theirs, mine = mean.get(metric), ours.get(metric)
            if theirs is not None and mine is not None and sign * (theirs - mine) > 0:
                shown = (
                    (f"{theirs:.3f}", f"{mine:.3f}")
                    if metric == "ged"
                    else (_fmt(theirs), _fmt(mine))
                )
                beaten.append(
                    f"{model} beats MrPrism on {label} ({setting}, site mean: "
                    f"{shown[0]} vs {shown[1]})"
                )
    lines += ["", "Where MrPrism does not win:"]
    lines += [f"- {line}" for line in beaten] or ["- nowhere in this grid"]
    return lines


def _plot_rounds(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.2), squeeze=False)
    for axis, (name, method) in zip(axes[0], methods.items()):
        for site, values in method["history"].items():
            axis.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=site)
        axis.set_title(name)
        axis.set_xlabel("round")
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("soft Dice (test)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_methods(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    sites = [s["name"] for s in results["sites"]]
    width = 0.8 / max(1, len(methods))
    fig, axis = plt.subplots(figsize=(1.8 + 1.6 * len(sites), 3.4))
    for index, (name, method) in enumerate(methods.items()):
        values = [method["sites"][s]["soft_dice"] for s in sites]
        axis.bar(np.arange(len(sites)) + index * width, values, width, label=name)
    axis.set_xticks(np.arange(len(sites)) + width * (len(methods) - 1) / 2, sites)
    axis.set_ylabel("soft Dice (test)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_map(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) nested masks -> one map with 0 background, 1 outer, 2 inner, ..."""
    return (masks > 0.5).sum(axis=0)


def _plot_cases(cases: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(2 + 2 * len(c["raters"]) for c in cases)
    fig, axes = plt.subplots(
        len(cases), width, figsize=(1.3 * width, 1.4 * len(cases)), squeeze=False
    )
    for row, case in zip(axes, cases):
        for axis in row:
            axis.axis("off")
        image = np.asarray(case["image"], dtype=float)
        image = image[:3].transpose(1, 2, 0) if image.shape[0] >= 3 else image[0]
        image = (image - image.min()) / max(1e-6, float(image.max() - image.min()))
        row[0].imshow(image, cmap="gray")
        row[0].set_title(case["site"], fontsize=7)
        raters = len(case["raters"])
        panels = [(f"rater {m + 1}", case["raters"][m]) for m in range(raters)]
        panels.append(("calibrated", case["calibrated"]))
        panels += [(f"head {m + 1}", case["heads"][m]) for m in range(raters)]
        for axis, (title, mask) in zip(row[1:], panels):
            axis.imshow(_label_map(np.asarray(mask)), vmin=0, vmax=2, cmap="viridis")
            axis.set_title(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: Path, results: dict[str, Any], cases: Sequence[Mapping[str, Any]] = ()
) -> None:
    """Write results.json, results.md and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_bytes(out_dir / "results.md", _markdown(results).encode())
    _plot_rounds(results, out_dir / "rounds.png")
    _plot_methods(results, out_dir / "methods.png")
    if cases:
        _plot_cases(cases, out_dir / "cases.png")


# ---- several seeds ----------------------------------------------------------------------


def over_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The runs of one experiment with different seeds (each :func:`run_experiment`'s results)
    summarised: every method x site x metric, the site means, each recurrence (site mean) and
    each target as mean and sample standard deviation over the seeds. A target is met when its
    mean over the seeds meets it; its value at every seed is kept beside."""
    first = runs[0]
    sites = [s["name"] for s in first["sites"]]
    methods: dict[str, Any] = {}
    for name in first["methods"]:
        per_seed = [run["methods"][name] for run in runs]
        recurrences = [_recurrence_means(method, sites) for method in per_seed]
        methods[name] = {
            "sites": {
                site: {
                    metric: spread([_scalar(m["sites"][site].get(metric)) for m in per_seed])
                    for metric in _MODEL_METRICS
                }
                for site in sites
            },
            "mean": {
                metric: spread([m["mean"].get(metric) for m in per_seed])
                for metric in _MODEL_METRICS
            },
            "recurrences": [
                {
                    metric: spread([rows[i][metric] for rows in recurrences])
                    for metric in _MODEL_METRICS
                }
                for i in range(min(len(rows) for rows in recurrences))
            ],
            "seconds": spread([m["seconds"] for m in per_seed]),
        }
        if all("selected" in m for m in per_seed):  # each seed's reported round, per site
            methods[name]["selected"] = {
                site: {
                    "by": per_seed[0]["selected"][site]["by"],
                    "rounds": [m["selected"][site]["round"] for m in per_seed],
                }
                for site in sites
            }
    # the targets' rules applied to the means over the seeds (each gap is linear in the scores,
    # so its value there is the mean of the per-seed gaps)
    means = {
        name: {
            "mean": {k: v["mean"] for k, v in method["mean"].items() if v is not None},
            "sites": {
                site: {k: v["mean"] for k, v in row.items() if v is not None}
                for site, row in method["sites"].items()
            },
        }
        for name, method in methods.items()
    }
    train_cases = {s["name"]: s["cases"].get("train", 0) for s in first["sites"]}
    verdicts = targets(means, train_cases)
    for index, verdict in enumerate(verdicts):
        at_seeds = [run["targets"][index]["measured_points"] for run in runs]
        verdict["measured_points"] = spread(at_seeds, 2)
        verdict["per_seed"] = at_seeds
    return {
        "seeds": [int(run["seed"]) for run in runs],
        "sites": first["sites"],
        "methods": methods,
        "targets": verdicts,
    }


def _cell(value: Mapping[str, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{scale * value['mean']:.{digits}f} ± {scale * value['std']:.{digits}f}"


def _seed_markdown(summary: Mapping[str, Any]) -> str:
    seeds = summary["seeds"]
    methods = summary["methods"]
    sites = [s["name"] for s in summary["sites"]]
    lines = [
        "# Simulation results over seeds",
        "",
        f"Seeds {', '.join(map(str, seeds))}: mean ± sample standard deviation over the "
        f"{len(seeds)} runs (each run's own report: `seed<N>/results.md`); {_setup(summary)}",
    ]
    lines += _score_tables(methods, sites, _cell)
    lines += [
        "",
        "## Targets (met when the mean over the seeds meets them)",
        "",
        "| target | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | met |",
        "|---" * (len(seeds) + 3) + "|",
    ]
    for target in summary["targets"]:
        measured = target["measured_points"]
        lines.append(
            f"| {target['target']} | "
            + " | ".join(f"{value:+.2f}" for value in target["per_seed"])
            + f" | {measured['mean']:+.2f} ± {measured['std']:.2f} | "
            + f"{'yes' if target['met'] else '**no**'} |"
        )
    lines += _selected_table(methods, sites)
    lines += _recurrence_table(
        {name: method["recurrences"] for name, method in methods.items()},
        lambda metric, value: _cell(value, 1.0, 3) if metric == "ged" else _cell(value),
    )
    lines += ["", "## Time per run", "", "| method | seconds |", "|---|---|"]
    for name, method in methods.items():
        lines.append(f"| {name} | {_cell(method['seconds'], 1.0, 0)} |")
    return "\n".join(lines) + "\n"


def write_seed_report(out_dir: Path, summary: dict[str, Any]) -> None:
    """Write the summary over seeds as ``results.json`` and ``results.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", summary)
    atomic_write_bytes(out_dir / "results.md", _seed_markdown(summary).encode())


def console_summary(results: Mapping[str, Any]) -> list[str]:
    """What ``python -m simulation.run`` prints at the end: each method's mean soft Dice and
    each target, for one run or over seeds."""
    lines = []
    over = "seeds" in results
    for name, method in results["methods"].items():
        score = method["mean"]["soft_dice"]
        if over:
            lines.append(
                f"{name:17} mean soft Dice {score['mean']:.4f} ± {score['std']:.4f} "
                f"over seeds {', '.join(map(str, results['seeds']))}"
            )
        else:
            lines.append(f"{name:17} mean soft Dice {score:.4f}")
    for target in results["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        measured = target["measured_points"]
        if over:
            shown = f"{measured['mean']:+.2f} ± {measured['std']:.2f} points on the mean"
        else:
            shown = f"{measured:+.2f} points"
        lines.append(f"{target['target']}: {shown} ({verdict})")
    return lines
