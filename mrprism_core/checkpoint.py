"""Crash-safe files: atomic writes (temp file + fsync + rename) and checksummed checkpoints.

A process killed while writing leaves the previous file intact; a damaged file is reported
with its path, never silently replaced by fresh weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CorruptCheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "save_checkpoint",
    "load_checkpoint",
    "shared_weights_from_checkpoint",
]

_MAGIC = b"MRPRISM-CKPT-1\n"
# a temp file this old was left by a writer that was killed (no write takes this long)
STALE_TEMP_SECONDS = 600.0


class CorruptCheckpointError(RuntimeError):
    """A checkpoint or state file exists but cannot be trusted (truncated, edited, not ours)."""


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes | memoryview, *more: bytes | memoryview
) -> Path:
    """Write ``data`` (and ``more``, appended) to ``path`` atomically: readers see the old file
    or the new one, never a partial one. The temp file lives in the same directory so the
    rename is atomic. Parts are written one after the other, so a large body needs no copy
    to put a header before it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in (data, *more):
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # the rename itself survives a power cut
    _remove_stale_temps(path)
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of ``path`` left behind by writers that were killed mid-write."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for temp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if temp.stat().st_mtime < cutoff:
                temp.unlink()
        except FileNotFoundError:
            pass


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Atomically save a ``torch.save``-able dict with a SHA-256 checksum header."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()  # a view: a model's or optimizer's state is copied no more
    digest = hashlib.sha256(body).hexdigest().encode()
    return atomic_write_bytes(path, _MAGIC + digest + b"\n", body)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, verifying its checksum.

    Raises:
        FileNotFoundError: no file at ``path``.
        CorruptCheckpointError: the file is truncated, altered or not a MrPrism checkpoint.
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.startswith(_MAGIC):
        raise CorruptCheckpointError(f"{path}: not a MrPrism-FL checkpoint (bad header)")
    header_end = len(_MAGIC) + 64
    digest = raw[len(_MAGIC) : header_end]
    if hashlib.sha256(memoryview(raw)[header_end + 1 :]).hexdigest().encode() != digest:
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch (truncated or modified); restore it from a backup or "
            "delete it to start this state afresh"
        )
    body = io.BytesIO(raw)  # shares raw's bytes; torch reads the archive from this position on
    body.seek(header_end + 1)
    # weights_only: a checkpoint holds tensors and plain containers, never code to run.
    return torch.load(body, map_location=map_location, weights_only=True)


def shared_weights_from_checkpoint(
    path: str | os.PathLike, expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The shared weights of ``expected``'s layout taken from a checkpoint: a centralized
    ``last.pt``/``best.pt`` (``model_state``; its site-local tensors are ignored) or a federated
    ``global_model.pt`` (``shared_state``).

    Raises:
        FileNotFoundError / CorruptCheckpointError: as :func:`load_checkpoint`.
        ValueError: the checkpoint holds no weights, lacks a tensor, or a tensor's shape
            differs; the message names the tensor, both shapes and both architectures.
    """
    payload = load_checkpoint(path)
    state = payload.get("shared_state") or payload.get("model_state")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds no model weights (no model_state or shared_state)")
    written_for = payload.get("model_spec") or payload.get("build_args") or "unknown"
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"{path} does not fit this run's model: {len(missing)} shared tensor(s) missing, "
            f"e.g. {missing[:3]}; the checkpoint was written for {written_for}"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{path} does not fit this run's model: {key} has shape "
                f"{tuple(state[key].shape)} in the checkpoint, the run's model needs "
                f"{tuple(tensor.shape)}; the checkpoint was written for {written_for}"
            )
    return {key: state[key].to(tensor.dtype) for key, tensor in expected.items()}
