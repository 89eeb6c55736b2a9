"""A site's own files: its resolved config and its model snapshot (rater heads + the shared
weights they were trained with). Written atomically, checksummed, never sent anywhere."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import Tensor

from mrprism_core.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint

__all__ = [
    "OPTIMIZER_FILE",
    "PERSONAL_FILE",
    "PRIVACY_LEDGER",
    "SITE_CONFIG_FILE",
    "SNAPSHOT_FILE",
    "SiteStore",
]

SITE_CONFIG_FILE = "site_config.yaml"
SNAPSHOT_FILE = "site_model.pt"
PRIVACY_LEDGER = "privacy_ledger.json"  # the DP accountant's history of noisy steps
OPTIMIZER_FILE = "optimizer.pt"  # the site's Adam moments, carried from round to round
PERSONAL_FILE = "personal_model.pt"  # Ditto: the site's own complete model


class SiteStore:
    """Files under one site's state directory."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)

    @property
    def config_path(self) -> Path:
        return self.root / SITE_CONFIG_FILE

    @property
    def snapshot_path(self) -> Path:
        return self.root / SNAPSHOT_FILE

    @property
    def optimizer_path(self) -> Path:
        return self.root / OPTIMIZER_FILE

    def load_optimizer(self) -> dict[str, Any] | None:
        """The optimizer state the site saved after its last round, or None."""
        saved = _load_if_present(self.optimizer_path)
        return None if saved is None else saved["optimizer_state"]

    def save_optimizer(self, state: dict[str, Any], *, server_round: int) -> Path:
        """Atomically replace the site's optimizer state (it never leaves the site)."""
        return save_checkpoint(
            self.optimizer_path, {"optimizer_state": state, "round": server_round}
        )

    @property
    def personal_path(self) -> Path:
        return self.root / PERSONAL_FILE

    def load_personal(self) -> dict[str, Any] | None:
        """Ditto's personal model (``build_args``, ``model_state``), or None."""
        return _load_if_present(self.personal_path)

    def save_personal(
        self, build_args: dict[str, Any], state: dict[str, Tensor], *, server_round: int
    ) -> Path:
        """Atomically replace Ditto's personal model (it never leaves the site)."""
        return save_checkpoint(
            self.personal_path,
            {"build_args": build_args, "model_state": state, "round": server_round},
        )

    def write_config(self, yaml_text: str) -> Path:
        return atomic_write_bytes(self.config_path, yaml_text.encode())

    def load_snapshot(self) -> dict[str, Any] | None:
        """The last snapshot, or None before the first round. A damaged file raises
        :class:`~mrprism_core.checkpoint.CorruptCheckpointError` naming it."""
        return _load_if_present(self.snapshot_path)

    def save_snapshot(
        self,
        *,
        site: str,
        build_args: dict[str, Any],
        local_state: dict[str, Tensor],
        shared_state: dict[str, Tensor],
        server_round: int,
        run_id: int,
    ) -> Path:
        """Atomically replace the snapshot: the site's complete personalised model."""
        return save_checkpoint(
            self.snapshot_path,
            {
                "site": site,
                "build_args": build_args,
                "local_state": local_state,
                "shared_state": shared_state,
                "round": server_round,
                "run_id": run_id,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )


def _load_if_present(path: Path) -> dict[str, Any] | None:
    """A checkpoint the site wrote, or None before it first did (a damaged one raises)."""
    return load_checkpoint(path) if path.exists() else None
