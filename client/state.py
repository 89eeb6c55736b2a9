"""A site's own files: its resolved config and its model snapshot (rater heads + the shared
weights they were trained with). Written atomically, checksummed, never sent anywhere."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
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
CONTROL_FILE = "control_variate.pt"  # SCAFFOLD: the site's mean gradient of its last round
PERSONAL_FILE = "personal_model.pt"  # Ditto: the site's own complete model


class SiteStore:
    """Files under one site's state directory.

    ``write_behind`` is the site worker's mode, for the paper preset's ~350 MB of snapshot and
    Adam moments that took 1.6 s to write and 1.0 s to read back each training message:

    - the snapshot, the optimizer state and Ditto's personal model are written by a
      background thread, so a reply does not wait for the disk; the caller's tensors are
      copied first, every read waits for the writes under way, and :meth:`flush` waits for
      them and raises a failed one. Each write is still atomic: a worker killed before one
      finished leaves the previous round's file, as if it had been killed during that round;
    - what was written is also kept in memory and read from there (a copy) while the file is
      still the one written (same inode, size and modification time); a file replaced by
      another process (``--adapt``, a restore) is read from disk.

    The DP privacy ledger is never written behind (``client/privacy.py``).
    """

    def __init__(self, state_dir: str | Path, *, write_behind: bool = False) -> None:
        self.root = Path(state_dir)
        self._writer = ThreadPoolExecutor(1, "site-state-writer") if write_behind else None
        self._pending: list[Future[None]] = []
        self._written: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}

    def _save(self, path: Path, payload: dict[str, Any]) -> Path:
        if self._writer is None:
            return save_checkpoint(path, payload)
        # a copy: the caller's tensors (a model, an optimizer) may change once it returns
        frozen = _copy_tensors(payload)
        self._written.pop(path, None)
        self._pending.append(self._writer.submit(self._write_and_keep, path, frozen))
        return path

    def _write_and_keep(self, path: Path, payload: dict[str, Any]) -> None:
        save_checkpoint(path, payload)
        self._written[path] = (_stamp(path), payload)

    def flush(self) -> None:
        """Wait until every write handed to the background thread is on disk; a write that
        failed raises here (its OSError names the file)."""
        pending, self._pending = self._pending, []
        for write in pending:
            write.result()

    def _load(self, path: Path) -> dict[str, Any] | None:
        """A checkpoint the site wrote, or None before it first did (a damaged one raises)."""
        self.flush()
        if not path.exists():
            return None
        kept = self._written.get(path)
        if kept is not None and kept[0] == _stamp(path):
            return _copy_tensors(kept[1])  # the caller may change what it gets (Adam does)
        return load_checkpoint(path)

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
        saved = self._load(self.optimizer_path)
        return None if saved is None else saved["optimizer_state"]

    def save_optimizer(self, state: dict[str, Any], *, server_round: int) -> Path:
        """Atomically replace the site's optimizer state (it never leaves the site)."""
        return self._save(self.optimizer_path, {"optimizer_state": state, "round": server_round})

    @property
    def control_path(self) -> Path:
        return self.root / CONTROL_FILE

    def load_control(self, ledger: str) -> dict[str, torch.Tensor] | None:
        """The site's SCAFFOLD control variate from its last round in the server's ``ledger``
        (the run, resumes included), or None: another run's is not in this server's mean."""
        saved = self._load(self.control_path)
        if saved is None or saved.get("ledger") != ledger:
            return None
        return saved["control"]

    def save_control(
        self, control: dict[str, torch.Tensor], *, server_round: int, ledger: str
    ) -> Path:
        """Atomically replace the site's control variate (its change goes to the server)."""
        return self._save(
            self.control_path, {"control": control, "round": server_round, "ledger": ledger}
        )

    @property
    def personal_path(self) -> Path:
        return self.root / PERSONAL_FILE

    def load_personal(self) -> dict[str, Any] | None:
        """Ditto's personal model (``build_args``, ``model_state``), or None."""
        return self._load(self.personal_path)

    def save_personal(
        self, build_args: dict[str, Any], state: dict[str, Tensor], *, server_round: int
    ) -> Path:
        """Atomically replace Ditto's personal model (it never leaves the site)."""
        return self._save(
            self.personal_path,
            {"build_args": build_args, "model_state": state, "round": server_round},
        )

    def write_config(self, yaml_text: str) -> Path:
        return atomic_write_bytes(self.config_path, yaml_text.encode())

    def load_snapshot(self) -> dict[str, Any] | None:
        """The last snapshot, or None before the first round. A damaged file raises
        :class:`~mrprism_core.checkpoint.CorruptCheckpointError` naming it."""
        return self._load(self.snapshot_path)

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
        return self._save(
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


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced (an atomic write renames a new inode over it)."""
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns


def _copy_tensors(value: Any) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples copied to the CPU (where a
    checkpoint read from disk lands too; a GPU site keeps no second copy on its GPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _copy_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_tensors(v) for v in value)
    return value
