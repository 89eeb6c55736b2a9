"""The test deployments' free ports: two pytest-xdist workers never hand out the same one."""

from __future__ import annotations

from . import deploy


def _ports_of(worker: str, monkeypatch, count: int = 200) -> set[int]:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setattr(deploy, "_HANDED_OUT", set())  # each worker process has its own memory
    return {deploy.free_port() for _ in range(count)}


def test_two_workers_get_disjoint_free_ports(monkeypatch):
    first, second = _ports_of("gw0", monkeypatch), _ports_of("gw1", monkeypatch)
    # each got every port it asked for (Linux gives bind(0) odd ports while it has them, so a
    # split on parity left one worker none), and no port went to both
    assert len(first) == len(second) == 200
    assert not first & second
