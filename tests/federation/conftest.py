"""Fixtures for the Flower side: sites prepared on disk and messages built in-process."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from client.site_config import compose_site_config
from client.state import SiteStore
from mrprism_core.federated import PACKED_KEY, StateLayout
from mrprism_core.protocol import CONTROL_KEY
from mrprism_core.update_codec import UPDATE_KEY, UPDATE_SCALE_KEY, decode_update, is_encoded
from server.config import RunConfig
from server.federation import initial_arrays, round_instructions

SMALL = ["data.splits.train=4", "data.splits.val=4", "data.image_size=32"]


@contextlib.contextmanager
def _task_identity() -> Iterator[None]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


@pytest.fixture
def task_identity():
    """Flower stamps every Message with the running task's identity, which its runtimes set;
    calling a ClientApp in-process needs one too."""
    with _task_identity():
        yield


def _site_maker(root: Path) -> Callable[..., str]:
    def make(site: str, *overrides: str, name: str | None = None) -> str:
        """``name``: another site on the same config, in its own state dir."""
        name = name or site
        cfg = compose_site_config(site, [*SMALL, f"site={name}", *overrides])
        state_dir = root / "sites" / name
        SiteStore(state_dir).write_config(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        return str(state_dir)

    return make


@pytest.fixture
def make_site(tmp_path):
    """Write a site's resolved config into its own state dir, as `python -m client` does."""
    return _site_maker(tmp_path)


def train_message(cfg: RunConfig | None = None, server_round: int = 1):
    """The message a train round sends, built from the run config like the server does."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    cfg = cfg or RunConfig()
    initial = initial_arrays(cfg)
    layout = StateLayout.of(initial)
    instructions = replace(round_instructions(cfg, layout), server_round=server_round)
    config = ConfigRecord(instructions.to_config())  # what the server sends every site
    arrays = {PACKED_KEY: layout.pack(initial)}
    if cfg.drift_correction != "none":  # round 1 of SCAFFOLD: the server's c is all zeros
        arrays[CONTROL_KEY] = torch.zeros(layout.size)
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": config})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN), layout


#: what a training reply's array record holds by default (update-precision float16)
ENCODED_REPLY_KEYS = [UPDATE_KEY, UPDATE_SCALE_KEY]


def reply_weights(reply, message) -> np.ndarray:
    """The float32 shared weights of a training reply as the server reads them: its float16
    change added to the weights ``message`` sent (update-precision float16, the default), or
    the weights themselves (float32)."""
    assert not reply.has_error(), reply.error
    arrays = {name: array.numpy() for name, array in reply.content["arrays"].items()}
    if is_encoded(arrays):
        return decode_update(arrays, message.content["arrays"][PACKED_KEY].numpy())
    return arrays[PACKED_KEY]


def node_context(state_dir: str, worker_socket: Path | None = None):
    """The node config ``python -m client`` gives its SuperNode (with the site worker's
    socket when ``worker_socket`` is given)."""
    from flwr.app import Context, RecordDict

    node_config = {"state-dir": state_dir}
    if worker_socket is not None:
        node_config["worker-socket"] = str(worker_socket)
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def simulate(config: dict, state_dirs: list[str], client_app=None, on_round=None) -> list[dict]:
    """Our ServerApp and ClientApp (or ``client_app``) in Flower's simulation engine, one
    virtual SuperNode per state dir; returns the rounds of ``out-dir``'s metrics log."""
    from flwr.simulation import run_simulation

    from client.app import create_client_app
    from server.app import create_server_app

    run_simulation(
        server_app=create_server_app(config, on_round=on_round),
        client_app=client_app or create_client_app(state_dirs),
        num_supernodes=len(state_dirs),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"address": "local", "num_cpus": 2},
        },
    )
    metrics = Path(config["out-dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


# one long round (160 optimizer steps) so the model has learnt the structures
# the uncertainty map reads the personalised heads: train them with the multi-head term too
# (the faithful shuffle loss alone leaves them soft after one round; README, Benchmarks)
ROUND = RunConfig(
    local_epochs=20,
    lr=3e-3,
    model_options=json.dumps({"recurrences": 1, "divp_supervision": "shuffle+multihead"}),
)


@pytest.fixture(scope="session")
def _trained_site_once(tmp_path_factory) -> Path:
    """synthetic_a after one (long) federated round, trained once for the session."""
    make = _site_maker(tmp_path_factory.mktemp("trained"))
    state_dir = make(
        "synthetic_a", "data.splits.train=32", "train.batch_size=4", "data.image_size=32"
    )
    from client.app import create_client_app

    with _task_identity():
        reply = create_client_app()(train_message(ROUND)[0], node_context(state_dir))
    assert not reply.has_error(), reply.error
    return Path(state_dir)


@pytest.fixture
def trained_site(_trained_site_once, tmp_path) -> str:
    """synthetic_a after one (long) federated round: its snapshot is its personalised model.
    Each test gets its own copy of the state dir, so none sees another's changes."""
    return str(shutil.copytree(_trained_site_once, tmp_path / "trained_site"))
