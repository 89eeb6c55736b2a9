"""Keep Flower's processes from calling home.

Unless told otherwise, Flower 1.41 sends a usage event to ``telemetry.flower.ai`` when a
SuperNode, SuperExec, ClientApp or simulation starts and ends, and its SuperNode and
SuperLink ask ``api.flower.ai`` for a newer release at start. A hospital's site should not
make connections its IT did not approve, and our rule is no network at run time beyond the
federation itself. Both switches are read when Flower is imported or started, so they are set
in the environment before either: by ``python -m client`` for its SuperNode and everything
that SuperNode starts, and on import of our packages for the simulation and the benchmarks.
An operator who wants Flower's telemetry sets ``FLWR_TELEMETRY_ENABLED=1`` (we only fill in
what is unset).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["FLOWER_OFFLINE_ENV", "keep_flower_offline"]

#: Flower's own switches for its telemetry events and its update check.
FLOWER_OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def keep_flower_offline(environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn Flower's telemetry and update check off in ``environ`` where not set already."""
    for name, value in FLOWER_OFFLINE_ENV.items():
        environ.setdefault(name, value)
