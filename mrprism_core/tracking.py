"""Run tracking: per-round (or per-epoch) scalars to TensorBoard or MLflow, when asked.

``tracking=tensorboard`` writes event files under ``<out_dir>/tensorboard/``, one run per
experiment or method, scalars named ``<group>/<metric>`` for aggregates and
``<group>/<metric>/<site>`` per site (TensorBoard groups them by prefix), stepped by round or
epoch. ``tracking=mlflow`` logs the same metrics, one MLflow run per experiment or method,
to the tracking server named by ``MLFLOW_TRACKING_URI`` (MLflow's own convention), or without
one to a local store ``<out_dir>/mlruns``; the MLflow experiment is ``MLFLOW_EXPERIMENT_NAME``
or ``mrprism-fl``. ``tracking=none`` (the default) writes nothing. Both are optional extras:
``pip install -e ".[tracking]"``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TRACKERS", "Tracker", "check_tracking", "open_tracker", "round_scalars"]

TRACKERS = ("none", "tensorboard", "mlflow")
#: Python module each tracker needs, and the extra that installs it.
_NEEDS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


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
    if kind in _NEEDS:
        try:
            __import__(_NEEDS[kind])
        except ImportError as err:
            raise ValueError(
                f'tracking={kind} needs {_NEEDS[kind]}: pip install -e ".[tracking]"'
            ) from err


class MlflowWriter:
    """The two calls :class:`Tracker` makes of a SummaryWriter, as one MLflow run."""

    def __init__(self, out_dir: str | Path, run: str) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # no server configured: MLflow's file store beside the run's other outputs (in
            # maintenance mode in MLflow 3, which refuses it unless allowed explicitly)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(out_dir).resolve() / "mlruns").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mrprism-fl")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        tags = {"out_dir": str(Path(out_dir).resolve())}
        self.run_id = self.client.create_run(
            experiment, run_name=run or Path(out_dir).name, tags=tags
        ).info.run_id

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, name, value, step=step)

    def flush(self) -> None:
        """MLflow writes each metric as it is logged."""

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_tracker(kind: str, out_dir: str | Path, run: str = "") -> Tracker:
    """A tracker of ``kind`` (:data:`TRACKERS`): TensorBoard under
    ``<out_dir>/tensorboard/<run>``, or the MLflow run ``<run>`` (see the module docstring).

    Raises:
        ValueError: see :func:`check_tracking`.
    """
    check_tracking(kind)
    if kind == "none":
        return Tracker()
    if kind == "mlflow":
        return Tracker(MlflowWriter(out_dir, run))
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(out_dir) / "tensorboard" / run if run else Path(out_dir) / "tensorboard"
    return Tracker(SummaryWriter(log_dir=str(log_dir)))


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one federated round record (``server/federation.py``): aggregated
    train/evaluate metrics, each site's, its DP epsilon, dropped sites, the round's time and the
    sites' learning rate."""
    values: dict[str, float] = {"round/seconds": record.get("seconds", math.nan)}
    values["round/dropped_sites"] = len(record.get("dropped", []))
    values["round/aggregated"] = float(bool(record.get("aggregated", False)))
    if "lr" in record:  # the sites' learning rate (lr_schedule)
        values["round/lr"] = float(record["lr"])
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
