"""Flower ServerApp: read the run config, pick Flower's strategy, run the rounds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mrprism_core.tracking import open_tracker, round_scalars

from .config import RunConfig
from .federation import run_federation
from .secure_aggregation import run_secure_federation
from .strategies import build_strategy

__all__ = ["app", "create_server_app", "run_rounds"]


def create_server_app(
    run_config: Mapping[str, Any] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """The ServerApp. ``run_config`` overrides the context's run config (the simulation uses
    it: Flower's simulation API passes an empty one); ``on_round`` sees every round's record."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(run_config or {})})
        run_rounds(grid, context, cfg, on_round)

    return app


def run_rounds(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict:
    """The run's rounds: under SecAgg+ when configured, else the plain round loop; each
    round's record also goes to the run's tracker (``tracking``)."""
    tracker = open_tracker(cfg.tracking, cfg.out_dir)

    def record_round(record: dict[str, Any]) -> None:
        tracker.scalars(int(record["round"]), round_scalars(record))
        if on_round is not None:
            on_round(record)

    try:
        if cfg.secure_aggregation:
            return run_secure_federation(grid, context, cfg, on_round=record_round)
        strategy = build_strategy(cfg)
        return run_federation(grid, strategy, cfg, run_id=context.run_id, on_round=record_round)
    finally:
        tracker.close()


app = create_server_app()
