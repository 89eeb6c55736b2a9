"""Framework-free pieces of federated training: how shared weights travel (one packed vector),
what a site reports, and the checks an update must pass before it is aggregated.

``client`` and ``server`` wrap these in Flower messages; nothing here imports Flower.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .metrics import RECURRENCE_METRICS, recurrence_table
from .protocol import PACKED_KEY
from .rater_quality import bounded_quality

__all__ = [
    "AGGREGATION_WEIGHTS",
    "PACKED_KEY",
    "QUALITY_KEY",
    "SELECT_KEY",
    "WEIGHT_KEY",
    "aggregation_weights",
    "StateLayout",
    "split_evaluation",
    "recurrences_from_details",
    "update_problem",
]


#: Metric in which a site that opted in (``share_quality``) sends its annotation-quality score.
QUALITY_KEY = "annotation-quality"
#: Metric of an evaluation reply holding the soft Dice on the split rounds are chosen by
#: (``RoundInstructions.select_split``).
SELECT_KEY = "select-soft-dice"

#: Metric the server writes into each usable update for a quality-aware aggregation; Flower's
#: strategies weight by it (``weighted_by_key``).
WEIGHT_KEY = "aggregation-weight"

#: What a site's update is weighted by: its training cases, its annotation-quality score, or both.
AGGREGATION_WEIGHTS = ("examples", "quality", "examples*quality")


def aggregation_weights(
    examples: list[int], scores: list[float | None], mode: str
) -> tuple[list[float], list[float]]:
    """Each site's aggregation weight under ``mode`` (:data:`AGGREGATION_WEIGHTS`), and the
    quality scores used.

    Scores are clipped to ``[QUALITY_FLOOR, 1]`` here, on the server, whatever a site claims.
    A site that did not share a score (or sent a non-finite one) gets the median of the
    others' this round: neither rewarded nor punished for keeping it. With no score at all,
    every site counts as 1 (``quality`` is then a plain mean, ``examples*quality`` FedAvg).
    """
    if mode not in AGGREGATION_WEIGHTS:
        raise ValueError(
            f"unknown aggregation-weight {mode!r}; choose one of {list(AGGREGATION_WEIGHTS)}"
        )
    if len(examples) != len(scores):
        raise ValueError(f"{len(examples)} example counts for {len(scores)} quality scores")
    shared = [bounded_quality(s) for s in scores if s is not None and math.isfinite(s)]
    fallback = float(np.median(shared)) if shared else 1.0
    used = [bounded_quality(s) if s is not None and math.isfinite(s) else fallback for s in scores]
    if mode == "examples":
        return [float(n) for n in examples], used
    if mode == "quality":
        return used, used
    return [float(n) * q for n, q in zip(examples, used)], used


@dataclass(frozen=True)
class StateLayout:
    """Names and shapes of the shared tensors, in state-dict order.

    The shared weights travel as one flat float32 vector: Flower moves every array of a
    message as a separate object, and ~260 small tensors cost seconds per message where one
    vector costs one transfer. Every strategy we use (weighted mean, median, trimmed mean,
    Krum, FedAdam/FedYogi, clipping) is element-wise or works on the whole update's norm, so
    packing changes no aggregate. Both sides derive the layout from the same model spec; the
    fingerprint catches a mismatch.
    """

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> StateLayout:
        for key, value in state.items():
            if not value.is_floating_point():
                raise TypeError(f"cannot pack non-float tensor {key} ({value.dtype})")
        return cls(tuple((k, tuple(v.shape)) for k, v in state.items()))

    @property
    def size(self) -> int:
        return int(sum(math.prod(shape) for _, shape in self.entries))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(repr(self.entries).encode()).hexdigest()[:16]

    def pack(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``state`` (exactly this layout's keys and shapes) into one vector."""
        if StateLayout.of(state) != self:
            raise ValueError("state does not match the layout (keys, order or shapes differ)")
        return torch.cat([state[k].detach().reshape(-1).float().cpu() for k, _ in self.entries])

    def pack_padded(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`pack` with zeros for the entries ``state`` lacks (a control variate, a mean
        gradient, has none for the buffers); those it has must be this layout's."""
        shapes = dict(self.entries)
        if any(k not in shapes or tuple(v.shape) != shapes[k] for k, v in state.items()):
            raise ValueError("state does not fit the layout (a key it lacks, or another shape)")
        return torch.cat(
            [
                state[k].detach().reshape(-1).float().cpu()
                if k in state
                else torch.zeros(math.prod(shape))
                for k, shape in self.entries
            ]
        )

    def unpack(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a packed vector back into named tensors."""
        if vector.dim() != 1 or vector.numel() != self.size:
            raise ValueError(
                f"packed weights have shape {tuple(vector.shape)}, expected ({self.size},)"
            )
        out, offset = {}, 0
        for key, shape in self.entries:
            count = math.prod(shape)
            out[key] = vector[offset : offset + count].reshape(shape).clone()
            offset += count
        return out


def split_evaluation(result: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Split :func:`~mrprism_core.train.evaluate` output into aggregatable scalars (same keys
    at every site, NaN-free) and per-site details.

    Returns:
        ``(scalars, details)``; scalars (soft-dice, per-rater-dice, ged, ece) are what Flower
        aggregates weighted by ``num-examples``, the same keys at every site, with
        ``per-rater-dice`` the mean over this site's raters (or the calibrated soft Dice when
        the model has no rater outputs) and ``ged`` 0 when undefined.
    """
    # slots without an annotation at this site (pooled layouts) report None: left out
    per_rater = [x for x in result.get("per_rater_dice") or [] if x is not None]
    scalars = {
        "soft-dice": float(result["soft_dice"]),
        "per-rater-dice": float(np.mean(per_rater)) if per_rater else float(result["soft_dice"]),
        "ged": float(result["ged"]) if result.get("ged") is not None else 0.0,
        "ece": float(result["ece"]) if result.get("ece") is not None else 0.0,
    }
    details: dict[str, Any] = {"per-rater-dice-list": [float(x) for x in per_rater]}
    if result.get("dice_vs_truth") is not None:
        details["dice-vs-truth"] = float(result["dice_vs_truth"])
    # rec0 ... rec_tau, one list per metric (Flower metric values are numbers or lists)
    rows = recurrence_table(result)
    for name in RECURRENCE_METRICS:
        column = [row[name] for row in rows]
        if column and all(value is not None for value in column):
            details[_recurrence_key(name)] = column
    return scalars, details


def _recurrence_key(metric: str) -> str:
    return metric.replace("_", "-") + "-rec"


def recurrences_from_details(details: Mapping[str, Any]) -> list[dict[str, float | None]]:
    """The per-recurrence rows of :func:`split_evaluation`'s details (the inverse of its lists):
    one dict per recurrence with every :data:`RECURRENCE_METRICS` entry (None if not sent)."""
    columns = {name: list(details.get(_recurrence_key(name)) or []) for name in RECURRENCE_METRICS}
    count = len(columns["soft_dice"])
    return [
        {
            name: float(values[i]) if len(values) == count else None
            for name, values in columns.items()
        }
        for i in range(count)
    ]


def update_problem(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> str | None:
    """Why ``update`` must not be aggregated against the global ``reference``, or None.

    Checks the key set, every shape and that every value is finite.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"keys differ from the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    for key, value in update.items():
        if tuple(value.shape) != tuple(reference[key].shape):
            return f"{key} has shape {tuple(value.shape)}, expected {tuple(reference[key].shape)}"
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"{key} contains NaN or Inf"
    return None
