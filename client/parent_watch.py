"""End a helper process of ``python -m client`` when ``python -m client`` itself is gone.

The site worker and the SuperNode are children of ``python -m client``, which stops them when
it stops. Killed outright (SIGKILL, a crash) it cannot: they would live on as orphans, the
SuperNode still serving the federation and the worker holding the site's memory (and GPU), next
to the ones a restarted ``python -m client`` starts."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

__all__ = ["exit_with_parent"]


def _interrupt() -> None:
    signal.raise_signal(signal.SIGINT)


def exit_with_parent(on_orphaned: Callable[[], None] = _interrupt, interval_s: float = 0.5) -> None:
    """Watch, in a daemon thread, for this process being handed to another parent (its own
    has died), then call ``on_orphaned``: by default raise SIGINT, so the normal Ctrl-C
    shutdown runs. The handler runs in the main thread only once it executes Python again: a
    process that waits in a blocking system call needs an ``on_orphaned`` that exits itself."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        on_orphaned()

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
