"""``python -m simulation.run [key=value ...]``: does federating help?

Builds virtual sites (``partition``), runs every method of the grid on them (``methods``: the
same ServerApp/ClientApp in Flower's simulation engine, local-only, centralized) and writes a
report to ``out_dir``. ``--help`` lists every option; ``preset=smoke`` is a 1-2 minute run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from client.site_config import compose_site_config
from client.state import SiteStore
from mrprism_core.config_schema import SimulationSchema, checked
from mrprism_core.data.factory import build_dataset, dataset_info
from mrprism_core.lr_schedule import check_lr_schedule
from mrprism_core.models import model_from_build_args
from mrprism_core.models.config import get_preset
from mrprism_core.tracking import check_tracking
from mrprism_core.train import seed_everything
from mrprism_core.update_codec import check_update_precision

from .methods import (
    Experiment,
    check_methods,
    check_ray_address,
    check_simulated_drift_correction,
    mean_row,
    run_method,
    selection_split,
    split_cases,
)
from .partition import VirtualSite, partition
from .report import (
    cases_source,
    console_summary,
    over_seeds,
    targets,
    write_report,
    write_seed_report,
)

log = logging.getLogger(__name__)
# Flower's logger: run.log always, the console without a progress bar (route_logs)
run_log = logging.getLogger("flwr.mrprism")


def resolve_sites(cfg: dict[str, Any]) -> list[VirtualSite]:
    """Virtual sites from the ``partition`` block; ``source`` sites are resolved from their
    site configs exactly as ``python -m client --site NAME`` resolves them."""
    part = dict(cfg["partition"])
    if part.get("kind", "source") == "source":
        overrides = list(part.get("source_overrides") or [])
        own = part.get("config_dir")  # a hospital-owned folder overlaying site_configs/
        part["sources"] = [compose_site_config(name, overrides, own) for name in part["sources"]]
    return partition(part, int(cfg["seed"]))


def _example_cases(sites: list[VirtualSite], state_dirs: dict[str, str], split: str) -> list[dict]:
    """First test case of each site through its final personalised model."""
    cases = []
    for site in sites:
        snapshot = SiteStore(state_dirs[site.name]).load_snapshot()
        if snapshot is None:
            continue
        model = model_from_build_args(snapshot["build_args"])
        model.load_state_dict({**snapshot["shared_state"], **snapshot["local_state"]})
        model.eval()
        sample = build_dataset(site.data, split)[0]
        valid = sample.get("rater_valid")
        with torch.no_grad():
            out = model(sample["image"].unsqueeze(0))
        keep = slice(None) if valid is None else valid.bool()
        cases.append(
            {
                "site": site.name,
                "image": sample["image"].numpy(),
                "raters": sample["raters"][keep].numpy(),
                "calibrated": out.calibrated[0].numpy(),
                "heads": out.raters[0][keep].numpy(),
            }
        )
    return cases


def run_experiment(cfg: dict[str, Any], label: str = "") -> dict[str, Any]:
    """Run the configured grid with ``cfg["seed"]`` and write the report; returns the results
    dict. ``label`` goes before the progress bar's text (which seed of several)."""
    seed = int(cfg["seed"])
    seed_everything(seed)
    out_dir = Path(str(cfg["out_dir"]))
    methods = list(cfg["methods"])
    fed = dict(cfg["federation"])
    check_methods(methods, str(fed["preset"]), fed.get("model_options"))
    sites = resolve_sites(cfg)
    work_dir = out_dir / "work"
    if work_dir.exists():
        # the sites' state (heads, snapshots, optimizer moments) of an earlier run into the
        # same out_dir would give this run's methods a head start: every run starts bare
        log.info("removing the previous run's site state under %s", work_dir)
        shutil.rmtree(work_dir)
    exp = Experiment(
        sites=sites,
        work_dir=work_dir,
        rounds=int(fed["rounds"]),
        local_epochs=int(fed["local_epochs"]),
        strategy=str(fed["strategy"]),
        server_momentum=float(fed.get("server_momentum", Experiment.server_momentum)),
        server_lr=float(fed.get("server_lr", Experiment.server_lr)),
        lr=float(fed["lr"] or get_preset(str(fed["preset"])).lr),
        lr_schedule=check_lr_schedule(
            str(fed.get("lr_schedule", "constant")), "federation.lr_schedule"
        ),
        drift_correction=check_simulated_drift_correction(fed, methods),
        persist_optimizer=bool(fed.get("persist_optimizer", True)),
        update_precision=check_update_precision(
            str(fed.get("update_precision", "float16")), "federation.update_precision"
        ),
        preset=str(fed["preset"]),
        model_options=dict(fed.get("model_options") or {}),
        seed=seed,
        batch_size=int(fed["batch_size"]),
        augment=bool(fed.get("augment", False)),
        test_mirroring=bool(fed.get("test_mirroring", False)),
        device=str(fed["device"]),
        eval_split=str(fed["eval_split"]),
        select_split=selection_split(str(fed.get("select", "last")), sites),
        ray_num_cpus=fed.get("ray_num_cpus"),
        ray_address=fed.get("ray_address") or None,
        client_num_cpus=float(fed.get("client_num_cpus") or 1.0),
        client_num_gpus=float(fed.get("client_num_gpus") or 0.0),
        quality_weight=str(fed.get("quality_weight", Experiment.quality_weight)),
        tracking=str(cfg.get("tracking", "none")),
        tracking_dir=out_dir,
    )
    bar = tqdm(
        total=sum(exp.rounds * (len(sites) if m.endswith("local") else 1) for m in methods),
        desc="simulation",
        unit="step",
        disable=not cfg.get("progress", True),
    )

    def tick(text: str) -> None:
        bar.set_description(label + text)
        bar.update(1)

    exp.on_progress = tick
    site_rows = []
    for site in sites:
        info = dataset_info(build_dataset(site.data, "train"))
        counts = {split: split_cases(site, split) for split in ("train", "val", "test")}
        site_rows.append({"name": site.name, "num_raters": info.num_raters, "cases": counts})
    results: dict[str, Any] = {"config": cfg, "seed": seed, "sites": site_rows, "methods": {}}
    for method in methods:
        run_log.info("method %s", method)
        outcome = run_method(method, exp)
        outcome["mean"] = mean_row(outcome["sites"])
        results["methods"][method] = outcome
    bar.close()
    train_cases = {row["name"]: row["cases"]["train"] for row in site_rows}
    results["targets"] = targets(results["methods"], train_cases)
    source = cases_source(results["methods"])
    cases = []
    if source is not None:
        cases = _example_cases(sites, results["methods"][source]["state_dirs"], exp.eval_split)
    write_report(out_dir, results, cases)
    return results


def run_seeds(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the experiment ``cfg["seeds"]`` times, with seeds ``seed``, ``seed + 1``, ...: one
    seed writes its report to ``out_dir`` (:func:`run_experiment`); several write theirs to
    ``out_dir/seed<N>/`` and the mean and spread of every score to ``out_dir``. Returns what
    ``out_dir/results.json`` holds."""
    count = int(cfg.get("seeds", 1))
    if count == 1:
        return run_experiment(cfg)
    out_dir = Path(str(cfg["out_dir"]))
    runs = []
    for offset in range(count):
        seed = int(cfg["seed"]) + offset
        one = {**cfg, "seed": seed, "seeds": 1, "out_dir": str(out_dir / f"seed{seed}")}
        runs.append(run_experiment(one, label=f"seed {seed} ({offset + 1}/{count}) "))
    summary = {"config": cfg, **over_seeds(runs)}
    write_seed_report(out_dir, summary)
    return summary


class _HideRunSimulationDeprecation(logging.Filter):
    """Flower warns that ``run_simulation`` is deprecated in favour of ``flwr run``; a user of
    ``python -m simulation.run`` never calls it, so the advice stays in ``run.log``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def route_logs(progress: bool) -> None:
    """Flower's log, the server's round lines included, goes to Hydra's ``<out_dir>/run.log``;
    with a progress bar the console shows only Flower's warnings, so the bar stays readable."""
    from flwr.supercore.logger import ConsoleHandler, update_console_handler

    # Flower's state database sets up alembic, whose plugins log at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Ray's tip about a future default: a virtual site with no GPU share keeps seeing no GPU
    # today (what we want, federation.client_num_gpus); nothing for a user to do
    warnings.filterwarnings(
        "ignore", message="Tip: In future versions of Ray", category=FutureWarning
    )
    flower = logging.getLogger("flwr")
    for handler in logging.getLogger().handlers:  # Hydra's job log file
        if isinstance(handler, logging.FileHandler) and handler not in flower.handlers:
            handler.setLevel(logging.INFO)  # not Flower's DEBUG records
            flower.addHandler(handler)
    for handler in flower.handlers:
        if isinstance(handler, ConsoleHandler):
            handler.addFilter(_HideRunSimulationDeprecation())
    if progress:
        update_console_handler(level=logging.WARNING)


#: seconds the simulation may take to shut down after Ctrl-C before the process is ended
INTERRUPT_GRACE_S = 30.0


@contextlib.contextmanager
def ends_on_error(interrupt_grace_s: float = INTERRUPT_GRACE_S) -> Iterator[None]:
    """An error or Ctrl-C inside ends the process even when a thread that is not a daemon is
    stuck (:func:`exit_past_stuck_threads`); for the entry points that run simulations. After
    Ctrl-C the process also ends ``interrupt_grace_s`` later if it is still shutting down (a
    simulation runtime's clean-up, Ray's, can hang on a loaded machine: once in CI the process
    was still there 120 s after the interrupt)."""
    on_main_thread = threading.current_thread() is threading.main_thread()  # handlers live there
    if on_main_thread:
        previous = signal.signal(signal.SIGINT, _interrupt_with_deadline(interrupt_grace_s))
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:
        exit_past_stuck_threads(err)
        raise
    finally:
        if on_main_thread:
            signal.signal(signal.SIGINT, previous or signal.default_int_handler)


def _interrupt_with_deadline(grace_s: float) -> Callable[[int, Any], None]:
    """A SIGINT handler: KeyboardInterrupt as usual, and a deadline that ends the process
    ``grace_s`` later if it is still there."""

    def interrupted(signum: int, frame: Any) -> None:
        deadline = threading.Timer(grace_s, _end_after_interrupt, args=(grace_s,))
        deadline.daemon = True
        deadline.start()
        signal.default_int_handler(signum, frame)

    return interrupted


def _end_after_interrupt(grace_s: float) -> None:
    # straight to the file descriptor, no logging or stream locks: the stuck thread may hold one
    message = (
        f"\nerror: the simulation stopped: interrupted (its shut-down took over {grace_s:g} s)\n"
    )
    os.write(sys.stderr.fileno(), message.encode())
    os._exit(130)


def exit_past_stuck_threads(err: BaseException) -> None:
    """End the process now if a thread that is not a daemon is still running: Flower's ServerApp
    thread outlives a simulation runtime that crashed (e.g. Ray could not start) and would keep
    the process alive forever after the error. Prints the root cause in one line."""
    main_thread = threading.main_thread()
    if not any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        return  # nothing stuck: the error takes its normal way out
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    cause = (
        "interrupted" if isinstance(root, KeyboardInterrupt) else f"{type(root).__name__}: {root}"
    )
    # on a line of its own, not after the progress bar's
    print(f"\nerror: the simulation stopped: {cause}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()  # run.log complete
    os._exit(130 if isinstance(err, KeyboardInterrupt) else 1)


def main() -> None:
    """Hydra entry point of ``python -m simulation.run``."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Flower logs through its own handler; propagating to Hydra's root handler doubles every
    # line and adds Flower's debug output
    logging.getLogger("flwr").propagate = False

    @hydra.main(version_base="1.3", config_path="pkg://site_configs", config_name="simulation")
    def _run(cfg: DictConfig) -> None:
        try:  # a bad key, value, method or site name: the message alone, before anything runs
            cfg = checked(SimulationSchema, cfg, "the simulation config")
            container: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
            federation = container["federation"]
            check_methods(
                list(container["methods"]), federation["preset"], federation["model_options"]
            )
            check_tracking(str(container.get("tracking", "none")))
            check_lr_schedule(str(federation["lr_schedule"]), "federation.lr_schedule")
            check_simulated_drift_correction(federation, list(container["methods"]))
            check_update_precision(federation["update_precision"], "federation.update_precision")
            check_ray_address(federation["ray_address"])
            selection_split(federation["select"], resolve_sites(container))
        except (ValueError, FileNotFoundError) as err:  # SiteDataError is a ValueError
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        route_logs(bool(container.get("progress", True)))
        with ends_on_error():
            results = run_seeds(container)
        print("\n".join(console_summary(results)))
        print(f"report: {cfg.out_dir}/results.md")

    _run()


if __name__ == "__main__":
    main()
