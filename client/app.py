"""Flower ClientApp: unpack the server's message, run the site's round, reply with the shared
weights and metrics only. Rater heads and data stay in the site's state directory."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
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

from mrprism_core.checkpoint import CorruptCheckpointError
from mrprism_core.federated import PACKED_KEY, QUALITY_KEY, StateLayout, split_evaluation
from mrprism_core.models import SegmentationModel, split_state
from mrprism_core.protocol import RoundInstructions, SiteReply

from .site import SiteDataError, SiteRuntime

__all__ = ["SITE_FAULTS", "app", "create_client_app", "node_state_dir"]

log = logging.getLogger("flwr.mrprism")  # printed in the SuperNode's log

# A site that cannot take part (bad data, damaged state, a model that does not fit its data)
# answers with an error naming the problem; the server leaves it out and the round goes on.
SITE_FAULTS = (SiteDataError, CorruptCheckpointError, ValueError)
Handler = Callable[[Message, Context], Message]


def _faults_as_error_replies(handler: Handler, state_dir_of: Callable[[Context], Path]) -> Handler:
    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except SITE_FAULTS as err:
            site = context.node_config.get("site") or state_dir_of(context).name
            reason = f"site {site} cannot take part: {err}"
            log.error("%s", reason)
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
            )

    return wrapper


def node_state_dir(context: Context) -> Path:
    """Deployment: ``python -m client`` passes the site's state directory as node config."""
    return Path(str(context.node_config["state-dir"]))


def _site_model(
    site: SiteRuntime, instructions: RoundInstructions, packed: torch.Tensor
) -> tuple[SegmentationModel, StateLayout]:
    """The site's model with the server's shared weights and its own rater heads."""
    model = site.build_model(instructions.model_spec)
    layout = StateLayout.of(split_state(model)[0])
    if layout.fingerprint != instructions.layout:
        raise ValueError(
            f"site {site.name}: shared-weight layout {layout.fingerprint} differs from the "
            f"server's {instructions.layout}; both sides must run the same code and model spec"
        )
    site.load_shared(model, layout.unpack(packed))
    return model, layout


def _train_round(
    site: SiteRuntime, instructions: RoundInstructions, packed: torch.Tensor, run_id: int
) -> tuple[torch.Tensor, SiteReply]:
    """One round at the site: the packed shared weights to send, and the reply."""
    model, layout = _site_model(site, instructions, packed)
    heads_from = site.heads_round  # before this round's save replaces the snapshot
    server_round = instructions.server_round
    result = site.train(
        model,
        local_epochs=instructions.local_epochs,
        lr=instructions.lr,
        seed=site.round_seed(instructions.seed, server_round),
        proximal_mu=instructions.proximal_mu,
        planned_rounds=instructions.num_server_rounds,
        persist_optimizer=instructions.persist_optimizer,
        server_round=server_round,
        personalization=instructions.personalization,
        ditto_lambda=instructions.ditto_lambda,
    )
    site.save(model, server_round=server_round, run_id=run_id)
    metrics = {
        "train-loss": float(result["loss"]),
        "skipped-steps": int(result["skipped_steps"]),
        **{k: float(v) for k, v in result.items() if k.startswith("dp-")},
    }
    if site.shares_quality:  # the one number of the rater report a site may send (opt-in)
        metrics[QUALITY_KEY] = site.annotation_quality(model)
    reply = SiteReply(
        site=site.name,
        num_raters=site.info.num_raters,
        heads_from_round=heads_from,
        num_examples=int(result["num_examples"]),
        metrics=metrics,
    )
    return layout.pack(split_state(model)[0]), reply  # rater heads stay here


def _secure_aggregation_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ client mod, for the messages of a SecAgg+ round only."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _update_clipping_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's client-side fixed clipping (user-level DP), when the server's DP strategy
    sends a clipping norm."""
    from flwr.clientapp.mod import fixedclipping_mod

    if "clipping_norm" in msg.content.config_records.get("config", {}):
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
    @functools.partial(_faults_as_error_replies, state_dir_of=state_dir_of)
    def train(msg: Message, context: Context) -> Message:
        site = SiteRuntime.from_state_dir(state_dir_of(context))
        if "config" not in msg.content.config_records:  # SecAgg+ speaks the legacy records
            return _legacy_train(site, msg, context)
        instructions = RoundInstructions.from_config(msg.content["config"])
        packed = msg.content["arrays"].to_torch_state_dict()[PACKED_KEY]
        shared, reply = _train_round(site, instructions, packed, context.run_id)
        content = RecordDict(
            {
                "arrays": ArrayRecord({PACKED_KEY: shared}),
                "metrics": MetricRecord(reply.to_metrics()),
                "site": ConfigRecord(reply.to_site()),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    @functools.partial(_faults_as_error_replies, state_dir_of=state_dir_of)
    def evaluate(msg: Message, context: Context) -> Message:
        instructions = RoundInstructions.from_config(msg.content["config"])
        site = SiteRuntime.from_state_dir(state_dir_of(context))
        packed = msg.content["arrays"].to_torch_state_dict()[PACKED_KEY]
        model, _ = _site_model(site, instructions, packed)
        model = site.evaluated_model(model, instructions.personalization)
        result = site.evaluate(model, instructions.eval_split)
        scalars, details = split_evaluation(result)
        reply = SiteReply(
            site=site.name,
            num_raters=site.info.num_raters,
            heads_from_round=site.heads_round,
            num_examples=int(result["num_examples"]),
            metrics=scalars,
            details=details,
        )
        content = RecordDict(
            {"metrics": MetricRecord(reply.to_metrics()), "site": ConfigRecord(reply.to_site())}
        )
        return Message(content=content, reply_to=msg)

    return app


def _legacy_train(site: SiteRuntime, msg: Message, context: Context) -> Message:
    """A SecAgg+ round's training: the same round, in Flower's legacy ``fitins``/``fitres``
    records that ``secaggplus_mod`` masks before anything leaves the site."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

    instruction = recorddict_to_fitins(msg.content, keep_input=True)
    packed = torch.from_numpy(parameters_to_ndarrays(instruction.parameters)[0])
    instructions = RoundInstructions.from_config(instruction.config)
    shared, reply = _train_round(site, instructions, packed, context.run_id)
    result = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters([shared.numpy()]),
        num_examples=reply.num_examples,
        metrics=reply.to_config(),
    )
    return Message(fitres_to_recorddict(result, keep_input=True), reply_to=msg)


app = create_client_app()
