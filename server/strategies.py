"""Flower's own strategies, selected by name from the run config."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from mrprism_core.federated import AGGREGATION_WEIGHTS, WEIGHT_KEY

from .config import RunConfig

__all__ = [
    "DP_MODES",
    "STRATEGY_NAMES",
    "WEIGHTED_STRATEGIES",
    "check_aggregation_weight",
    "build_strategy",
    "restore_server_optimizer_state",
    "server_optimizer_state",
]

STRATEGY_NAMES = (
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
)
DP_MODES = ("none", "server-fixed", "client-fixed", "server-adaptive")
#: strategies whose aggregate of the weights is a weighted mean (the others take a median,
#: a trimmed mean or one chosen update, and would ignore a quality weighting)
WEIGHTED_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi")


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy named by ``cfg.strategy``, wrapped in Flower's user-level DP strategy
    named by ``cfg.dp_mode`` (clipping each site's update, Gaussian noise on the aggregate).

    Aggregation is weighted by ``num-examples`` (samples, never batches), or, with
    ``aggregation-weight`` quality or examples*quality, by the ``aggregation-weight`` metric
    the server writes into each update (:func:`server.federation.weigh_updates`).
    """
    check_aggregation_weight(cfg)
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


def check_aggregation_weight(cfg: RunConfig) -> None:
    """Refuse a quality weighting that the chosen strategy or SecAgg+ would not apply."""
    mode = cfg.aggregation_weight
    if mode not in AGGREGATION_WEIGHTS:
        raise ValueError(
            f"unknown aggregation-weight {mode!r}; choose one of {list(AGGREGATION_WEIGHTS)}"
        )
    if mode == "examples":
        return
    if cfg.strategy.lower() not in WEIGHTED_STRATEGIES:
        raise ValueError(
            f"aggregation-weight={mode} needs a strategy that takes a weighted mean "
            f"({', '.join(WEIGHTED_STRATEGIES)}); {cfg.strategy} ignores the weights"
        )
    if cfg.secure_aggregation:
        raise ValueError(
            f"aggregation-weight={mode} is not available under SecAgg+: the masked sum is "
            "weighted by example counts, which the sites apply before masking"
        )


def weight_key(cfg: RunConfig) -> str:
    """The reply metric the strategy weights each site's update by."""
    return "num-examples" if cfg.aggregation_weight == "examples" else WEIGHT_KEY


def _base_strategy(cfg: RunConfig) -> Strategy:
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_evaluate_nodes,
        "min_available_nodes": cfg.min_available_nodes,
        "weighted_by_key": weight_key(cfg),
    }
    name = cfg.strategy.lower()
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedavgm":  # server momentum on the averaged update (Hsu et al. 2019)
        return FedAvgM(**common, server_learning_rate=1.0, server_momentum=cfg.server_momentum)
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


#: attributes in which Flower's strategies keep their server-optimizer state: FedAvgM's
#: momentum, FedAdam/FedYogi's first and second moments
_SERVER_OPTIMIZER_STATE = ("momentum_vector", "m_t", "v_t")


def _inner(strategy: Strategy) -> Strategy:
    """The strategy a DP wrapper aggregates with (the wrapper itself keeps no moments)."""
    return getattr(strategy, "strategy", strategy)


def server_optimizer_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's server-optimizer state as tensors (for the run checkpoint); empty for
    strategies without one, or before their first aggregation."""
    inner = _inner(strategy)
    state: dict[str, Any] = {}
    for name in _SERVER_OPTIMIZER_STATE:
        value = getattr(inner, name, None)
        if isinstance(value, dict):
            state[name] = {k: torch.from_numpy(np.asarray(v)) for k, v in value.items()}
        elif isinstance(value, list):
            state[name] = [torch.from_numpy(np.asarray(v)) for v in value]
    return state


def restore_server_optimizer_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put :func:`server_optimizer_state`'s output back, so FedAvgM/FedAdam/FedYogi resume
    with their moments instead of restarting them."""
    inner = _inner(strategy)
    for name, value in state.items():
        if name not in _SERVER_OPTIMIZER_STATE or not hasattr(inner, name):
            continue
        if isinstance(value, dict):
            setattr(inner, name, {k: v.numpy() for k, v in value.items()})
        else:
            setattr(inner, name, [v.numpy() for v in value])
