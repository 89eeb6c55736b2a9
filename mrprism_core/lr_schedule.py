"""The learning rate over a run: one rule for federated rounds, local-only rounds and
centralized epochs, so that the methods we compare take steps of the same sizes.

Adam at a constant rate keeps taking steps of about that rate to the end, so the final
weights of every site (and of the average) wander around the optimum instead of settling;
decaying the rate is how nnU-Net and most segmentation recipes end a run, and FedAvg's
convergence results assume it too. The step is a federated round (the sites read it from the
round instructions) or a centralized epoch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the ClientApp reads round rates through protocol.py and imports no torch
    import torch

__all__ = ["LR_SCHEDULES", "check_lr_schedule", "scheduled_lr", "set_lr"]

#: ``constant``: the base rate throughout; ``cosine``: half a cosine from the base rate at the
#: first step down towards 0 at the step after the last (the last step keeps a small rate).
LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(schedule: str, key: str = "lr_schedule") -> str:
    """``schedule`` when it is one of :data:`LR_SCHEDULES`, else a ValueError naming the
    config ``key``, the value and the choices."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"{key}={schedule}: unknown learning-rate schedule; choose from "
            + ", ".join(LR_SCHEDULES)
        )
    return schedule


def scheduled_lr(base_lr: float, step: int, total: int, schedule: str = "constant") -> float:
    """The learning rate of ``step`` (1-based: a round or an epoch) of ``total`` steps.

    A step past ``total`` (a run resumed with more rounds than it planned) keeps the last
    step's rate; a step before the first takes the first's.
    """
    check_lr_schedule(schedule)
    if schedule == "constant" or total <= 1:
        return float(base_lr)
    done = (min(max(step, 1), total) - 1) / total  # 0 at the first step, (T-1)/T at the last
    return float(base_lr) * 0.5 * (1.0 + math.cos(math.pi * done))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the rate ``lr`` (a round's or an epoch's,
    or this round's over a saved optimizer state that brought its own)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
