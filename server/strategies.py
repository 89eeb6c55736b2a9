"""Flower's own strategies, selected by name from the run config."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
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

__all__ = ["DP_MODES", "STRATEGY_NAMES", "build_strategy"]

STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
DP_MODES = ("none", "server-fixed", "client-fixed", "server-adaptive")


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy named by ``cfg.strategy``, wrapped in Flower's user-level DP strategy
    named by ``cfg.dp_mode`` (clipping each site's update, Gaussian noise on the aggregate).

    Aggregation is weighted by ``num-examples`` (samples, never batches).
    """
    strategy = _base_strategy(cfg)
    mode = cfg.dp_mode.lower()
    noise, clip, sites = cfg.dp_noise_multiplier, cfg.dp_clipping_norm, cfg.dp_sampled_sites
    if mode == "none":
        return strategy
    if mode == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, noise, clip, sites)
    if mode == "client-fixed":  # the ClientApp clips with Flower's fixedclipping_mod
        return DifferentialPrivacyClientSideFixedClipping(strategy, noise, clip, sites)
    if mode == "server-adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, noise, sites, initial_clipping_norm=clip
        )
    raise ValueError(f"unknown dp-mode {cfg.dp_mode!r}; choose one of {list(DP_MODES)}")


def _base_strategy(cfg: RunConfig) -> Strategy:
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
