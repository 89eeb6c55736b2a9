"""Local training: the one epoch driver every trainer runs, and the local-update strategies
it runs with, chosen by name.

``python -m mrprism_core.train``, a site's round (``client.site.SiteRuntime.train``: the
ClientApp and the simulation's ``local`` method), the simulation's ``centralized`` method and
``benchmarks/privacy.py`` all train through :func:`run_epochs`. What differs is the
:class:`LocalStrategy`:

* ``plain`` (:class:`LocalStrategy`): every parameter, every epoch;
* ``fedprox`` (:class:`FedProx`): plus the pull ``mu/2 ||w - w_received||^2`` toward the
  weights received this round (Li et al., 2020);
* :class:`Personalized` (``fedper``, ``fedrep``, ``fedbabu``, ``ditto``): the phases of
  :mod:`mrprism_core.personalization`, i.e. which parameters each epoch trains, around any
  other strategy;
* ``heads`` (:class:`HeadsOnly`): the site's own modules only (onboarding, FedBABU's end);
* :class:`DPSGD` wraps a strategy for Opacus' per-sample gradients (one backward pass per
  batch) and refuses what would bypass its clipping. The optimizer and loader wrapping and the
  accountant live at the site (``client/privacy.py``).

Nothing here knows about Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .models.base import SegmentationModel
from .personalization import check_personalization, phases, trainable
from .train import train_epoch

__all__ = [
    "LocalStrategy",
    "FedProx",
    "Personalized",
    "HeadsOnly",
    "DPSGD",
    "local_strategy",
    "run_epochs",
]


@dataclass(frozen=True)
class LocalStrategy:
    """Plain local training: every parameter, every epoch, the model's own loss."""

    name = "plain"

    def phases(self, epochs: int) -> list[tuple[str, int]]:
        """``(part, epochs)`` in order; part ``all``, ``heads`` or ``body``."""
        return [("all", epochs)]

    def epoch_options(self) -> dict[str, Any]:
        """Extra keyword arguments of :func:`~mrprism_core.train.train_epoch`."""
        return {}


@dataclass(frozen=True, eq=False)
class FedProx(LocalStrategy):
    """FedProx: every step also pulls the parameters named in ``reference`` toward it."""

    mu: float = 0.01
    reference: Mapping[str, Tensor] = field(default_factory=dict)
    name = "fedprox"

    def epoch_options(self) -> dict[str, Any]:
        return {"proximal_mu": self.mu, "proximal_reference": self.reference}


@dataclass(frozen=True)
class Personalized(LocalStrategy):
    """The phases of a personalization strategy around ``inner``'s epochs."""

    personalization: str = "fedper"
    inner: LocalStrategy = field(default_factory=LocalStrategy)

    def __post_init__(self) -> None:
        check_personalization(self.personalization)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.personalization

    def phases(self, epochs: int) -> list[tuple[str, int]]:
        return phases(self.personalization, epochs)

    def epoch_options(self) -> dict[str, Any]:
        return self.inner.epoch_options()


@dataclass(frozen=True)
class HeadsOnly(LocalStrategy):
    """Only the site's own modules (rater heads) train, the shared weights frozen: onboarding
    a new site or rater (``python -m client --adapt``), FedBABU's final fine-tuning."""

    name = "heads"

    def phases(self, epochs: int) -> list[tuple[str, int]]:
        return [("heads", epochs)]


@dataclass(frozen=True)
class DPSGD(LocalStrategy):
    """DP-SGD around ``inner``: one backward pass through the whole loss per batch (Opacus
    needs it for per-sample gradients). Refuses FedProx (its gradient would bypass the
    clipping) and personalization phases (the accountant counts whole-model rounds)."""

    inner: LocalStrategy = field(default_factory=LocalStrategy)
    name = "dp-sgd"

    def __post_init__(self) -> None:
        if isinstance(self.inner, FedProx) or (
            isinstance(self.inner, Personalized) and isinstance(self.inner.inner, FedProx)
        ):
            raise ValueError(
                "DP-SGD and FedProx's proximal term cannot be combined (the proximal gradient "
                "would bypass the clipping); use strategy=fedavg"
            )
        if self.inner.phases(1) != [("all", 1)]:
            raise ValueError(
                "DP-SGD is accounted for whole-model rounds; personalization="
                f"{self.inner.name} is not supported with it, use fedper"
            )

    def phases(self, epochs: int) -> list[tuple[str, int]]:
        return self.inner.phases(epochs)

    def epoch_options(self) -> dict[str, Any]:
        return {**self.inner.epoch_options(), "backward_once": True}


def local_strategy(
    personalization: str = "fedper",
    proximal_mu: float = 0.0,
    reference: Mapping[str, Tensor] | None = None,
    private: bool = False,
) -> LocalStrategy:
    """The strategy for a site's round: FedProx when ``proximal_mu`` > 0 (toward
    ``reference``), in the phases of ``personalization``, as DP-SGD when ``private``."""
    inner: LocalStrategy = LocalStrategy()
    if proximal_mu:
        inner = FedProx(mu=proximal_mu, reference=reference or {})
    strategy: LocalStrategy = Personalized(personalization, inner)
    return DPSGD(strategy) if private else strategy


def run_epochs(
    model: SegmentationModel,
    optimizer: torch.optim.Optimizer,
    loader_for_epoch: Callable[[int], Iterable[Mapping[str, Any]]],
    device: torch.device | str,
    epochs: int,
    strategy: LocalStrategy | None = None,
    *,
    first_epoch: int = 0,
    progress: bool = False,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, float]:
    """``epochs`` passes of :func:`~mrprism_core.train.train_epoch` in ``strategy``'s phases.

    Args:
        loader_for_epoch: the loader of each epoch, by its index counted from ``first_epoch``
            over all phases (so each epoch can shuffle with its own seed).
        on_epoch: called after every epoch with its index and ``train_epoch``'s result
            (validation, checkpoints, progress).

    Returns:
        ``loss`` (mean over the epochs), ``skipped_steps`` (summed) and ``epochs`` (run, over
        all phases).
    """
    strategy = strategy or LocalStrategy()
    plan = strategy.phases(epochs)
    total = sum(count for _, count in plan)
    totals = {"loss": 0.0, "skipped_steps": 0, "epochs": total}
    epoch = first_epoch
    options = strategy.epoch_options()
    for part, count in plan:
        with trainable(model, part):
            for _ in range(count):
                result = train_epoch(
                    model, loader_for_epoch(epoch), optimizer, device, progress=progress, **options
                )
                totals["loss"] += result["loss"] / total
                totals["skipped_steps"] += result["skipped_steps"]
                if on_epoch is not None:
                    on_epoch(epoch, result)
                epoch += 1
    return totals
