"""Run tracking: per-round (or per-epoch) scalars to TensorBoard, when asked.

``tracking=tensorboard`` writes event files under ``<out_dir>/tensorboard/``, one run per
experiment or method, scalars named ``<group>/<metric>`` for aggregates and
``<group>/<metric>/<site>`` per site (TensorBoard groups them by prefix), stepped by round or
epoch. ``tracking=none`` (the default) writes nothing. TensorBoard is an optional extra:
``pip install -e ".[tracking]"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TRACKERS", "Tracker", "check_tracking", "open_tracker", "round_scalars"]

TRACKERS = ("none", "tensorboard")


class Tracker:
    """Writes scalars; the ``none`` tracker drops them."""

    def __init__(self, writer: Any = None) -> None:
        self._writer = writer

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Log every finite number of ``values`` at ``step`` (others are skipped)."""
        if self._writer is None:
            return
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(float(value)):
                self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def check_tracking(kind: str) -> None:
    """Raise ``ValueError`` for an unknown kind, or TensorBoard asked for but not installed."""
    if kind not in TRACKERS:
        raise ValueError(f"unknown tracking {kind!r}; choose one of {list(TRACKERS)}")
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError as err:
            raise ValueError(
                'tracking=tensorboard needs TensorBoard: pip install -e ".[tracking]"'
            ) from err


def open_tracker(kind: str, out_dir: str | Path, run: str = "") -> Tracker:
    """A tracker of ``kind`` (:data:`TRACKERS`) writing under ``<out_dir>/tensorboard/<run>``.

    Raises:
        ValueError: see :func:`check_tracking`.
    """
    check_tracking(kind)
    if kind == "none":
        return Tracker()
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(out_dir) / "tensorboard" / run if run else Path(out_dir) / "tensorboard"
    return Tracker(SummaryWriter(log_dir=str(log_dir)))


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one federated round record (``server/federation.py``): aggregated
    train/evaluate metrics, each site's, its DP epsilon, dropped sites and the round's time."""
    values: dict[str, float] = {"round/seconds": record.get("seconds", math.nan)}
    values["round/dropped_sites"] = len(record.get("dropped", []))
    values["round/aggregated"] = float(bool(record.get("aggregated", False)))
    for phase in ("train", "evaluate"):
        for metric, value in (record.get(phase) or {}).items():
            values[f"{phase}/{metric}"] = value
        for site, row in (record.get(f"{phase}_sites") or {}).items():
            for metric, value in row.items():
                values[f"{phase}/{metric}/{site}"] = value
    epsilon = (record.get("user_level_dp") or {}).get("epsilon")
    if epsilon is not None:
        values["privacy/user_level_epsilon"] = epsilon
    return values
