"""The methods of the experiment grid, all on the same virtual sites and the same training code:

federated         the ServerApp and ClientApp in Flower's simulation engine; rater heads local
                  (FedPer)
federated_fedrep  the same, each round training the heads first (body frozen), then the body
federated_fedbabu the same, rounds training the body only; each site fine-tunes its heads at the
                  end (``SiteRuntime.adapt``) and scores its final model itself
federated_ditto   the same, plus a personal model per site pulled toward the global one; the
                  site scores its personal model
federated_dp_epsE the same with DP-SGD at every site (Opacus), each site's total budget epsilon
                  E (delta 1e-5) over the run, e.g. federated_dp_eps8
federated_secagg  the same under SecAgg+ (the server sees only the sum of the updates); scored
                  once at the end, from the global checkpoint and each site's own heads
federated_shared  the same, but every site has the largest site's number of rater slots and
                  *everything* is aggregated (head m of every site averaged): no personalisation
federated_quality the same, every site sending its annotation-quality score (``share_quality``)
                  and the server weighting updates by it (``federation.quality_weight``:
                  examples*quality or quality)
federated_without_SITE  the same without site SITE in the rounds; SITE then fits only its own
                  rater heads to the final global model (``SiteRuntime.adapt``) and is scored
local             each site alone, same epochs, same ``SiteRuntime.train`` as the ClientApp
centralized       all sites' training cases pooled into one model; each site's raters get their
                  own rater slots, so no rater is mixed with another

Each of these trains MrPrism; ``<model>:<method>`` trains another registered model the same way,
e.g. ``unet_staple:federated``, ``multihead_unet:local``, ``dpersona:centralized`` (models:
``mrprism_core.models.MODEL_NAMES``; their per-rater parts stay at the sites when federated).

Every method is scored on each site's test split after every round (one round = ``local_epochs``
passes over the site's data), with the same ``evaluate``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import ConcatDataset, DataLoader

from client.site import SiteRuntime
from client.state import SiteStore
from mrprism_core.data.factory import EmptySplitError, build_dataset, dataset_info
from mrprism_core.drift_correction import check_drift_correction
from mrprism_core.federated import SELECT_KEY, recurrences_from_details
from mrprism_core.local_training import run_epochs
from mrprism_core.lr_schedule import scheduled_lr, set_lr
from mrprism_core.metrics import recurrence_table
from mrprism_core.models import MODEL_NAMES, build_model_for_data, check_model_options
from mrprism_core.tracking import Tracker, open_tracker, round_scalars
from mrprism_core.train import evaluate, make_loader, resolve_device

from .partition import VirtualSite

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "Experiment",
    "check_methods",
    "check_ray_address",
    "evaluate_at_sites",
    "parse_method",
    "require_ray_token",
    "run_method",
    "write_site_dirs",
]

METHODS = (
    "federated",
    "federated_shared",
    "local",
    "centralized",
    "federated_secagg",
    "federated_fedrep",
    "federated_fedbabu",
    "federated_ditto",
    "federated_quality",
)
#: federated_<personalization> methods (plain ``federated`` is FedPer)
PERSONALIZED = {f"federated_{name}": name for name in ("fedrep", "fedbabu", "ditto")}
DP_METHOD = re.compile(r"federated_dp_eps(\d+(?:\.\d+)?)")  # federated_dp_eps<epsilon>
DP_DELTA = 1e-5
WITHOUT_METHOD = re.compile(r"federated_without_(.+)")  # federated_without_<site>


def parse_method(name: str) -> tuple[str, str]:
    """``"dpersona:local"`` -> ``("dpersona", "local")``; a plain method trains MrPrism."""
    model, _, method = name.rpartition(":")
    return model or "mrprism", method


def check_simulated_drift_correction(federation: Mapping[str, Any], methods: Sequence[str]) -> str:
    """``federation.drift_correction``, refused (naming the key) when the strategy or a
    method of the grid cannot run with it."""
    name = str(federation.get("drift_correction", "none"))
    kinds = [parse_method(method)[1] for method in methods]
    strategy = str(federation.get("strategy", "fedavg"))
    check_drift_correction(name, "federation.drift_correction", strategy=strategy)
    if name != "none" and any(DP_METHOD.fullmatch(kind) for kind in kinds):
        raise ValueError(
            f"federation.drift_correction={name} cannot run beside a federated_dp_eps method: "
            "it would send each DP-SGD site's mean gradient, which DP-SGD does not protect"
        )
    return name


def check_methods(
    names: list[str], preset: str = "tiny", model_options: Mapping[str, Any] | None = None
) -> None:
    """Raise naming the unknown methods or models, or an option of ``model_options`` that one
    of the methods' models cannot take (before the first method trains, not when its turn
    comes)."""
    unknown = []
    for name in names:
        model, method = parse_method(name)
        patterned = DP_METHOD.fullmatch(method) or WITHOUT_METHOD.fullmatch(method)
        if model not in MODEL_NAMES or (method not in METHODS and not patterned):
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; choose from {list(METHODS)}, federated_dp_eps<E> "
            "or federated_without_<site>, "
            f"optionally as <model>:<method> with a model of {list(MODEL_NAMES)}"
        )
    for model in dict.fromkeys(parse_method(name)[0] for name in names):
        try:
            check_model_options(model, preset, model_options or {})
        except ValueError as err:
            raise ValueError(
                f"federation.model_options {dict(model_options or {})} apply to every method: "
                f"{err} (run the models that cannot take them in a separate simulation)"
            ) from None


@dataclass
class Experiment:
    """Settings every method shares (read from the simulation config)."""

    sites: list[VirtualSite]
    work_dir: Path
    model: str = "mrprism"
    rounds: int = 3
    local_epochs: int = 1
    strategy: str = "fedavg"
    server_momentum: float = 0.9
    server_lr: float = 0.01
    lr: float = 1e-3
    lr_schedule: str = "constant"  # the rate over the rounds (mrprism_core.lr_schedule)
    drift_correction: str = "none"  # federated methods: none or scaffold
    update_precision: str = "float16"  # federated training replies (mrprism_core.update_codec)
    persist_optimizer: bool = True
    preset: str = "tiny"
    model_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 8
    augment: bool = False  # random flips and quarter turns of the training cases, every method
    test_mirroring: bool = False  # test splits scored over 4 mirrorings per case, every method
    device: str = "auto"
    eval_split: str = "test"
    select_split: str = ""  # choose each method's reported round by this split ("" = the last)
    ray_num_cpus: int | None = None
    ray_address: str | None = None  # join this Ray cluster ("auto", "HOST:6379")
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0
    quality_weight: str = "examples*quality"  # federated_quality's aggregation-weight
    tracking: str = "none"  # none, tensorboard or mlflow: per-round scalars of every method
    tracking_dir: Path | None = None  # where; default: beside work_dir
    on_progress: Callable[[str], None] | None = None

    def spec(self, info: Any) -> dict[str, Any]:
        return {
            "name": self.model,
            "preset": self.preset,
            "in_channels": info.in_channels,
            "num_classes": info.num_classes,
            "options": dict(self.model_options),
        }

    def tracker(self, method: str) -> Tracker:
        """The method's run in ``<out_dir>/tensorboard/<method>`` (or a no-op tracker)."""
        return open_tracker(self.tracking, self.tracking_dir or self.work_dir.parent, method)

    def round_lr(self, server_round: int) -> float:
        """The learning rate of a round (a centralized round: its epochs), as the federated
        sites compute it from their round instructions."""
        return scheduled_lr(self.lr, server_round, self.rounds, self.lr_schedule)

    def tick(self, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(text)


def ray_init_args(exp: Experiment) -> dict[str, Any]:
    """``ray.init`` arguments: join ``exp.ray_address`` (the cluster's resources count, so no
    CPU count is passed) or start a local Ray with ``exp.ray_num_cpus`` (all by default).

    The local case names ``address="local"``: without it ``ray.init`` joins whatever cluster
    ``/tmp/ray/ray_current_cluster`` (or ``RAY_ADDRESS``) names, and waits forever when that
    cluster has gone without a ``ray stop``."""
    if exp.ray_address:
        return {"address": exp.ray_address}
    return {"address": "local", "num_cpus": exp.ray_num_cpus or max(1, torch.get_num_threads())}


#: Ray's switch for token authentication of every call to its services, and the token.
RAY_AUTH_MODE_ENV, RAY_AUTH_TOKEN_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"


def require_ray_token(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Make every Ray this process starts require a random token; True when set here.

    Ray's services (GCS, raylets, workers; Ray 2.55) listen on every network interface of the
    machine while a simulation runs, and anyone who reaches them could run code as this user.
    With ``RAY_AUTH_MODE=token`` and a token in the environment, which Ray's processes inherit,
    they refuse a caller without it (``tests/simulation/test_ray_cluster.py``). Ray reads the
    mode once, when it is imported, so this must come first, and it stays for the process's
    life. Left alone: a mode the user set, and a process that imported Ray already (a warning
    says so). Not for a cluster the simulation joins: that cluster has its own settings."""
    if RAY_AUTH_MODE_ENV in environ:
        return False
    if "ray" in sys.modules:
        log.warning(
            "Ray was imported before the simulation could turn on its token authentication: "
            "its services take calls from anyone who can reach this machine's ports"
        )
        return False
    environ[RAY_AUTH_MODE_ENV] = "token"
    environ[RAY_AUTH_TOKEN_ENV] = secrets.token_hex(32)
    return True


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Refuse a ``federation.ray_address`` no Ray cluster answers at, before anything runs:
    ``ray.init`` would wait for it forever and not even stop on SIGTERM.

    ``auto`` resolves as Ray does: ``RAY_ADDRESS``, else the cluster this machine last
    started (``ray/ray_current_cluster`` under ``$RAY_TMPDIR``, default ``/tmp``). ``None``
    and ``local`` (start a Ray here) are not checked."""
    if not address or address == "local":
        return
    target = address
    if address == "auto":
        marker = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        target = os.environ.get("RAY_ADDRESS") or (
            marker.read_text().strip() if marker.is_file() else ""
        )
        if not target:
            raise ValueError(
                "federation.ray_address=auto: no Ray cluster on this machine (no RAY_ADDRESS, "
                f"no {marker}); start one with `ray start --head` or leave ray_address null"
            )
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"federation.ray_address={address}: expected HOST:PORT, e.g. HEAD_IP:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ValueError(
            f"federation.ray_address={address}: no Ray cluster answers at {host}:{port} "
            f"({err.strerror or err}); is `ray start --head --port={port}` running there?"
        ) from err


def split_cases(site: VirtualSite, split: str) -> int:
    """How many cases the site's ``split`` holds (0 when its config gives it none)."""
    try:
        return len(build_dataset(site.data, split))
    except EmptySplitError:
        return 0


#: ``federation.select``: the round a method's scores are reported from.
SELECTIONS = {"last": "", "best_val": "val"}


def selection_split(select: str, sites: Sequence[VirtualSite]) -> str:
    """The split rounds are chosen by for ``federation.select`` ("" = the last round); raises
    naming the sites without validation cases when ``best_val`` needs them."""
    if select not in SELECTIONS:
        raise ValueError(f"federation.select={select!r} is refused: choose from {list(SELECTIONS)}")
    split = SELECTIONS[select]
    if split:
        empty = [site.name for site in sites if not split_cases(site, split)]
        if empty:
            raise ValueError(
                f"federation.select={select} chooses each method's round by the sites' "
                f"{split} split, but {empty} have no {split} cases (data.splits.{split}=0); "
                f"give them some (preset=best_val does) or use federation.select=last"
            )
    return split


class RoundChoice:
    """The round whose scores a method reports: the last one, or the one with the best mean
    soft Dice on the selection split (a later round wins only when strictly better)."""

    def __init__(self, by_split: str) -> None:
        self.by_split = by_split
        self.best: float | None = None
        self.round = 0
        self.scores: list[float] = []  # the selection score of every round

    def offer(self, server_round: int, score: float | None) -> bool:
        """Record round ``server_round``; True when it is now the one to report. A round
        without a selection score (no site answered the evaluation) cannot be chosen."""
        if not self.by_split:
            self.round = server_round
            return True
        if score is None:
            return False
        self.scores.append(score)
        if self.best is None or score > self.best:
            self.best, self.round = score, server_round
            return True
        return False

    def report(self) -> dict[str, Any]:
        return {
            "by": f"best {self.by_split} soft Dice" if self.by_split else "last round",
            "round": self.round,
            "scores": self.scores,
        }


def _row(result: Mapping[str, Any], slots: slice | None = None) -> dict[str, Any]:
    """A report row from :func:`~mrprism_core.train.evaluate` output."""
    per_rater = result.get("per_rater_dice") or []
    if slots is not None:
        per_rater = per_rater[slots]
    return {
        "soft_dice": float(result["soft_dice"]),
        "per_rater_dice": [float(x) for x in per_rater if x is not None],
        "dice_vs_truth": result.get("dice_vs_truth"),
        "ged": result.get("ged"),
        "ece": result.get("ece"),
        "recurrences": recurrence_table(result),
    }


def _site_config(
    exp: Experiment,
    site: VirtualSite,
    state_dir: Path,
    data: Mapping,
    privacy: Mapping,
    share_quality: bool = False,
) -> dict:
    # every method steps with the experiment's batch size and augmentation, and scores its test
    # split alike, whatever the site config says
    train = {
        **dict(site.settings.get("train", {})),
        "batch_size": exp.batch_size,
        "augment": exp.augment,
        "test_mirroring": exp.test_mirroring,
    }
    train.setdefault("num_workers", 0)
    return {
        "site": site.name,
        "state_dir": str(state_dir),
        "device": exp.device,
        "seed": site.seed,
        "train": train,
        "data": dict(data),
        "privacy": dict(privacy),
        "share_quality": share_quality,
    }


def write_site_dirs(
    exp: Experiment,
    method: str,
    data_of=lambda s: s.data,
    privacy: Mapping | None = None,
    share_quality: bool = False,
) -> list[Path]:
    """One state directory per site under ``<work_dir>/<method>/sites/``, with its config."""
    dirs = []
    for site in exp.sites:
        state_dir = exp.work_dir / method / "sites" / site.name
        cfg = _site_config(exp, site, state_dir, data_of(site), privacy or {}, share_quality)
        SiteStore(state_dir).write_config(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        dirs.append(state_dir)
    return dirs


def _site_infos(exp: Experiment) -> dict[str, Any]:
    return {s.name: dataset_info(build_dataset(s.data, "train")) for s in exp.sites}


def _run_federated(
    exp: Experiment,
    method: str,
    shared_everything: bool = False,
    privacy: Mapping[str, Any] | None = None,
    secure: bool = False,
    personalization: str = "fedper",
    quality_weighted: bool = False,
    without: str | None = None,
) -> dict[str, Any]:
    if not exp.ray_address:  # a Ray of our own: before anything imports Ray
        require_ray_token()
    from flwr.simulation import run_simulation

    from client.app import create_client_app
    from server.app import create_server_app

    from .ray_backend import drain_before_shutdown

    drain_before_shutdown()  # Ctrl-C: Ray is shut down once no site's message is in flight

    train_sets = {site.name: build_dataset(site.data, "train") for site in exp.sites}
    infos = {name: dataset_info(dataset) for name, dataset in train_sets.items()}
    first = next(iter(infos.values()))
    most = max(info.num_raters for info in infos.values())
    options: dict[str, Any] = {}
    data_of = lambda s: s.data  # noqa: E731
    if shared_everything:
        options = {"local_modules": [], "local_norms": False}
        data_of = lambda s: {**s.data, "rater_slots": {"total": most, "offset": 0}}  # noqa: E731
    dirs = write_site_dirs(exp, method, data_of, privacy, share_quality=quality_weighted)
    out_dir = exp.work_dir / method / "server"
    names = [site.name for site in exp.sites]
    if without is not None and without not in names:
        raise ValueError(f"{method}: no site named {without!r} to leave out; sites: {names}")
    # the sites in the rounds (all but a left-out one)
    rounds_dirs = [d for name, d in zip(names, dirs) if name != without]
    count = len(rounds_dirs)
    if secure and count < 3:
        raise ValueError(f"{method}: SecAgg+ needs at least 3 sites, the partition has {count}")
    run_config = {
        "num-server-rounds": exp.rounds,
        "model": exp.model,
        "local-epochs": exp.local_epochs,
        "strategy": exp.strategy,
        "server-momentum": exp.server_momentum,
        "server-lr": exp.server_lr,
        "lr": exp.lr,
        "lr-schedule": exp.lr_schedule,
        "drift-correction": exp.drift_correction,
        "update-precision": exp.update_precision,
        "persist-optimizer": exp.persist_optimizer,
        "personalization": personalization,
        "seed": exp.seed,
        "preset": exp.preset,
        "model-options": json.dumps({**exp.model_options, **options}),
        "in-channels": first.in_channels,
        "num-classes": first.num_classes,
        "num-raters": most,
        "min-available-nodes": count,
        "min-train-nodes": count,
        "min-evaluate-nodes": count,
        "out-dir": str(out_dir),
        "resume": False,
        "eval-split": exp.eval_split,
        "select-split": exp.select_split,
        "secure-aggregation": secure,
        "aggregation-weight": exp.quality_weight if quality_weighted else "examples",
        # the largest site weighs in with its example count: the finest SecAgg+ quantization
        "secagg-max-weight": float(max(len(dataset) for dataset in train_sets.values())),
        # virtual sites have no site worker to train during the key exchange
        "secagg-train-ahead": False,
    }
    history: dict[str, list[float]] = {s.name: [] for s in exp.sites}
    finals: dict[str, dict[str, Any]] = {}
    spent: dict[str, dict[str, float]] = {}
    weighting: dict[str, Any] = {}
    round_seconds: list[float] = []
    choice = RoundChoice(exp.select_split)

    tracker = exp.tracker(method)

    def on_round(record: dict[str, Any]) -> None:
        tracker.scalars(int(record["round"]), round_scalars(record))
        rows = record["evaluate_sites"]
        for name, row in rows.items():
            history[name].append(float(row["soft-dice"]))
        chosen_by = [float(row[SELECT_KEY]) for row in rows.values() if SELECT_KEY in row]
        score = sum(chosen_by) / len(chosen_by) if chosen_by else None
        if rows and choice.offer(int(record["round"]), score):
            finals.update(rows)
        weighting.update(record.get("aggregation_weights", {}))  # the last round's
        round_seconds.append(float(record["seconds"]))
        for name, row in record["train_sites"].items():
            if "dp-epsilon" in row:
                spent[name] = {"epsilon": float(row["dp-epsilon"]), "delta": row["dp-delta"]}
        exp.tick(f"{method}: round {record['round']}/{exp.rounds}")

    backend = {
        "client_resources": {"num_cpus": exp.client_num_cpus, "num_gpus": exp.client_num_gpus},
        "init_args": ray_init_args(exp),
    }
    try:
        run_simulation(
            server_app=create_server_app(run_config, on_round=on_round),
            client_app=create_client_app([str(d) for d in rounds_dirs]),
            num_supernodes=count,
            backend_config=backend,
        )
    finally:
        tracker.close()
    if personalization == "fedbabu":  # the heads, frozen in the rounds, are fine-tuned now
        for state_dir in dirs:
            SiteRuntime.from_state_dir(state_dir).adapt(
                cases=None,
                epochs=exp.local_epochs,
                lr=exp.lr,
                source=str(out_dir / "global_model.pt"),
            )
    if without is not None:  # the left-out site fits its own heads to the global model
        SiteRuntime.from_state_dir(dirs[names.index(without)]).adapt(
            cases=None,
            epochs=exp.rounds * exp.local_epochs,  # the passes it would have had in the rounds
            lr=exp.lr,
            source=str(out_dir / "global_model.pt"),
        )
        finals[without] = evaluate_at_sites(exp, [dirs[names.index(without)]], out_dir)[without]
        history[without].append(float(finals[without]["soft-dice"]))
    if secure or personalization == "fedbabu":
        # no federated evaluation under SecAgg+ / of the fine-tuned heads: each site scores
        # its final model itself
        finals = evaluate_at_sites(exp, dirs, out_dir)
        choice = RoundChoice("")  # the final model is the only one there is to score
        choice.offer(exp.rounds, None)
        if secure:
            for name, row in finals.items():
                history[name].append(float(row["soft-dice"]))
    missing = [s.name for s in exp.sites if s.name not in finals]
    if missing:
        raise RuntimeError(f"{method}: no evaluation came back from {missing}; see the log above")
    sites = {}
    for name, row in finals.items():
        sites[name] = {
            "soft_dice": float(row["soft-dice"]),
            "per_rater_dice": [float(x) for x in row.get("per-rater-dice-list", [])],
            "dice_vs_truth": row.get("dice-vs-truth"),
            # Flower metrics must be numbers: a model without rater outputs sent ged 0
            "ged": row.get("ged") if row.get("per-rater-dice-list") else None,
            "ece": row.get("ece"),
            "recurrences": recurrences_from_details(row),
        }
    result: dict[str, Any] = {
        "sites": sites,
        "history": history,
        "state_dirs": {s.name: str(d) for s, d in zip(exp.sites, dirs)},
        "round_seconds": round_seconds,  # server-measured, train + evaluate, per round
        "selected": {s.name: choice.report() for s in exp.sites},  # one global model
    }
    if privacy:
        result["privacy"] = spent
    if weighting:
        result["aggregation_weights"] = weighting
    return result


def evaluate_at_sites(exp: Experiment, dirs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Each site's final personalised model (global shared weights + its own heads) on its
    evaluation split, as the site itself would score it."""
    from mrprism_core.checkpoint import load_checkpoint
    from mrprism_core.federated import split_evaluation

    shared = load_checkpoint(out_dir / "global_model.pt")["shared_state"]
    rows = {}
    for state_dir in dirs:
        runtime = SiteRuntime.from_state_dir(state_dir)
        model = runtime.build_model(exp.spec(runtime.info))
        runtime.load_shared(model, shared)
        scalars, details = split_evaluation(runtime.evaluate(model, exp.eval_split))
        rows[runtime.name] = {**scalars, **details}
    return rows


def _site_scalars(site: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation's headline numbers, named like the federated rounds' per-site scalars."""
    per_rater = [x for x in result.get("per_rater_dice") or [] if x is not None]
    return {
        f"evaluate/soft-dice/{site}": result["soft_dice"],
        f"evaluate/dice-vs-truth/{site}": result.get("dice_vs_truth"),
        f"evaluate/per-rater-dice/{site}": sum(per_rater) / len(per_rater) if per_rater else None,
    }


def _run_local(exp: Experiment) -> dict[str, Any]:
    dirs = write_site_dirs(exp, "local")
    tracker = exp.tracker("local")
    sites, history, selected = {}, {}, {}
    for site, state_dir in zip(exp.sites, dirs):
        runtime = SiteRuntime.from_state_dir(state_dir)
        model = runtime.build_model(exp.spec(runtime.info))
        history[site.name] = []
        choice = RoundChoice(exp.select_split)  # each site alone: its own best round
        for server_round in range(1, exp.rounds + 1):
            runtime.train(
                model,
                local_epochs=exp.local_epochs,
                lr=exp.round_lr(server_round),
                seed=runtime.round_seed(exp.seed, server_round),
                persist_optimizer=exp.persist_optimizer,
                server_round=server_round,
            )
            result = runtime.evaluate(model, exp.eval_split)
            history[site.name].append(float(result["soft_dice"]))
            tracker.scalars(server_round, _site_scalars(site.name, result))
            score = None
            if exp.select_split:
                score = float(runtime.evaluate(model, exp.select_split)["soft_dice"])
            if choice.offer(server_round, score):
                sites[site.name] = _row(result)
            exp.tick(f"local: {site.name} round {server_round}/{exp.rounds}")
        runtime.save(model, server_round=exp.rounds, run_id=0)
        selected[site.name] = choice.report()
    tracker.close()
    return {
        "sites": sites,
        "history": history,
        "state_dirs": {s.name: str(d) for s, d in zip(exp.sites, dirs)},
        "selected": selected,
    }


def _run_centralized(exp: Experiment) -> dict[str, Any]:
    infos = _site_infos(exp)
    sizes = {info.image_size for info in infos.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"centralized pooling needs one image size across sites, got {sorted(sizes)}"
        )
    offsets, total = {}, 0
    for site in exp.sites:
        offsets[site.name] = total
        total += infos[site.name].num_raters

    def slotted(site: VirtualSite) -> dict[str, Any]:
        return {**site.data, "rater_slots": {"total": total, "offset": offsets[site.name]}}

    device = resolve_device(exp.device)
    pooled = ConcatDataset([build_dataset(slotted(s), "train") for s in exp.sites])
    tests = {s.name: build_dataset(slotted(s), exp.eval_split) for s in exp.sites}
    chosen_on = {}
    if exp.select_split:
        chosen_on = {s.name: build_dataset(slotted(s), exp.select_split) for s in exp.sites}
    info = dataset_info(pooled.datasets[0])
    torch.manual_seed(exp.seed)
    model = build_model_for_data(exp.spec(info), info).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=exp.lr)
    history: dict[str, list[float]] = {s.name: [] for s in exp.sites}
    results: dict[str, Any] = {}
    choice = RoundChoice(exp.select_split)  # one pooled model: one round for every site

    def loader(epoch: int) -> DataLoader:
        torch.manual_seed(exp.seed * 1_000_003 + epoch)  # the epoch's shuffles of Eq. 10-12
        return make_loader(
            pooled, exp.batch_size, shuffle=True, seed=exp.seed + epoch, augment=exp.augment
        )

    tracker = exp.tracker("centralized")

    def scored(dataset: Any, mirror: bool = False) -> dict[str, Any]:
        loader = make_loader(dataset, exp.batch_size, shuffle=False)
        return evaluate(model, loader, device, mirror=mirror)

    # as every site scores its test split (SiteRuntime.evaluate); validation never mirrored
    mirror_tests = exp.test_mirroring and exp.eval_split == "test"

    for server_round in range(1, exp.rounds + 1):
        set_lr(optimizer, exp.round_lr(server_round))
        first = (server_round - 1) * exp.local_epochs
        run_epochs(model, optimizer, loader, device, exp.local_epochs, first_epoch=first)
        latest = {}
        for site in exp.sites:
            latest[site.name] = scored(tests[site.name], mirror_tests)
            history[site.name].append(float(latest[site.name]["soft_dice"]))
            tracker.scalars(server_round, _site_scalars(site.name, latest[site.name]))
        score = None
        if chosen_on:
            score = sum(float(scored(d)["soft_dice"]) for d in chosen_on.values()) / len(chosen_on)
        if choice.offer(server_round, score):
            results = latest
        exp.tick(f"centralized: round {server_round}/{exp.rounds}")
    tracker.close()
    sites = {}
    for site in exp.sites:
        start = offsets[site.name]
        sites[site.name] = _row(
            results[site.name], slice(start, start + infos[site.name].num_raters)
        )
    return {
        "sites": sites,
        "history": history,
        "rater_slots": offsets,
        "selected": {s.name: choice.report() for s in exp.sites},  # one pooled model
    }


def run_method(name: str, exp: Experiment) -> dict[str, Any]:
    """Run one method of the grid; returns ``{"sites", "history", "seconds", ...}``."""
    started = time.perf_counter()
    model, name = parse_method(name)
    if model != "mrprism":  # its own state folders beside MrPrism's
        exp = replace(exp, model=model, work_dir=exp.work_dir / model)
    dp = DP_METHOD.fullmatch(name)
    if name == "federated":
        result = _run_federated(exp, name)
    elif dp:
        budget = {"enabled": True, "target_epsilon": float(dp.group(1)), "delta": DP_DELTA}
        result = _run_federated(exp, name, privacy=budget)
    elif name == "federated_secagg":
        result = _run_federated(exp, name, secure=True)
    elif name == "federated_shared":
        result = _run_federated(exp, name, shared_everything=True)
    elif name == "federated_quality":
        result = _run_federated(exp, name, quality_weighted=True)
    elif WITHOUT_METHOD.fullmatch(name):
        result = _run_federated(exp, name, without=WITHOUT_METHOD.fullmatch(name).group(1))
    elif name in PERSONALIZED:
        result = _run_federated(exp, name, personalization=PERSONALIZED[name])
    elif name == "local":
        result = _run_local(exp)
    elif name == "centralized":
        result = _run_centralized(exp)
    else:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
    result["seconds"] = time.perf_counter() - started
    result["model"] = model
    return result


def mean_row(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Unweighted mean over sites of the scalar metrics."""
    keys = ("soft_dice", "dice_vs_truth", "ged", "ece")
    out = {}
    for key in keys:
        values = [float(row[key]) for row in sites.values() if row.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    per_rater = [
        sum(r["per_rater_dice"]) / len(r["per_rater_dice"])
        for r in sites.values()
        if r["per_rater_dice"]
    ]
    if per_rater:
        out["per_rater_dice"] = sum(per_rater) / len(per_rater)
    return out
