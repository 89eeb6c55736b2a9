"""Record-level differential privacy at a site: DP-SGD with Opacus and an honest budget.

Each round a site wraps its model, optimizer and loader with Opacus (per-sample gradients,
clipping to ``max_grad_norm``, Gaussian noise, Poisson sampling of batches). Opacus' RDP
accountant keeps the history of every noisy step the site ever took; the history is site-local
state, saved atomically after each round, so the reported epsilon covers all rounds, not just
the last one. When a target epsilon is configured the noise is calibrated once for the planned
number of epochs, and a site whose budget is spent refuses to train instead of overspending.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mrprism_core.config_schema import above, at_least, check_bounds

if TYPE_CHECKING:  # torch only for the types: site configs are checked without it
    from torch import nn
    from torch.optim import Optimizer
    from torch.utils.data import DataLoader

__all__ = ["PrivacyBudgetSpent", "PrivacyConfig", "PrivacyLedger", "PrivateRound"]


class PrivacyBudgetSpent(ValueError):
    """The site already spent its configured epsilon; training more would exceed it."""


@dataclass(frozen=True)
class PrivacyConfig:
    """The ``privacy`` block of a site config (every field has a default: DP off)."""

    enabled: bool = False  # DP-SGD on this site's training
    target_epsilon: float | None = above(None, 0)  # total budget over the planned rounds
    noise_multiplier: float | None = at_least(None, 0)  # or fix the noise (epsilon then grows)
    delta: float = above(1e-5, 0)  # the delta every reported epsilon is stated with
    max_grad_norm: float = above(1.0, 0)  # per-sample gradient clipping bound

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> PrivacyConfig:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown privacy option(s) {unknown}; valid: {sorted(known)}")
        cfg = cls(**values)
        check_bounds(cls, asdict(cfg), "privacy.")
        if cfg.enabled and (cfg.target_epsilon is None) == (cfg.noise_multiplier is None):
            raise ValueError("privacy: set exactly one of target_epsilon and noise_multiplier")
        if not 0 < cfg.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {cfg.delta}")
        return cfg


class PrivacyLedger:
    """The accountant's history of noisy steps, kept in the site's state directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def history(self) -> list[tuple[float, float, int]]:
        if not self.path.exists():
            return []
        raw = json.loads(self.path.read_text())
        return [(float(n), float(q), int(s)) for n, q, s in raw["history"]]

    def save(self, history: list[tuple[float, float, int]], epsilon: float, delta: float) -> None:
        # imported here: the checkpoint module needs torch, checking a site config does not
        from mrprism_core.checkpoint import atomic_write_json

        atomic_write_json(self.path, {"history": history, "epsilon": epsilon, "delta": delta})


class PrivateRound:
    """One round of DP-SGD: ``wrap`` the training objects, train, then ``finish``.

    Args:
        cfg: the site's privacy settings.
        ledger: where the site's accountant history lives.
        planned_epochs: epochs over the whole federation (rounds x local epochs), used to
            calibrate the noise for ``target_epsilon``.
    """

    def __init__(self, cfg: PrivacyConfig, ledger: PrivacyLedger, planned_epochs: int) -> None:
        from opacus.accountants import RDPAccountant

        self.cfg = cfg
        self.ledger = ledger
        self.planned_epochs = max(1, planned_epochs)
        self.accountant = RDPAccountant()
        self.accountant.history = ledger.history()
        self.noise_multiplier: float | None = None
        self._module: nn.Module | None = None

    def spent(self) -> float:
        """Epsilon spent so far (at ``cfg.delta``); 0 before the first noisy step."""
        return self._epsilon(self.accountant.history)

    def _epsilon(self, history: list[tuple[float, float, int]]) -> float:
        from opacus.accountants import RDPAccountant

        if not history:
            return 0.0
        accountant = RDPAccountant()
        accountant.history = list(history)
        return float(accountant.get_epsilon(self.cfg.delta))

    def wrap(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader, epochs: int = 1
    ) -> tuple[Optimizer, DataLoader]:
        """Opacus' DP optimizer and Poisson-sampling loader for ``model`` (hooks attached),
        for ``epochs`` passes this round. Raises :class:`PrivacyBudgetSpent` rather than let
        the round take the site's epsilon over its target."""
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.validators import ModuleValidator

        problems = ModuleValidator.validate(model, strict=False)
        if problems:
            raise ValueError(f"model not supported by DP-SGD: {problems}")
        sample_rate = 1.0 / len(loader)
        if self.cfg.target_epsilon is not None:
            self.noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=self.cfg.target_epsilon,
                    target_delta=self.cfg.delta,
                    sample_rate=sample_rate,
                    epochs=self.planned_epochs,
                    accountant="rdp",
                )
            )
            this_round = (self.noise_multiplier, sample_rate, epochs * len(loader))
            after = self._epsilon([*self.accountant.history, this_round])
            if after > self.cfg.target_epsilon * (1 + 1e-6):
                raise PrivacyBudgetSpent(
                    f"privacy budget spent: epsilon is {self.spent():.3f} and this round would "
                    f"take it to {after:.3f}, over the target {self.cfg.target_epsilon} (delta "
                    f"{self.cfg.delta}); this site stops training"
                )
        else:
            self.noise_multiplier = float(self.cfg.noise_multiplier)  # type: ignore[arg-type]
        # Opacus' hooks make torch warn on every backward whose input needs no gradient (the
        # image): expected, and printed once per step otherwise
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        with warnings.catch_warnings():
            # torch's PRNG draws the noise (Opacus' secure_mode needs torchcsprng); README says so
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant="rdp")
            engine.accountant = self.accountant
            module, dp_optimizer, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.cfg.max_grad_norm,
                poisson_sampling=True,
            )
        self._module = module
        return dp_optimizer, dp_loader

    def finish(self) -> dict[str, float]:
        """Detach Opacus from the model, save the history, return what the site reports."""
        if self._module is not None:
            self._module._close()  # removes the hooks; the wrapped model is ready to save
            self._module = None
        epsilon = self.spent()
        self.ledger.save(list(self.accountant.history), epsilon, self.cfg.delta)
        return {
            "dp-epsilon": epsilon,
            "dp-delta": self.cfg.delta,
            "dp-noise-multiplier": float(self.noise_multiplier or 0.0),
            "dp-max-grad-norm": self.cfg.max_grad_norm,
        }
