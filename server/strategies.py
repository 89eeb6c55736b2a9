"""Flower's own strategies, selected by name from the run config."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from .config import RunConfig

__all__ = ["STRATEGY_NAMES", "build_strategy"]

STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy named by ``cfg.strategy``, sampling and weighting as configured.

    Aggregation is weighted by ``num-examples`` (samples, never batches).
    """
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_evaluate_nodes,
        "min_available_nodes": cfg.min_available_nodes,
    }
    name = cfg.strategy.lower()
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedyogi":
        return FedYogi(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=cfg.krum_malicious)
    raise ValueError(f"unknown strategy {cfg.strategy!r}; choose one of {list(STRATEGY_NAMES)}")
