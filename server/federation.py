"""The round loop of a federated run: Flower's strategy does sampling and aggregation; this
loop adds what a hospital federation needs around it.

* resume: the global weights, the round reached and the metrics log are checkpointed
  atomically after every round; a restarted ServerApp continues from the next round;
* dropout: a site that fails, disappears or does not answer within ``round-timeout`` is
  logged by name and left out of that phase; the round aggregates when at least
  ``min-train-replies`` usable updates arrived, and keeps the global model otherwise;
* update hygiene: a reply whose arrays are non-finite or do not match the global model is
  dropped (and logged) before aggregation, so one broken site cannot poison the round;
* per-site metrics in ``metrics.jsonl`` beside Flower's weighted aggregates.

Flower's ``Strategy.start`` always counts rounds from 1, hence this loop over the strategy's
own ``configure_*`` / ``aggregate_*`` methods.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from mrprism_core.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    save_checkpoint,
    shared_weights_from_checkpoint,
)
from mrprism_core.data.factory import DatasetInfo
from mrprism_core.drift_correction import check_drift_correction, updated_server_control
from mrprism_core.federated import (
    PACKED_KEY,
    QUALITY_KEY,
    WEIGHT_KEY,
    StateLayout,
    aggregation_weights,
    update_problem,
)
from mrprism_core.lr_schedule import check_lr_schedule
from mrprism_core.models import build_model_for_data, split_state
from mrprism_core.personalization import check_personalization
from mrprism_core.protocol import (
    BASE_VERSION_KEY,
    CONTROL_KEY,
    KEEP_EVALUATION_KEY,
    KEPT_EVALUATION_KEY,
    RoundInstructions,
    SiteReply,
)
from mrprism_core.update_codec import (
    UPDATE_KEY,
    UPDATE_SCALE_KEY,
    check_update_precision,
    decode_update,
    is_encoded,
)

from .config import RunConfig
from .downloads import WeightDownloads, check_download_precision
from .grid import PendingReplies, readdressed, wait_for_replies
from .strategies import restore_server_optimizer_state, server_optimizer_state, weight_key

__all__ = [
    "GLOBAL_CHECKPOINT",
    "RunFiles",
    "evaluation_in_training",
    "initial_arrays",
    "log_site_privacy",
    "round_instructions",
    "run_federation",
    "user_level_privacy",
]

log = logging.getLogger("flwr.mrprism")  # shown through Flower's log handler

GLOBAL_CHECKPOINT = "global_model.pt"
METRICS_LOG = "metrics.jsonl"
SUMMARY = "summary.json"


def initial_arrays(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Shared weights to start from: a freshly initialised model's, or those of
    ``initial-checkpoint`` (a centralized or an earlier federated checkpoint; refused when its
    architecture does not match). With the rater heads local (the default) the rater count
    does not change them; ``num-raters`` matters only when heads are shared."""
    spec = cfg.model_spec()
    shape = DatasetInfo(spec["in_channels"], spec["num_classes"], cfg.num_raters, image_size=32)
    torch.manual_seed(cfg.seed)
    model = build_model_for_data(spec, shape)
    shared, _ = split_state(model)
    if cfg.initial_checkpoint:
        log.info("starting from the shared weights of %s", cfg.initial_checkpoint)
        return shared_weights_from_checkpoint(cfg.initial_checkpoint, shared)
    return shared


class _SiteDirectory:
    """Which site sits behind which SuperNode id, learnt from the sites' replies, so that a
    failure is reported by site name (a site that restarts comes back under a new node id)."""

    def __init__(self) -> None:
        self.by_node: dict[int, str] = {}

    def learn(self, msg: Message) -> None:
        if "site" in msg.content.config_records:
            self.by_node[msg.metadata.src_node_id] = _site_name(msg)

    def name(self, node_id: int) -> str:
        return self.by_node.get(node_id, f"node-{node_id}")


@dataclass
class _Phase:
    """Messages of one phase, pushed; their replies are collected by :func:`_collect`."""

    sent: list[Message]
    replies: PendingReplies


def _push(grid: Grid, instructions: Iterable[Message]) -> _Phase:
    sent = list(instructions)
    return _Phase(sent, PendingReplies(grid.push_messages(sent)))  # skips empty ids


def _collect(
    grid: Grid,
    phase: _Phase,
    timeout: float,
    sites: _SiteDirectory,
    meanwhile: _Phase | None = None,
) -> tuple[list[Message], list[dict[str, str]]]:
    """Wait for a pushed phase's replies; return those without errors, and the sites that
    failed (error reply, node gone, no answer before ``timeout``), each logged: the phase goes
    on with the others. Replies to ``meanwhile`` (the next round's training, pushed before)
    that arrive in that time are pulled too, and found there by its own collection.

    The replies come back in site-name order, not in the order they arrived: the strategies
    sum the updates in the order given, and float sums in arrival order made two runs of one
    seed drift apart over the rounds."""
    dropped: list[dict[str, str]] = []
    others = [meanwhile.replies] if meanwhile is not None else []
    replies = wait_for_replies(grid, phase.replies, timeout, others)
    node_of = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in phase.sent}
    answered = set()
    ok = []
    for msg in replies:
        node = node_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        answered.add(node)
        if msg.has_error():
            _drop(dropped, sites.name(node), msg.error.reason)
        else:
            sites.learn(msg)
            ok.append((sites.name(node), node, msg))
    for node in sorted(set(node_of.values()) - answered):
        _drop(dropped, sites.name(node), f"no reply within round-timeout={timeout:g} s")
    return [msg for _, _, msg in sorted(ok, key=lambda item: item[:2])], dropped


def _pipelines(cfg: RunConfig, grid: Grid) -> bool:
    """Send round r+1's training together with round r's evaluation? Only in deployment: a
    SuperNode takes its messages one at a time, oldest first, so it finds the second waiting
    instead of sleeping Flower's 3 s (and with ``evaluate-in-training`` the training, sent
    first, evaluates for the evaluation, :func:`evaluation_in_training`). Flower's simulation
    engine may run two messages for one node at once, so never there."""
    from flwr.superlink.grid import InMemoryGrid

    return cfg.pipeline_rounds and not isinstance(grid, InMemoryGrid)


def _with_config(msg: Message, flag: str, *, weights: bool = True) -> Message:
    """``msg`` to the same node with ``flag`` set in its config (a copy: a strategy gives all
    its messages one record), without its arrays when not ``weights``."""
    content = {name: record for name, record in msg.content.items() if weights or name == "config"}
    content["config"] = ConfigRecord({**msg.content["config"], flag: True})
    return readdressed(msg, content)


def evaluation_in_training(
    training: list[Message], evaluation: list[Message]
) -> tuple[list[Message], list[Message]]:
    """Pipelined rounds: round r+1's ``training`` carries the weights round r's
    ``evaluation`` would. A site that gets both evaluates them in its training message, before
    it trains (with round r's rater heads), and keeps the result; its evaluation message then
    carries no weights and asks for that result (``client/kept_evaluation.py``). A site
    sampled for the evaluation only gets the weights as before. The training must be pushed
    first: a SuperNode takes its messages oldest first."""
    trained = {msg.metadata.dst_node_id for msg in training}
    evaluated = {msg.metadata.dst_node_id for msg in evaluation}
    return (
        [
            _with_config(msg, KEEP_EVALUATION_KEY) if msg.metadata.dst_node_id in evaluated else msg
            for msg in training
        ],
        [
            _with_config(msg, KEPT_EVALUATION_KEY, weights=False)
            if msg.metadata.dst_node_id in trained
            else msg
            for msg in evaluation
        ],
    )


def _drop(dropped: list[dict[str, str]], site: str, reason: str) -> None:
    dropped.append({"site": site, "reason": reason})
    log.warning("leaving %s out of this phase: %s", site, reason)


def _usable_updates(
    replies: Iterable[Message], reference: ArrayRecord, dropped: list[dict[str, str]]
) -> list[Message]:
    """Train replies whose arrays pass :func:`update_problem` (finite, right keys/shapes)."""
    ref = {k: v.numpy() for k, v in reference.items()}
    kept = []
    for msg in replies:
        records = list(msg.content.array_records.values())
        problem = (
            "no weights in the reply"
            if len(records) != 1
            else update_problem({k: v.numpy() for k, v in records[0].items()}, ref)
        )
        if problem:
            _drop(dropped, _site_name(msg), f"update rejected: {problem}")
            continue
        kept.append(msg)
    return kept


def _with_full_weights(
    replies: Iterable[Message], reference: np.ndarray, dropped: list[dict[str, str]]
) -> list[Message]:
    """Training replies that carry the float16 change of the weights (``update-precision``)
    get their float32 weights back, the change added to the weights the training messages
    carried (``reference``: :attr:`WeightDownloads.sent`); the strategy and every check after
    it then see weights, whatever the site sent. A change that does not decode leaves that
    site out, with the reason."""
    kept = []
    for msg in replies:
        records = msg.content.array_records
        if len(records) != 1 or not is_encoded(next(iter(records.values()))):
            kept.append(msg)  # the weights themselves (or nothing: _usable_updates says so)
            continue
        name, record = next(iter(records.items()))
        encoded = {k: record[k].numpy() for k in (UPDATE_KEY, UPDATE_SCALE_KEY) if k in record}
        try:
            weights = decode_update(encoded, reference)
        except ValueError as err:
            _drop(dropped, _site_name(msg), f"update rejected: {err}")
            continue
        others = {k: v for k, v in record.items() if k not in (UPDATE_KEY, UPDATE_SCALE_KEY)}
        msg.content[name] = ArrayRecord({PACKED_KEY: Array(weights), **others})
        kept.append(msg)
    return kept


def _downloads(training: Iterable[Message]) -> dict[int, str]:
    """What each training message brought its node: ``float16-change`` or ``float32``."""
    return {
        msg.metadata.dst_node_id: "float16-change"
        if BASE_VERSION_KEY in msg.content["config"]
        else "float32"
        for msg in training
    }


def _sent_arrays(replies: Iterable[Message]) -> dict[str, dict[str, list[int]]]:
    """What each site's reply carried, by site: array names and shapes (for the audit)."""
    sent = {}
    for msg in replies:
        for record in msg.content.array_records.values():
            sent[_site_name(msg)] = {k: list(v.shape) for k, v in record.items()}
    return sent


def _metric_record(msg: Message) -> MetricRecord:
    """A reply's (only) MetricRecord: the one Flower's strategies read weights from."""
    return next(iter(msg.content.metric_records.values()))


def weigh_updates(updates: list[Message], mode: str) -> dict[str, dict[str, Any]]:
    """Write each update's ``aggregation-weight`` under ``mode`` (examples, quality or
    examples*quality; :func:`~mrprism_core.federated.aggregation_weights`), which the strategy
    then weights by; return, per site, the quality score used and its share of the weight."""
    records = [_metric_record(msg) for msg in updates]
    examples = [int(record["num-examples"]) for record in records]
    claimed = [record.get(QUALITY_KEY) for record in records]
    weights, used = aggregation_weights(
        examples, [None if q is None else float(q) for q in claimed], mode
    )
    total = sum(weights) or 1.0
    shares = {}
    for msg, record, weight, quality, sent in zip(updates, records, weights, used, claimed):
        record[WEIGHT_KEY] = float(weight)
        shares[_site_name(msg)] = {
            "quality": quality,
            "quality-shared": sent is not None,
            "weight-share": weight / total,
        }
    return shares


def weigh_by_examples(replies: list[Message]) -> None:
    """Evaluation replies are averaged by their test cases even when training updates are
    weighted by quality (the strategy reads one weighting key for both)."""
    for msg in replies:
        record = _metric_record(msg)
        record[WEIGHT_KEY] = float(record["num-examples"])


def round_instructions(cfg: RunConfig, layout: StateLayout) -> RoundInstructions:
    """What every site needs to build the run's model and train or evaluate a round."""
    return RoundInstructions(
        model_spec=cfg.model_spec(),
        layout=layout.fingerprint,
        lr=cfg.site_lr(),
        lr_schedule=check_lr_schedule(cfg.lr_schedule, "run-config lr-schedule"),
        drift_correction=check_drift_correction(
            cfg.drift_correction,
            "run-config drift-correction",
            strategy=cfg.strategy,
            dp_mode=cfg.dp_mode,
        ),
        seed=cfg.seed,
        num_server_rounds=cfg.num_server_rounds,
        persist_optimizer=cfg.persist_optimizer,
        personalization=check_personalization(cfg.personalization),
        ditto_lambda=cfg.ditto_lambda,
        local_epochs=cfg.local_epochs,
        eval_split=cfg.eval_split,
        select_split=cfg.select_split,
        # a site sends float32 anyway where Flower's clipping mod runs (client/rounds.py)
        update_precision=check_update_precision(
            cfg.update_precision, "run-config update-precision"
        ),
    )


def log_site_privacy(rows: dict[str, dict[str, Any]]) -> None:
    """Every site's spent DP-SGD epsilon, as the site reported it."""
    for site, row in rows.items():
        if "dp-epsilon" in row:
            log.info(
                "%s: DP-SGD epsilon %.3f spent so far (delta %g, noise multiplier %.3f)",
                site,
                row["dp-epsilon"],
                row["dp-delta"],
                row["dp-noise-multiplier"],
            )


def user_level_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float
) -> float:
    """Epsilon of site-level DP-FedAvg with fixed clipping after ``rounds`` rounds, each
    sampling sites at ``sample_rate`` and adding Gaussian noise of std ``noise_multiplier x
    clipping norm`` to the sum: Opacus' RDP accountant on those steps."""
    from opacus.accountants import RDPAccountant

    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, min(1.0, sample_rate), rounds)]
    return float(accountant.get_epsilon(delta))


def user_level_privacy(cfg: RunConfig, server_round: int) -> dict[str, Any]:
    """The user-level (site-level) DP guarantee of Flower's DP strategy after this round."""
    if cfg.dp_mode == "none":
        return {}
    report: dict[str, Any] = {"mode": cfg.dp_mode, "delta": cfg.dp_delta}
    if cfg.dp_mode.endswith("fixed"):
        # every round samples fraction-train of the sites; the noise is on their sum
        report["epsilon"] = user_level_epsilon(
            cfg.dp_noise_multiplier, cfg.fraction_train, server_round, cfg.dp_delta
        )
    else:
        report["epsilon"] = None  # adaptive clipping: no accountant here, none claimed
    return report


def _site_name(msg: Message) -> str:
    if "site" in msg.content.config_records:
        return str(msg.content.config_records["site"].get("name", msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


def _site_rows(
    replies: Iterable[Message], sent_arrays: dict[str, dict[str, list[int]]] | None = None
) -> dict[str, dict[str, Any]]:
    """Each site's reply (:class:`SiteReply`) as one flat row, by site name; with
    ``sent_arrays`` (training) also the names and shapes of the arrays it sent, for audit."""
    sent_arrays = sent_arrays or {}
    rows = {}
    for msg in replies:
        site = msg.content.config_records.get("site")
        metrics = msg.content.metric_records.get("metrics", {})
        if site is None:  # not one of our sites' replies: keep what there is
            rows[_site_name(msg)] = dict(metrics)
            continue
        reply = SiteReply.from_records(metrics, site)
        row: dict[str, Any] = {**reply.to_metrics(), **reply.to_site()}
        if _site_name(msg) in sent_arrays:
            row["reply-arrays"] = sent_arrays[_site_name(msg)]
        rows[reply.site] = row
    return rows


class RunFiles:
    """The run's checkpoint, metrics log and summary under ``out_dir``."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        self.checkpoint = self.root / GLOBAL_CHECKPOINT
        self.metrics = self.root / METRICS_LOG
        # SCAFFOLD: the name of the server's control variate (kept across resumes) and the
        # weight of each site's control variate in it; set by start()
        self.control_ledger = ""
        self.control_weights: dict[str, float] = {}
        self._writer: ThreadPoolExecutor | None = None  # save_round(behind=True)
        self._pending: Future[None] | None = None

    def start(
        self, cfg: RunConfig, strategy: Strategy | None = None
    ) -> tuple[StateLayout, int, ArrayRecord, list[dict]]:
        """The shared-weight layout, the rounds already done, the global weights to start
        from (the checkpoint's when resuming, else freshly initialised) and the log so far.
        When resuming, ``strategy`` gets its server-optimizer moments back, and SCAFFOLD's
        ledger (:attr:`control_ledger`, :attr:`control_weights`) is the checkpoint's."""
        initial = initial_arrays(cfg)
        layout = StateLayout.of(initial)
        self.control_ledger, self.control_weights = secrets.token_hex(8), {}
        if not (cfg.resume and self.checkpoint.exists()):
            packed = layout.pack(initial)
            return layout, 0, _global_arrays(cfg, packed, torch.zeros_like(packed)), []
        payload = load_checkpoint(self.checkpoint)
        if payload["model_spec"] != cfg.model_spec():
            raise ValueError(
                f"{self.checkpoint} was written for model {payload['model_spec']}, this run asks "
                f"for {cfg.model_spec()}; use another out-dir or set resume=false"
            )
        done = int(payload["round"])
        history = [r for r in self.history() if int(r["round"]) <= done]
        log.info("resuming from %s after round %d", self.checkpoint, done)
        if strategy is not None:
            restore_server_optimizer_state(strategy, payload.get("server_optimizer", {}))
        packed = layout.pack(payload["shared_state"])
        control = payload.get("control_variate")
        if control is None or control.shape != packed.shape:  # resumed with SCAFFOLD newly on
            control = torch.zeros_like(packed)
        elif "control_ledger" in payload:  # (a checkpoint of an earlier version has none)
            self.control_ledger = payload["control_ledger"]
            self.control_weights = dict(payload["control_weights"])
        return layout, done, _global_arrays(cfg, packed, control), history

    def write_summary(self, cfg: RunConfig, **fields: Any) -> dict:
        """``summary.json``: the run config, where the checkpoint is, and ``fields``."""
        self.flush()
        summary = {
            "rounds": cfg.num_server_rounds,
            "run_config": cfg.as_run_config(),
            **fields,
            "checkpoint": str(self.checkpoint),
        }
        atomic_write_json(self.root / SUMMARY, summary)
        return summary

    def history(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def save_round(
        self,
        cfg: RunConfig,
        layout: StateLayout,
        arrays: ArrayRecord,
        server_round: int,
        run_id: int,
        history: list,
        server_optimizer: dict[str, Any] | None = None,
        *,
        behind: bool = False,
    ) -> None:
        """Write the metrics log and the global checkpoint after ``server_round``; with
        ``behind``, from a background thread (what it writes is taken now), so that the paper
        preset's 0.6 s of hashing and fsync does not hold up the next round's messages. Each file
        is still replaced atomically; the next save, :meth:`flush` and :meth:`write_summary`
        wait for it."""
        # the log first: a crash between the two leaves a log one round ahead, which resume
        # trims back to the checkpoint's round
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode()
        tensors = arrays.to_torch_state_dict()  # fresh tensors: nothing else changes them
        payload = {
            "shared_state": layout.unpack(tensors[PACKED_KEY]),
            "round": server_round,
            "run_id": run_id,
            "model_spec": cfg.model_spec(),
            "run_config": cfg.as_run_config(),
            "server_optimizer": server_optimizer or {},  # the strategies replace, not update, it
        }
        if CONTROL_KEY in tensors:  # SCAFFOLD's server control variate, for a resume
            payload["control_variate"] = tensors[CONTROL_KEY]
            payload["control_ledger"] = self.control_ledger
            payload["control_weights"] = dict(self.control_weights)
        self.flush()
        if not behind:
            self._write_round(lines, payload)
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, "run-files-writer")
        self._pending = self._writer.submit(self._write_round, lines, payload)

    def _write_round(self, lines: bytes, payload: dict[str, Any]) -> None:
        atomic_write_bytes(self.metrics, lines)
        save_checkpoint(self.checkpoint, payload)

    def flush(self) -> None:
        """Wait for a round saved behind; its error (a full disk) is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _global_arrays(cfg: RunConfig, packed: torch.Tensor, control: torch.Tensor) -> ArrayRecord:
    """What the server sends to train: the packed shared weights and, with SCAFFOLD, its
    control variate beside them (the sites reply with the change of theirs in the same record,
    which the strategy averages like the weights)."""
    if cfg.drift_correction == "none":
        return ArrayRecord({PACKED_KEY: packed})
    return ArrayRecord({PACKED_KEY: packed, CONTROL_KEY: control})


def _fold_control_changes(
    before: ArrayRecord,
    aggregated: ArrayRecord,
    updates: list[Message],
    cfg: RunConfig,
    files: RunFiles,
) -> ArrayRecord:
    """SCAFFOLD's server step: the strategy averaged the sites' control-variate changes like
    their weights; fold that mean into the control variate sent before
    (:func:`~mrprism_core.drift_correction.updated_server_control`), so that the sites that did
    not train this round keep their share of it."""
    key = weight_key(cfg)
    replied = {_site_name(msg): float(_metric_record(msg)[key]) for msg in updates}
    new = aggregated.to_torch_state_dict()
    sent = ArrayRecord({CONTROL_KEY: before[CONTROL_KEY]}).to_torch_state_dict()[CONTROL_KEY]
    control, files.control_weights = updated_server_control(
        sent, files.control_weights, replied, new[CONTROL_KEY]
    )
    return ArrayRecord({PACKED_KEY: new[PACKED_KEY], CONTROL_KEY: control})


def _weights_only(arrays: ArrayRecord) -> ArrayRecord:
    """The global record without SCAFFOLD's control variate: what an evaluation needs."""
    if CONTROL_KEY not in arrays:
        return arrays
    return ArrayRecord({PACKED_KEY: arrays[PACKED_KEY]})


def run_federation(
    grid: Grid,
    strategy: Strategy,
    cfg: RunConfig,
    run_id: int = 0,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict:
    """Run (or resume) ``cfg.num_server_rounds`` rounds; returns the summary it writes.

    ``on_round`` receives each round's record once it is complete, its files being written
    behind it (progress bars, tests).
    """
    files = RunFiles(cfg.out_dir)
    layout, done, arrays, history = files.start(cfg, strategy)
    # the same every round but for its number
    standing = replace(round_instructions(cfg, layout), control_ledger=files.control_ledger)
    sites = _SiteDirectory()
    precision = check_download_precision(cfg.download_precision, "run-config download-precision")
    # Flower's client-side clipping clips against the float32 weights in the message
    downloads = WeightDownloads(precision == "float16" and cfg.dp_mode != "client-fixed")

    def training(server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> list[Message]:
        """The strategy's training messages, with the weights as :class:`WeightDownloads`
        sends them (their float16 change to the sites that hold the previous ones)."""
        downloads.advance(server_round, arrays[PACKED_KEY].numpy())
        return downloads.messages(strategy.configure_train(server_round, arrays, config, grid))

    pipelined = _pipelines(cfg, grid)
    next_train: _Phase | None = None  # round r+1's training, pushed with round r's evaluation
    started = time.time()
    for server_round in range(done + 1, cfg.num_server_rounds + 1):
        log.info("round %d/%d", server_round, cfg.num_server_rounds)
        instructions = replace(standing, server_round=server_round)
        config = ConfigRecord(instructions.to_config())
        if next_train is None:
            next_train = _push(grid, training(server_round, arrays, config))
        replies, dropped = _collect(grid, next_train, cfg.round_timeout, sites)
        sent_to = [msg.metadata.dst_node_id for msg in next_train.sent]
        downloaded = {sites.name(node): kind for node, kind in _downloads(next_train.sent).items()}
        downloads.learn(sent_to, replies)
        next_train = None
        sent_arrays = _sent_arrays(replies)
        replies = _with_full_weights(replies, downloads.sent, dropped)
        updates = _usable_updates(replies, arrays, dropped)
        aggregated = len(updates) >= cfg.min_train_replies
        train_metrics = None
        weighting: dict[str, dict[str, Any]] = {}
        if updates and cfg.aggregation_weight != "examples":
            weighting = weigh_updates(updates, cfg.aggregation_weight)
            log.info("round %d: aggregation weights %s", server_round, weighting)
        if aggregated:
            new_arrays, train_metrics = strategy.aggregate_train(server_round, updates)
            aggregated = new_arrays is not None
            if new_arrays is not None and CONTROL_KEY in new_arrays:
                new_arrays = _fold_control_changes(arrays, new_arrays, updates, cfg, files)
            arrays = new_arrays if new_arrays is not None else arrays
        if not aggregated:
            log.warning(
                "round %d: %d usable update(s), fewer than min-train-replies=%d; the global "
                "model is unchanged",
                server_round,
                len(updates),
                cfg.min_train_replies,
            )
        train_rows = _site_rows(updates, sent_arrays)
        for name, row in train_rows.items():
            if row.get("skipped-steps"):
                log.warning(
                    "%s skipped %d optimizer step(s) with a non-finite loss",
                    name,
                    int(row["skipped-steps"]),
                )

        to_evaluate = list(
            strategy.configure_evaluate(server_round, _weights_only(arrays), config, grid)
        )
        to_train: list[Message] | None = None  # round r+1's, sent now when pipelined
        if pipelined and server_round < cfg.num_server_rounds:
            # the next round starts from the weights just sent for evaluation, so it can go now
            upcoming = ConfigRecord(replace(standing, server_round=server_round + 1).to_config())
            to_train = training(server_round + 1, arrays, upcoming)
        eval_timeout = cfg.round_timeout
        if to_train is not None and cfg.evaluate_in_training:
            to_train, to_evaluate = evaluation_in_training(to_train, to_evaluate)
            next_train = _push(grid, to_train)  # first: a SuperNode takes the oldest first
            eval_timeout = 2 * cfg.round_timeout  # the evaluations wait behind that training
        evaluation = _push(grid, to_evaluate)
        if to_train is not None and next_train is None:  # evaluation r, then training r+1
            next_train = _push(grid, to_train)
        # the next round's training replies come first: pull them while waiting for these
        eval_replies, eval_dropped = _collect(grid, evaluation, eval_timeout, sites, next_train)
        if cfg.aggregation_weight != "examples":
            weigh_by_examples(eval_replies)
        eval_metrics = strategy.aggregate_evaluate(server_round, eval_replies)
        record = {
            "round": server_round,
            "run_id": run_id,
            "seconds": round(time.time() - started, 3),  # since the previous round's record
            "aggregated": aggregated,
            "lr": instructions.round_lr(),  # the sites' learning rate this round
            "user_level_dp": user_level_privacy(cfg, server_round),
            "train": dict(train_metrics or MetricRecord()),
            "evaluate": dict(eval_metrics or MetricRecord()),
            "train_sites": train_rows,
            "train_downloads": downloaded,  # per site: float32 weights or their float16 change
            "evaluate_sites": _site_rows(eval_replies),
            "dropped": dropped,
            "evaluate_dropped": eval_dropped,
        }
        if weighting:
            record["aggregation_weights"] = weighting
        for name, row in record["evaluate_sites"].items():
            if int(row.get("heads-from-round", 0)) > server_round:  # pipelined out of order
                log.warning("%s evaluated round %d with later rater heads", name, server_round)
        log_site_privacy(record["train_sites"])
        history.append(record)
        files.save_round(
            cfg,
            layout,
            arrays,
            server_round,
            run_id,
            history,
            server_optimizer_state(strategy),
            behind=True,
        )
        log.info("round %d done: %s", server_round, record["evaluate"])
        started = time.time()
        if on_round is not None:
            on_round(record)

    return files.write_summary(
        cfg,
        final_evaluate=history[-1]["evaluate"] if history else None,
        final_sites=history[-1]["evaluate_sites"] if history else None,
    )
