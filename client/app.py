"""Flower ClientApp: unpack the server's message, run the site's round, reply with the shared
weights (with SCAFFOLD also the change of the site's control variate) and metrics only. Rater
heads and data stay in the site's state directory.

This module imports no torch: in deployment ``python -m client`` keeps a site worker warm
(``client/worker.py``) and the ClientApp, a fresh process per message, only hands it the
message; without a worker (simulation) the round runs here (``client/rounds.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from copy import copy
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from mrprism_core.protocol import (
    CLIPPING_NORM_KEY,
    CONTROL_KEY,
    KEPT_EVALUATION_KEY,
    KEYS_AHEAD_KEY,
    LEGACY_WEIGHTS_RECORD,
    PACKED_KEY,
    TRAIN_AHEAD_KEY,
)

from .kept_evaluation import kept_evaluation
from .worker_protocol import (
    COLLECT,
    SOCKET_NODE_CONFIG,
    TRAIN_AHEAD,
    RoundOutcome,
    WorkerUnavailable,
    ask_worker,
)

__all__ = ["app", "create_client_app", "node_state_dir"]

log = logging.getLogger("flwr.mrprism")  # printed in the SuperNode's log


def node_state_dir(context: Context) -> Path:
    """Deployment: ``python -m client`` passes the site's state directory as node config."""
    return Path(str(context.node_config["state-dir"]))


def _run(
    kind: str,
    config: dict[str, Any],
    arrays: dict[str, np.ndarray],
    context: Context,
    state_dir: Path,
) -> RoundOutcome:
    """The message's work, by the site worker when the node has one, else in this process.
    ``arrays``: the message's, by name (the shared weights or their float16 change, with
    SCAFFOLD the server's control variate)."""
    socket_path = context.node_config.get(SOCKET_NODE_CONFIG)
    if socket_path:
        try:
            return ask_worker(socket_path, state_dir, kind, config, arrays, context.run_id)
        except WorkerUnavailable as err:
            return RoundOutcome(error=str(err))
    from .rounds import run_message  # torch, the model and the data: only without a worker

    return run_message(kind, config, arrays, run_id=context.run_id, state_dir=state_dir)


def _error_reply(msg: Message, context: Context, state_dir: Path, error: str) -> Message:
    """A site that cannot take part says why; the server leaves it out, the round goes on."""
    site = context.node_config.get("site") or state_dir.name
    reason = f"site {site} cannot take part: {error}"
    log.error("%s", reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _secure_aggregation_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ client mod, for the messages of a SecAgg+ round only
    (``server/secagg_workflow.py``). A round's first message that brings the round's weights
    (``secagg-train-ahead``) has the site worker start training on them first; the reply then
    says so, and the collect stage brings no weights again. An unmask message that brings the
    next round's setup parameters (``secagg-keys-ahead``) is answered, then the next round's
    keys are made as its setup stage would make them and go back in the same reply."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    trains_ahead = stage in (Stage.SETUP, Stage.SHARE_KEYS) and _train_ahead(msg, context)
    reply = secaggplus_mod(msg, context, call_next)
    if reply.has_error():
        return reply
    if trains_ahead:
        reply.content.config_records[TRAIN_AHEAD_KEY] = ConfigRecord({"started": True})
    if stage == Stage.UNMASK and KEYS_AHEAD_KEY in msg.content.config_records:
        parameters = ConfigRecord(dict(msg.content[KEYS_AHEAD_KEY]))
        # the mod reads the node and the message type from the metadata, as this message's
        next_setup = Message(
            RecordDict({RECORD_KEY_CONFIGS: parameters}), metadata=copy(msg.metadata)
        )
        try:
            keys = secaggplus_mod(next_setup, context, _setup_needs_no_app)
        except Exception as err:  # noqa: BLE001 - the unmask reply must go; setup comes as usual
            log.warning("the next SecAgg+ round's keys were not made ahead: %s", err)
        else:
            reply.content.config_records[KEYS_AHEAD_KEY] = keys.content[RECORD_KEY_CONFIGS]
    return reply


def _setup_needs_no_app(msg: Message, context: Context) -> Message:
    raise RuntimeError("SecAgg+'s setup stage does not call the ClientApp")


def _train_ahead(msg: Message, context: Context) -> bool:
    """Hand the round's weights, which came with its first message, to the site worker, which
    starts training at once and answers when the collect stage asks (``client/worker.py``);
    False when the message brings none or the node has no worker that takes them (the collect
    stage then brings them)."""
    socket_path = context.node_config.get(SOCKET_NODE_CONFIG)
    if not socket_path or LEGACY_WEIGHTS_RECORD not in msg.content.array_records:
        return False
    state_dir = node_state_dir(context)
    config, arrays = _legacy_instruction(msg)
    try:  # a worker being started again: no wait here, the collect stage waits for it
        outcome = ask_worker(
            socket_path, state_dir, TRAIN_AHEAD, config, arrays, context.run_id, start_wait_s=0
        )
    except WorkerUnavailable as err:
        log.warning("training not started with the round's first SecAgg+ message: %s", err)
        return False
    return outcome.error is None


def _update_clipping_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's client-side fixed clipping (user-level DP), when the server's DP strategy
    sends a clipping norm."""
    from flwr.clientapp.mod import fixedclipping_mod

    if CLIPPING_NORM_KEY in msg.content.config_records.get("config", {}):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def create_client_app(state_dirs: Sequence[str] | None = None) -> ClientApp:
    """The ClientApp. ``state_dirs`` maps simulation partition ids to site state directories
    (simulation has no per-node config); deployment reads ``state-dir`` from node config."""

    def state_dir_of(context: Context) -> Path:
        if state_dirs is None:
            return node_state_dir(context)
        return Path(state_dirs[int(context.node_config["partition-id"])])

    app = ClientApp(mods=[_secure_aggregation_when_asked])

    @app.train(mods=[_update_clipping_when_asked])
    def train(msg: Message, context: Context) -> Message:
        state_dir = state_dir_of(context)
        if "config" not in msg.content.config_records:  # SecAgg+ speaks the legacy records
            return _legacy_train(msg, context, state_dir)
        config = dict(msg.content["config"])
        arrays = {name: array.numpy() for name, array in msg.content["arrays"].items()}
        outcome = _run("train", config, arrays, context, state_dir)
        if outcome.error is not None:
            return _error_reply(msg, context, state_dir, outcome.error)
        assert outcome.reply is not None and outcome.shared is not None
        # the float32 weights or their float16 change (update-precision), as the site chose
        sent = {name: Array(array) for name, array in outcome.shared.items()}
        if outcome.control is not None:  # SCAFFOLD: the change of the site's control variate
            sent[CONTROL_KEY] = Array(outcome.control)
        content = RecordDict(
            {
                "arrays": ArrayRecord(sent),
                "metrics": MetricRecord(outcome.reply.to_metrics()),
                "site": ConfigRecord(outcome.reply.to_site()),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        state_dir = state_dir_of(context)
        config = dict(msg.content["config"])
        if config.get(KEPT_EVALUATION_KEY):  # done by the next round's training message
            evaluated_round = int(config["server-round"])
            outcome = kept_evaluation(state_dir, context.run_id, evaluated_round)
        else:
            arrays = {name: array.numpy() for name, array in msg.content["arrays"].items()}
            outcome = _run("evaluate", config, arrays, context, state_dir)
        if outcome.error is not None:
            return _error_reply(msg, context, state_dir, outcome.error)
        assert outcome.reply is not None
        content = RecordDict(
            {
                "metrics": MetricRecord(outcome.reply.to_metrics()),
                "site": ConfigRecord(outcome.reply.to_site()),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _legacy_instruction(msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A SecAgg+ round's training config and arrays, from Flower's legacy ``fitins`` records:
    [packed weights] or, with SCAFFOLD, [packed weights, server control variate]; none in a
    collect stage whose weights came with the round's first message."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    instruction = recorddict_to_fitins(msg.content, keep_input=True)
    # SecAgg+ masks and sums the weights themselves, so never their encoded change
    config = {**instruction.config, "update-precision": "float32"}
    received = parameters_to_ndarrays(instruction.parameters)
    if not received:
        return config, {}
    packed, *control = received
    return config, {PACKED_KEY: packed, **({CONTROL_KEY: control[0]} if control else {})}


def _legacy_train(msg: Message, context: Context, state_dir: Path) -> Message:
    """A SecAgg+ round's training: the same round, in Flower's legacy ``fitins``/``fitres``
    records that ``secaggplus_mod`` masks before anything leaves the site (with SCAFFOLD the
    change of the site's control variate too, as a second array). When the site's worker
    started it at the round's first message, its result is collected instead."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    config, arrays = _legacy_instruction(msg)
    kind = COLLECT if TRAIN_AHEAD_KEY in msg.content.config_records else "train"
    outcome = _run(kind, config, arrays, context, state_dir)
    if outcome.error is not None:
        return _error_reply(msg, context, state_dir, outcome.error)
    assert outcome.reply is not None and outcome.shared is not None
    # the change of the site's control variate is masked and summed with the weights
    weights = outcome.shared[PACKED_KEY]
    sent = [weights] if outcome.control is None else [weights, outcome.control]
    result = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters(sent),
        num_examples=outcome.reply.num_examples,
        metrics=outcome.reply.to_config(),
    )
    return Message(fitres_to_recorddict(result, keep_input=True), reply_to=msg)


app = create_client_app()
