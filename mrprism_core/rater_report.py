"""Write a site's rater report: ``raters.json``, ``raters.md`` and PNG figures.

The report is for the site's clinical lead and stays at the site. Figures:
``disagreement.png`` (where each rater departs, as a mean map over cases),
``departures_rater<M>.png`` (the cases where rater M departs most: image, rater outline in
red, consensus in green) and ``difficulty.png`` (each rater's agreement per case against the
image's contrast at the structure and the model's uncertainty there).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, atomic_write_json
from .rater_quality import RaterAssessment, RaterRow

__all__ = ["write_rater_report", "rank_correlation"]


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D series (NaN pairs dropped; NaN if < 3 left)."""
    keep = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[keep].double(), y[keep].double()
    if x.numel() < 3:
        return float("nan")
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def _fmt(value: float, spec: str = ".3f") -> str:
    return "n/a" if value != value else format(value, spec)


def _rank_notes(rows: list[RaterRow]) -> list[str]:
    """Per class: which rater agrees least and which DivP finds least reliable."""
    notes = []
    for name in dict.fromkeys(r.class_name for r in rows):
        of_class = [r for r in rows if r.class_name == name]
        if len(of_class) < 2:
            continue
        low_agree = min(of_class, key=lambda r: r.agreement_dice)
        low_rel = min(of_class, key=lambda r: r.reliability)
        notes.append(
            f"- {name}: lowest agreement rater {low_agree.rater} "
            f"(Dice {low_agree.agreement_dice:.3f}); lowest reliability rater {low_rel.rater} "
            f"({low_rel.reliability:.3f})"
        )
    return notes


def _markdown(assessment: RaterAssessment, site: str, split: str) -> str:
    consensus = {
        "divp_fusion": "the raters' masks fused under DivP's per-rater reliabilities (Eq. 1)",
        "majority_vote": "the raters' majority vote (the model has no per-rater reliabilities)",
    }[assessment.consensus_kind]
    lines = [
        f"# Rater report: {site}",
        "",
        f"{assessment.num_cases} cases of the `{split}` split. Consensus: {consensus}, "
        "binarised at 0.5. This report stays at the site.",
        "",
        f"Annotation-quality score (mean agreement, bounded to [0.1, 1]): "
        f"**{assessment.quality:.3f}**",
        "",
        "| rater | class | agreement Dice | area bias % | area bias px | sensitivity | "
        "specificity | reliability | observed sens. | observed spec. | left empty |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in assessment.rows:
        lines.append(
            f"| {r.rater} | {r.class_name} | {_fmt(r.agreement_dice)} | "
            f"{_fmt(r.area_bias, '+.1f')} | {_fmt(r.area_bias_px, '+.1f')} | "
            f"{_fmt(r.sensitivity)} | {_fmt(r.specificity)} | {_fmt(r.reliability)} | "
            f"{_fmt(r.observed_sensitivity)} | {_fmt(r.observed_specificity)} | "
            f"{_fmt(100 * r.empty_rate, '.0f')} % |"
        )
    lines += [
        "",
        "Area bias > 0: the rater draws the structure larger than the consensus "
        "(over-segments); < 0: smaller. Sensitivity and specificity are DivP's estimates, "
        "averaged over the consensus' structure and over the background within 5 px of it "
        "(far background tells nothing: every rater leaves it empty). Reliability is their mean. "
        "They are the per-pixel weights DivP's fusion uses, not calibrated rates; the observed "
        "columns are the rater's own hit rates against the consensus in the same regions. "
        "'Left empty': share of the cases with the structure in the consensus where the rater "
        "drew nothing.",
        "",
        "## Who departs",
        *(_rank_notes(assessment.rows) or ["- one rater per class: nothing to rank"]),
        "",
        "## Does agreement depend on difficulty?",
        "Spearman correlation over cases of each rater's agreement with the image's contrast "
        "at the structure (> 0: agrees more on clear images) and with the model's uncertainty "
        "there (< 0: agrees less where the model is unsure).",
        "",
        "| rater | class | vs contrast | vs uncertainty |",
        "|---|---|---|---|",
    ]
    names = list(dict.fromkeys(r.class_name for r in assessment.rows))
    for r in assessment.rows:
        k = names.index(r.class_name)
        dice = assessment.case_dice[:, r.rater, k]
        lines.append(
            f"| {r.rater} | {r.class_name} | "
            f"{_fmt(rank_correlation(dice, assessment.case_contrast[:, k]), '+.2f')} | "
            f"{_fmt(rank_correlation(dice, assessment.case_uncertainty[:, k]), '+.2f')} |"
        )
    lines += [
        "",
        "## Figures",
        "- `disagreement.png`: mean |rater - consensus| per pixel, per rater and class.",
        "- `departures_rater<M>.png`: the cases where rater M departs most "
        "(red: the rater, green: the consensus).",
        "- `difficulty.png`: agreement per case against contrast and uncertainty.",
        "",
    ]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def _show_image(axis, image: torch.Tensor) -> None:
    array = image.float().numpy()
    if array.shape[0] == 3:
        axis.imshow(np.clip(array.transpose(1, 2, 0), 0, 1))
    else:
        axis.imshow(array[0], cmap="gray")
    axis.set_xticks([])
    axis.set_yticks([])


def _figures(assessment: RaterAssessment, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raters, classes = assessment.disagreement.shape[:2]
    names = list(dict.fromkeys(r.class_name for r in assessment.rows)) or [
        f"class {k}" for k in range(classes)
    ]
    written = []
    fig, axes = plt.subplots(classes, raters, figsize=(2.2 * raters, 2.2 * classes), squeeze=False)
    for m in range(raters):
        for k in range(classes):
            axis = axes[k][m]
            axis.imshow(assessment.disagreement[m, k].numpy(), cmap="magma", vmin=0, vmax=1)
            axis.set_title(f"rater {m} - {names[k]}", fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    fig.tight_layout()
    _save(fig, out / "disagreement.png")
    plt.close(fig)
    written.append(out / "disagreement.png")

    for m in range(raters):
        shown = [assessment.worst_cases.get((m, k), []) for k in range(classes)]
        columns = max((len(cases) for cases in shown), default=0)
        if columns == 0:
            continue
        fig, axes = plt.subplots(
            classes, columns, figsize=(2.2 * columns, 2.4 * classes), squeeze=False
        )
        for k, cases in enumerate(shown):
            for j in range(columns):
                axis = axes[k][j]
                if j >= len(cases):
                    axis.axis("off")
                    continue
                case = cases[j]
                _show_image(axis, case.image)
                for mask, colour in ((case.consensus, "lime"), (case.rater_mask, "red")):
                    if mask.max() > 0:
                        axis.contour(mask.numpy(), levels=[0.5], colors=colour, linewidths=1)
                axis.set_title(
                    f"{names[k]}: {case.case_id}\nDice {1 - case.departure:.2f}", fontsize=7
                )
        fig.tight_layout()
        path = out / f"departures_rater{m}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(classes, 2, figsize=(8, 3 * classes), squeeze=False)
    for k in range(classes):
        for column, (x, label) in enumerate(
            (
                (assessment.case_contrast[:, k], "contrast at the structure"),
                (assessment.case_uncertainty[:, k], "model uncertainty (bits)"),
            )
        ):
            axis = axes[k][column]
            for m in range(raters):
                dice = assessment.case_dice[:, m, k].numpy()
                axis.scatter(x.numpy(), dice, s=8, label=f"rater {m}")
            axis.set_xlabel(label)
            axis.set_ylabel(f"agreement Dice ({names[k]})")
            axis.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "difficulty.png")
    plt.close(fig)
    written.append(out / "difficulty.png")
    return written


def write_rater_report(
    assessment: RaterAssessment, out_dir: str | Path, site: str, split: str
) -> list[Path]:
    """Write ``raters.json``, ``raters.md`` and the figures into ``out_dir``; return them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"site": site, "split": split, **assessment.to_json()}
    json_path = atomic_write_json(out / "raters.json", _finite(summary))
    md_path = atomic_write_bytes(out / "raters.md", _markdown(assessment, site, split).encode())
    return [json_path, md_path, *_figures(assessment, out)]


def _finite(value):
    """JSON has no NaN: unknown numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
