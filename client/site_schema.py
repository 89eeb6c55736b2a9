"""The typed shape of a site config (``site_configs/<site>.yaml``), checked when it is composed.

OmegaConf merges the composed YAML into these dataclasses: a value of the wrong type
(``train.batch_size=abc``) or a key the schema does not know (``trian.batch_size=4``) is refused
with the key, the value and what was expected, before anything runs, and so is a number
outside its range (``train.batch_size=0``). The ``data`` block is
checked by its reader (each kind has its own options) when the data set is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mrprism_core.config_schema import above, at_least, checked, within

from .privacy import PrivacyConfig
from .supernode_launch import DEFAULT_HEARTBEAT_S, DEFAULT_IDLE_POLL_S, HEARTBEAT_RANGE_S

__all__ = ["SiteSchema", "check_site_config"]


@dataclass
class TrainSchema:
    batch_size: int = at_least(8, 1)  # cases per optimizer step at this site
    num_workers: int = at_least(0, 0)  # DataLoader worker processes
    augment: bool = False  # random flips and quarter turns of the training cases
    test_mirroring: bool = False  # score the test split averaged over 4 mirrorings per case


@dataclass
class SupernodeSchema:
    port: int = at_least(9094, 1)  # local Runtime API port
    insecure: bool = True  # plain HTTP to the SuperLink (trials only)
    root_certificates: str | None = None  # CA certificate of the SuperLink (TLS)
    auth_private_key: str | None = None  # this site's key for SuperNode authentication
    # stop reconnecting after this many tries (None: never)
    max_retries: int | None = at_least(None, 0)
    # retry a refused activation (node auth) this long
    activation_wait_s: float = at_least(180.0, 0)
    # after SIGTERM/Ctrl-C, kill a SuperNode still running this long
    stop_wait_s: float = at_least(15.0, 0)
    worker: bool = True  # keep torch, config and data loaded in a site worker between messages
    # start each message's ClientApp process as a copy of one that has Flower imported
    fork_clientapp: bool = True
    pin_app: bool = True  # run only apps whose Python code is this site's own checkout
    # after an empty poll, less right after a message (None: Flower's 3 s and 0.5 s reply wait)
    idle_poll_s: float | None = above(DEFAULT_IDLE_POLL_S, 0)
    # between heartbeats; gone after two missed (None: Flower's 30 s)
    heartbeat_s: float | None = within(DEFAULT_HEARTBEAT_S, *HEARTBEAT_RANGE_S)


@dataclass
class SiteSchema:
    site: str = "???"  # the site's name, reported with its metrics
    superlink: str = "127.0.0.1:9092"  # SuperLink address host:port
    state_dir: str = "???"  # site-local state: heads, snapshot, resolved config
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # torch CPU threads (None: all cores); shared machine: cores/sites
    threads: int | None = at_least(None, 1)
    share_quality: bool = False  # send one annotation-quality score per round (opt-in)
    seed: int = 0  # seeds the site's rater heads and shuffles
    train: TrainSchema = field(default_factory=TrainSchema)
    supernode: SupernodeSchema = field(default_factory=SupernodeSchema)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: dict[str, Any] = field(default_factory=dict)


def check_site_config(cfg: Any) -> Any:
    """``cfg`` (a composed OmegaConf config) merged into :class:`SiteSchema`.

    Raises:
        ValueError: naming the key, the value and the expected type, or the unknown key.
    """
    return checked(SiteSchema, cfg, "a site config")
