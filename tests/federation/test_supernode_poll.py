"""``supernode.idle_poll_s``: Flower's SuperNode asks again sooner when no message waits."""

from __future__ import annotations

import re
import sys
import time
from collections import Counter

import pytest

from client.__main__ import SITE_CODE_ROOT, supernode_command
from client.site_config import SiteDataError
from client.supernode_launch import (
    DEFAULT_HEARTBEAT_S,
    FIRST_IDLE_POLL_S,
    FLOWER_HEARTBEAT_S,
    FLOWER_IDLE_WAIT_S,
    FLOWER_REPLY_WAIT_S,
    HEARTBEAT_RANGE_S,
    REPLY_POLL_S,
    ShortIdleWait,
    set_heartbeat,
    shorten_idle_wait,
)

from .deploy import Deployment


def _config(**supernode: object) -> dict:
    node = {"insecure": True, **supernode}
    return {"site": "x", "superlink": "127.0.0.1:9092", "supernode": node}


def test_only_flowers_polling_waits_are_shortened(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    shim = ShortIdleWait(0.2)
    shim.sleep(FLOWER_IDLE_WAIT_S)  # idle from the start: the idle pace
    shim.sleep(FLOWER_IDLE_WAIT_S)
    shim.sleep(1.0)  # any other wait: unchanged
    assert slept == [0.2, 0.2, 1.0]
    assert shim.time is time.time and shim.monotonic is time.monotonic
    with pytest.raises(ValueError, match="idle_poll_s"):
        ShortIdleWait(0)


def test_after_a_message_the_supernode_asks_sooner_then_settles_at_the_idle_pace(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    shim = ShortIdleWait(0.5)
    shim.sleep(FLOWER_REPLY_WAIT_S)  # its ClientApp works on a message: look for the reply
    shim.sleep(FLOWER_REPLY_WAIT_S)
    for _ in range(6):  # the reply went out; no message waits yet
        shim.sleep(FLOWER_IDLE_WAIT_S)
    assert slept == [REPLY_POLL_S, REPLY_POLL_S, FIRST_IDLE_POLL_S, 0.1, 0.2, 0.4, 0.5, 0.5]
    # at Flower's own idle wait, every wait is Flower's
    slept.clear()
    stock = ShortIdleWait(FLOWER_IDLE_WAIT_S)
    for seconds in (FLOWER_REPLY_WAIT_S, FLOWER_IDLE_WAIT_S, FLOWER_IDLE_WAIT_S):
        stock.sleep(seconds)
    assert slept == [FLOWER_REPLY_WAIT_S, FLOWER_IDLE_WAIT_S, FLOWER_IDLE_WAIT_S]


def test_the_installed_flower_has_the_wait_this_shortens(monkeypatch):
    from flwr.supernode import start_client_internal as loop

    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    assert shorten_idle_wait(0.3)
    assert isinstance(loop.time, ShortIdleWait) and loop.time.idle_poll_s == 0.3
    # a second call finds the shim, not Flower's module: nothing is wrapped twice
    assert not shorten_idle_wait(0.1) and loop.time.idle_poll_s == 0.3


def test_the_site_config_chooses_the_supernode_command(tmp_path):
    fast = supernode_command(_config(idle_poll_s=0.5), tmp_path)
    assert fast[:5] == [
        sys.executable, "-m", "client.supernode_launch", "--idle-poll-s=0.5",
        f"--heartbeat-s={DEFAULT_HEARTBEAT_S:g}",  # supernode.heartbeat_s defaults to ours
    ]  # fmt: skip
    assert f"--pin-app={SITE_CODE_ROOT}" in fast  # supernode.pin_app defaults to true
    for stock in (None, FLOWER_IDLE_WAIT_S):
        # Flower's own wait and heartbeat: its own SuperNode, unless the site runs only its
        # own code
        pinned = supernode_command(_config(idle_poll_s=stock, heartbeat_s=None), tmp_path)
        assert pinned[3:5] == [f"--idle-poll-s={FLOWER_IDLE_WAIT_S}", f"--pin-app={SITE_CODE_ROOT}"]
        unpinned = supernode_command(
            _config(idle_poll_s=stock, heartbeat_s=None, pin_app=False), tmp_path
        )
        assert unpinned[0].endswith("flower-supernode")
        beating = supernode_command(
            _config(idle_poll_s=stock, heartbeat_s=15, pin_app=False), tmp_path
        )
        assert beating[3:5] == [f"--idle-poll-s={FLOWER_IDLE_WAIT_S}", "--heartbeat-s=15"]
    with pytest.raises(SiteDataError, match=r"supernode.idle_poll_s=0 is refused"):
        supernode_command(_config(idle_poll_s=0), tmp_path)
    for refused in (5, 3600):  # outside what Flower's SuperLink accepts
        with pytest.raises(SiteDataError, match=rf"supernode.heartbeat_s={refused} is refused"):
            supernode_command(_config(heartbeat_s=refused), tmp_path)


def test_the_heartbeat_is_set_where_the_installed_flower_reads_it(monkeypatch):
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection as connection

    # the bounds we check are the SuperLink's, and Flower's interval is the one we replace
    assert HEARTBEAT_RANGE_S == (constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL)
    assert constant.HEARTBEAT_DEFAULT_INTERVAL == FLOWER_HEARTBEAT_S
    for module in (connection, heartbeat):  # restored after the test
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    assert set_heartbeat(12.0)
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 12.0
    assert constant.HEARTBEAT_DEFAULT_INTERVAL == FLOWER_HEARTBEAT_S  # the SuperLink's own: kept
    # a second call no longer finds Flower's interval: nothing is changed twice
    assert not set_heartbeat(20.0) and connection.HEARTBEAT_DEFAULT_INTERVAL == 12.0
    with pytest.raises(ValueError, match="heartbeat_s must be 10-1800 seconds"):
        set_heartbeat(5.0)


def test_an_idle_supernode_polls_and_beats_at_the_configured_intervals(tmp_path, monkeypatch):
    """Two idle SuperNodes, one at a 0.2 s poll and a 10 s heartbeat, one at Flower's fixed 3 s
    and 30 s: over the same time the SuperLink sees the first ask for messages several times as
    often, and once both lose power it takes the first for gone while the second still counts
    as online (gone after two missed heartbeats: 20 s against 60 s)."""
    monkeypatch.setenv("FLWR_LOG_LEVEL", "DEBUG")  # the SuperLink logs every pull with its node
    deployment = Deployment(tmp_path)
    try:
        deployment.start_superlink(limit=300)
        for name, poll, beat in (("fast", "0.2", "10"), ("stock", "null", "null")):
            deployment.start_site(
                "synthetic_a", "supernode.worker=false", f"supernode.idle_poll_s={poll}",
                f"supernode.heartbeat_s={beat}", name=name, limit=300,
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
        beats = re.findall(
            r"SendNodeHeartbeat\] Request: \{'node': \{'nodeId': '(\d+)'\}, "
            r"'heartbeatInterval': ([\d.]+)\}",
            deployment.log("superlink"),
        )
        for name in ("fast", "stock"):
            deployment.kill(name)
        deadline = time.monotonic() + 120
        while (status := deployment.node_status())[node_of["fast"]] == "online":
            assert time.monotonic() < deadline, status
            time.sleep(1)
    finally:
        deployment.stop()
    fast, stock = pulls[node_of["fast"]], pulls[node_of["stock"]]
    assert fast >= 10 and fast > 3 * stock, (fast, stock)
    # the interval each announced to the SuperLink, and what the SuperLink made of it
    announced = {name: {float(i) for n, i in beats if n == node_of[name]} for name in node_of}
    assert announced == {"fast": {10.0}, "stock": {float(FLOWER_HEARTBEAT_S)}}, beats
    assert status[node_of["fast"]] == "offline" and status[node_of["stock"]] == "online", status
