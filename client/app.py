"""Flower ClientApp: unpack the server's message, run the site's round, reply with the shared
weights and metrics only. Rater heads and data stay in the site's state directory."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

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
from mrprism_core.federated import PACKED_KEY, StateLayout, split_evaluation
from mrprism_core.models import SegmentationModel, split_state

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


def _load_global(site: SiteRuntime, msg: Message) -> tuple[SegmentationModel, StateLayout]:
    """The site's model with the server's shared weights and its own rater heads."""
    config = msg.content["config"]
    model = site.build_model(json.loads(str(config["model-spec"])))
    layout = StateLayout.of(split_state(model)[0])
    if layout.fingerprint != str(config["layout"]):
        raise ValueError(
            f"site {site.name}: shared-weight layout {layout.fingerprint} differs from the "
            f"server's {config['layout']}; both sides must run the same code and model spec"
        )
    packed = msg.content["arrays"].to_torch_state_dict()[PACKED_KEY]
    site.load_shared(model, layout.unpack(packed))
    return model, layout


def create_client_app(state_dirs: Sequence[str] | None = None) -> ClientApp:
    """The ClientApp. ``state_dirs`` maps simulation partition ids to site state directories
    (simulation has no per-node config); deployment reads ``state-dir`` from node config."""

    def state_dir_of(context: Context) -> Path:
        if state_dirs is None:
            return node_state_dir(context)
        return Path(state_dirs[int(context.node_config["partition-id"])])

    app = ClientApp()

    @app.train()
    @functools.partial(_faults_as_error_replies, state_dir_of=state_dir_of)
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        site = SiteRuntime.from_state_dir(state_dir_of(context))
        model, layout = _load_global(site, msg)
        heads_from = site.heads_round  # before this round's save replaces the snapshot
        server_round = int(config["server-round"])
        result = site.train(
            model,
            local_epochs=int(config["local-epochs"]),
            lr=float(config["lr"]),
            seed=site.round_seed(int(config["seed"]), server_round),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )
        site.save(model, server_round=server_round, run_id=context.run_id)
        shared = layout.pack(split_state(model)[0])  # rater heads never leave the site
        metrics = MetricRecord(
            {
                "train-loss": float(result["loss"]),
                "skipped-steps": int(result["skipped_steps"]),
                "num-examples": int(result["num_examples"]),
            }
        )
        details = ConfigRecord(
            {
                "name": site.name,
                "num-raters": site.info.num_raters,
                "heads-from-round": heads_from,
            }
        )
        content = RecordDict(
            {"arrays": ArrayRecord({PACKED_KEY: shared}), "metrics": metrics, "site": details}
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    @functools.partial(_faults_as_error_replies, state_dir_of=state_dir_of)
    def evaluate(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        site = SiteRuntime.from_state_dir(state_dir_of(context))
        model, _ = _load_global(site, msg)
        result = site.evaluate(model, str(config.get("eval-split", "val")))
        scalars, details = split_evaluation(result)
        metrics = MetricRecord({**scalars, "num-examples": int(result["num_examples"])})
        site_record = ConfigRecord(
            {
                "name": site.name,
                "num-raters": site.info.num_raters,
                "heads-from-round": site.heads_round,
                **details,
            }
        )
        return Message(content=RecordDict({"metrics": metrics, "site": site_record}), reply_to=msg)

    return app


app = create_client_app()
