"""``supernode.idle_poll_s``: Flower's SuperNode asks again sooner when no message waits."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter

import pytest

from client.__main__ import SITE_CODE_ROOT, supernode_command
from client.site import SiteDataError
from client.supernode_launch import FLOWER_IDLE_WAIT_S, ShortIdleWait, shorten_idle_wait

from .deploy import Deployment


def _config(**supernode: object) -> dict:
    node = {"insecure": True, **supernode}
    return {"site": "x", "superlink": "127.0.0.1:9092", "supernode": node}


def test_only_flowers_idle_wait_is_shortened(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    shim = ShortIdleWait(0.2)
    shim.sleep(FLOWER_IDLE_WAIT_S)  # the idle wait
    shim.sleep(0.5)  # Flower's wait for a reply or an object: unchanged
    assert slept == [0.2, 0.5]
    assert shim.time is time.time and shim.monotonic is time.monotonic
    with pytest.raises(ValueError, match="idle_poll_s"):
        ShortIdleWait(0)


def test_the_installed_flower_has_the_wait_this_shortens(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    assert shorten_idle_wait(0.3)
    assert isinstance(loop.time, ShortIdleWait) and loop.time.idle_poll_s == 0.3
    # a second call finds the shim, not Flower's module: nothing is wrapped twice
    assert not shorten_idle_wait(0.1) and loop.time.idle_poll_s == 0.3


def test_the_site_config_chooses_the_supernode_command(tmp_path):
    fast = supernode_command(_config(idle_poll_s=0.5), tmp_path)
    assert fast[:4] == [sys.executable, "-m", "client.supernode_launch", "--idle-poll-s=0.5"]
    assert f"--pin-app={SITE_CODE_ROOT}" in fast  # supernode.pin_app defaults to true
    for stock in (None, FLOWER_IDLE_WAIT_S):
        # Flower's own wait: its own SuperNode, unless the site runs only its own code
        pinned = supernode_command(_config(idle_poll_s=stock), tmp_path)
        assert pinned[3:5] == [f"--idle-poll-s={FLOWER_IDLE_WAIT_S}", f"--pin-app={SITE_CODE_ROOT}"]
        unpinned = supernode_command(_config(idle_poll_s=stock, pin_app=False), tmp_path)
        assert unpinned[0].endswith("flower-supernode")
    with pytest.raises(SiteDataError, match=r"supernode.idle_poll_s=0 is refused"):
        supernode_command(_config(idle_poll_s=0), tmp_path)


def test_an_idle_supernode_polls_at_the_configured_interval(tmp_path, monkeypatch):
    """Two idle SuperNodes, one at 0.2 s and one at Flower's fixed 3 s: over the same time the
    SuperLink sees the first ask for messages several times as often."""
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")  # the SuperLink logs every pull with its node
    deployment = Deployment(tmp_path)
    try:
        deployment.start_superlink(limit=300)
        for name, poll in (("fast", "0.2"), ("stock", "null")):
            deployment.start_site(
                "synthetic_a", "supernode.worker=false", f"supernode.idle_poll_s={poll}",
                name=name, limit=300,
            )  # fmt: skip
        deployment.wait_online(2)
        time.sleep(8)
        node_of = {}
        for name in ("fast", "stock"):
            found = re.search(r"SuperNode ID: (\d+)", deployment.log(name))
            assert found, deployment.log(name)[-2000:]
            node_of[name] = found.group(1)
        pulls = Counter(
            re.findall(r"\[Fleet\.PullMessages\] node_id=(\d+)", deployment.log("superlink"))
        )
    finally:
        deployment.stop()
    fast, stock = pulls[node_of["fast"]], pulls[node_of["stock"]]
    assert fast >= 10 and fast > 3 * stock, (fast, stock)
