"""Client-drift correction with control variates (SCAFFOLD, Karimireddy et al., ICML 2020).

Sites whose data differ pull the shared weights apart within a round; averaging then loses part
of every site's progress. SCAFFOLD keeps, per site, a control variate ``c_i`` (here: the mean
gradient of the shared weights over the site's last round) and, at the server, their mean
``c``; each local step then uses ``g + c - c_i``, the site's gradient corrected towards the
federation's mean direction. The correction is added to the raw gradient, before Adam.

What travels: the server sends ``c`` with the shared weights; each site sends the change of its
``c_i`` with its update, averaged like the weights, and the server folds that mean change into
``c`` (:func:`updated_server_control`), so that ``c`` stays the weighted mean of every site's
latest ``c_i`` when only some sites train in a round (sampling, dropouts), as in SCAFFOLD's
server step. ``c_i`` is kept at the site (its state directory), as its Adam moments are, with
the ledger it was counted in: a ``c_i`` from another run's ledger counts as none. Rater heads
are never corrected (they are not averaged).

This module is Flower-free; ``client/rounds.py`` and ``client/site.py`` use it, and the server
checks the run config with :func:`check_drift_correction`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from types import TracebackType

import torch

__all__ = [
    "DRIFT_CORRECTIONS",
    "SCAFFOLD_STRATEGIES",
    "GradientCorrection",
    "check_drift_correction",
    "control_change",
    "local_correction",
    "updated_server_control",
]

#: ``drift-correction`` values: none (plain local steps) or scaffold (control variates)
DRIFT_CORRECTIONS = ("none", "scaffold")
#: strategies whose aggregate is a weighted mean, so that averaging the sites' ``c_i`` with the
#: weights gives SCAFFOLD's server control variate (a server optimizer would step it too)
SCAFFOLD_STRATEGIES = ("fedavg", "fedprox")


def check_drift_correction(
    name: str, key: str, *, strategy: str = "fedavg", dp_mode: str = "none"
) -> str:
    """``name`` if it is a known drift correction the run can use; else a ``ValueError`` that
    names ``key`` and the reason."""
    if name not in DRIFT_CORRECTIONS:
        raise ValueError(
            f"{key}={name}: unknown drift correction; choose from {', '.join(DRIFT_CORRECTIONS)}"
        )
    if name == "none":
        return name
    if strategy.lower() not in SCAFFOLD_STRATEGIES:
        raise ValueError(
            f"{key}={name} needs a strategy whose aggregate is a weighted mean "
            f"({', '.join(SCAFFOLD_STRATEGIES)}); {strategy} would also step the control variates"
        )
    if dp_mode.lower() != "none":
        raise ValueError(
            f"{key}={name} sends each site's mean gradient, which user-level DP "
            f"(dp-mode={dp_mode}) would neither clip nor noise as it does the update; "
            "choose one of the two"
        )
    return name


def _fits(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> bool:
    """Every tensor of ``tensors`` has a counterpart of its shape in ``reference``."""
    return all(k in reference and reference[k].shape == v.shape for k, v in tensors.items())


def local_correction(
    server_control: Mapping[str, torch.Tensor] | None,
    site_control: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor] | None:
    """``c - c_i`` for each tensor of the site's ``c_i`` (the shared parameters; the server's
    ``c`` also holds zeros for the shared buffers), or None when there is nothing to correct
    with yet: the site has no ``c_i`` that fits ``c`` (its first round, or a model that
    changed), or the server's ``c`` is all zeros (round 1). A site without its own ``c_i`` takes
    plain steps: adding ``c`` alone would count the federation's mean gradient twice."""
    if server_control is None or not site_control:
        return None
    if not _fits(site_control, server_control):
        return None
    if not any(bool(server_control[k].any()) for k in site_control):
        return None
    return {k: server_control[k] - v.to(server_control[k]) for k, v in site_control.items()}


def control_change(
    new: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """What a site sends: its new ``c_i`` minus the one the server's ``c`` holds for it
    (``previous``; None, or one of another model, counts as zeros: the site's first round in
    this ledger)."""
    if previous is None or not _fits(new, previous):
        return {k: v.clone() for k, v in new.items()}
    return {k: v - previous[k].to(v) for k, v in new.items()}  # type: ignore[index]


def updated_server_control(
    control: torch.Tensor,
    site_weights: Mapping[str, float],
    replied: Mapping[str, float],
    mean_change: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SCAFFOLD's server step with weights: ``c`` is ``sum_i w_i c_i / sum_i w_i`` over every
    site that ever sent a ``c_i``, each with its latest one; ``site_weights`` holds those sites'
    weights before this round, ``replied`` the weights of the sites that trained now and
    ``mean_change`` the ``replied``-weighted mean of their :func:`control_change` (what a
    weighted-mean strategy makes of them). Returns the new ``c`` and the weights after the round.

    A site that did not train keeps its last ``c_i`` in ``c``, as it keeps it for its own
    correction; averaging the repliers' ``c_i`` alone would leave the corrections of the
    federation no longer summing to zero. If a site's weight changes, the part of ``c`` that
    came from its earlier ``c_i`` keeps the old weight (the server never holds ``c_i`` itself,
    only the sum); its change from then on counts at the new one."""
    before = sum(site_weights.values())
    weights = {**site_weights, **replied}
    total = sum(weights.values())
    if total <= 0:
        return control, weights
    sent = sum(replied.values())
    return (before * control + sent * mean_change.to(control)) / total, weights


class GradientCorrection:
    """While entered: before each step of ``optimizer``, the gradients of the named parameters
    are recorded (for the new ``c_i``) and, with ``correction``, have it added. A step hook,
    not a tensor hook: MrPrism back-propagates each recurrence on its own, so a parameter's
    gradient is complete only when the step is taken; a skipped step (non-finite loss) is not
    counted.

    >>> with GradientCorrection(model, optimizer, shared_names, correction) as drift:
    ...     run_epochs(model, optimizer, ...)
    >>> new_site_control = drift.mean_gradients()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        names: Collection[str],
        correction: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self._params = {n: p for n, p in model.named_parameters() if n in names}
        self._optimizer = optimizer
        self._shifts = {
            name: correction[name].to(device=param.device, dtype=param.dtype)
            for name, param in self._params.items()
            if correction is not None and name in correction
        }
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> GradientCorrection:
        self._sums = {n: torch.zeros_like(p) for n, p in self._params.items()}
        self._steps = 0
        self._hook = self._optimizer.register_step_pre_hook(self._before_step)
        return self

    def _before_step(self, *_: object) -> None:
        self._steps += 1
        for name, param in self._params.items():
            if param.grad is None:  # frozen in this phase (FedRep's head phase)
                continue
            self._sums[name] += param.grad
            shift = self._shifts.get(name)
            if shift is not None:
                param.grad += shift

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def mean_gradients(self) -> dict[str, torch.Tensor]:
        """Each parameter's mean uncorrected gradient over the steps taken (zeros when none
        were), on the CPU: the site's new control variate."""
        return {name: (total / max(self._steps, 1)).cpu() for name, total in self._sums.items()}
