"""A site installs a run's app bundle once, not once per message.

Flower 1.41's ``flwr-clientapp`` calls ``install_from_fab`` for every message: it extracts the
whole bundle into a temporary folder and checks every file's hash, only to find that app already
installed and keep the installed copy (``validate_and_install`` returns early when the install
folder exists). For our bundle (120 files) that is 0.1 s per message on an idle core, more while
the site trains. :func:`install_once` wraps it: after Flower installed a bundle, a record named
by the bundle's full SHA-256 (under ``$FLWR_HOME/mrprism-installed-apps/``) holds the install
folder; the same bytes again go to that folder without being unpacked. Nothing is trusted that
Flower would not: the record is written only after Flower's own install of byte-identical bytes
succeeded, and Flower itself reuses an existing install folder without comparing its files.
A missing folder, or an unreadable record, installs as Flower does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["RECORD_DIR", "install_once", "use_for_clientapps"]

#: Folder under Flower's home (``FLWR_HOME``) with one record per installed bundle.
RECORD_DIR = "mrprism-installed-apps"

Install = Callable[..., Path]


def _flower_home() -> Path:
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home()


def _write_record(record: Path, installed: Path) -> None:
    """Atomically (a ClientApp beside this one reads all of it or none); not through
    :mod:`mrprism_core.checkpoint`, which imports torch, which a ClientApp never does."""
    record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=record.parent, prefix=".record-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(str(installed))
        os.replace(temporary, record)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def install_once(install: Install) -> Install:
    """``install`` (Flower's ``install_from_fab``), run once per bundle and Flower home."""

    @functools.wraps(install)
    def wrapper(
        fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False
    ) -> Path:
        if not isinstance(fab_file, bytes) or install_dir is not None or not skip_prompt:
            return install(fab_file, install_dir, skip_prompt)  # not a ClientApp's call
        record = _flower_home() / RECORD_DIR / hashlib.sha256(fab_file).hexdigest()
        with contextlib.suppress(OSError, ValueError):
            installed = Path(record.read_text(encoding="utf-8"))
            if installed.is_dir():
                return installed
        installed = install(fab_file, install_dir, skip_prompt)
        with contextlib.suppress(OSError):  # no record: the next message installs again
            _write_record(record, installed)
        return installed

    wrapper.__wrapped_install__ = install  # type: ignore[attr-defined]
    return wrapper


def use_for_clientapps() -> bool:
    """Make Flower's ``flwr-clientapp`` (imported in this process) install each bundle once;
    False (nothing changed) when the installed Flower does not call ``install_from_fab`` from
    where Flower 1.41 does."""
    from flwr.supernode.runtime import run_clientapp

    current = getattr(run_clientapp, "install_from_fab", None)
    if not callable(current):  # None too
        return False
    if not hasattr(current, "__wrapped_install__"):
        run_clientapp.install_from_fab = install_once(current)
    return True
