"""End a helper process when the process it serves is gone.

The site worker and the SuperNode are children of ``python -m client``, which stops them when
it stops. Killed outright (SIGKILL, a crash) it cannot: they would live on as orphans, the
SuperNode still serving the federation and the worker holding the site's memory (and GPU), next
to the ones a restarted ``python -m client`` starts.

A forked ClientApp process serves the SuperExec named by its ``--parent-pid``. Flower's own
monitor raises SIGINT when that process is gone, but the handler runs only once the main thread
executes Python again: a ClientApp whose main thread is blocked (in a read from a SuperNode
that is going away, say) lives on. Orphans of that kind kept retrying a dead SuperNode here for
hours."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable

__all__ = ["exit_after_process", "exit_with_parent", "process_exists"]


def _interrupt() -> None:
    signal.raise_signal(signal.SIGINT)


def _watch(
    name: str, is_gone: Callable[[], bool], then: Callable[[], None], interval_s: float
) -> None:
    """Call ``then`` from a daemon thread named ``name`` once ``is_gone()`` is true."""

    def watch() -> None:
        while not is_gone():
            time.sleep(interval_s)
        then()

    threading.Thread(target=watch, name=name, daemon=True).start()


def exit_with_parent(on_orphaned: Callable[[], None] = _interrupt, interval_s: float = 0.5) -> None:
    """Watch, in a daemon thread, for this process being handed to another parent (its own
    has died), then call ``on_orphaned``: by default raise SIGINT, so the normal Ctrl-C
    shutdown runs. The handler runs in the main thread only once it executes Python again: a
    process that waits in a blocking system call needs an ``on_orphaned`` that exits itself."""
    parent = os.getppid()
    _watch("exit-with-parent", lambda: os.getppid() != parent, on_orphaned, interval_s)


def process_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie, not yet reaped by its parent, counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def exit_after_process(pid: int, grace_s: float, interval_s: float = 0.5) -> None:
    """Watch, in a daemon thread, for process ``pid`` to end; if this process is still alive
    ``grace_s`` later (time for its own orderly shutdown), end it with ``os._exit(1)``, which
    works whatever its main thread is blocked in."""

    def end() -> None:
        time.sleep(grace_s)
        print(
            f"process {os.getpid()}: process {pid}, which it serves, ended {grace_s:g} s ago "
            "and this one had not stopped; ending it",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    _watch(f"exit-after-{pid}", lambda: not process_exists(pid), end, interval_s)
