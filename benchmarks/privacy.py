"""What privacy costs: soft Dice against epsilon (DP-SGD at the sites), and the time and bytes
of a SecAgg+ round against a plain one.

``python -m benchmarks.privacy [--epsilons 1 4 16] [--rounds 5] [--image-size 32] [--cases 16]``

* quality: the default synthetic experiment's three sites (their own configs, sizes set by
  the options), run with ``simulation.run``'s methods ``federated`` and ``federated_dp_eps<E>``;
  mean soft Dice over sites, and each site's spent epsilon (delta 1e-5).
* DP-SGD alone: one synthetic site (32 cases, 15 epochs, no federation), trained without DP,
  with clipping only (noise 0) and with noise multipliers 0.5 and 1.0: what costs quality.
* secure aggregation: the same three sites, ``--secagg-rounds`` rounds with and without
  SecAgg+ in Flower's simulation engine; seconds per round and bytes through the server's grid
  per round (every record of every message both ways), as ratios SecAgg+ / plain.

Results: ``benchmarks/results/privacy.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mrprism_core.cli_types import positive_float, positive_int

from .common import RESULTS_DIR, simulation_config, write_json

BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"address": "local", "num_cpus": 2},
}
SITES = ("synthetic_a", "synthetic_b", "synthetic_c")


def _value_bytes(value: Any) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 8  # a number


def _message_bytes(messages: Iterable[Any]) -> int:
    from flwr.app import ArrayRecord

    total = 0
    for msg in messages:
        if not msg.has_content():
            continue
        for record in msg.content.values():
            if isinstance(record, ArrayRecord):
                total += record.count_bytes()
            else:  # Flower's count_bytes rejects the list values SecAgg+ sends
                total += sum(len(k) + _value_bytes(v) for k, v in record.items())
    return total


def counting_grid(grid: Any) -> Any:
    """``grid`` wrapped as the round loops wrap it (:class:`server.grid.PromptGrid`), adding up
    in ``.bytes`` every message it pushes and pulls: the loops push and pull, and its
    ``send_and_receive`` goes through both."""
    from server.grid import PromptGrid

    class CountingGrid(PromptGrid):
        def __init__(self, grid: Any) -> None:
            super().__init__(grid)
            self.bytes = 0

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            messages = list(messages)
            self.bytes += _message_bytes(messages)
            return super().push_messages(messages)

        def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
            replies = list(super().pull_messages(message_ids))
            self.bytes += _message_bytes(replies)
            return replies

    return CountingGrid(grid)


def _simulation_config(out_dir: Path, args: argparse.Namespace, methods: list[str]) -> dict:
    return simulation_config(
        [
            f"out_dir={out_dir}",
            "progress=false",
            f"federation.rounds={args.rounds}",
            f"methods=[{','.join(methods)}]",
            "partition.source_overrides=["
            f"'data.image_size={args.image_size}','data.splits.train={args.cases}',"
            f"'data.splits.val=0','data.splits.test={args.cases // 2}']",
        ]
    )


def quality_vs_epsilon(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from simulation.run import run_experiment

    methods = ["federated", *[f"federated_dp_eps{e:g}" for e in args.epsilons]]
    results = run_experiment(_simulation_config(work / "quality", args, methods))
    rows = []
    for name, method in results["methods"].items():
        spent = method.get("privacy", {})
        rows.append(
            {
                "method": name,
                "mean_soft_dice": method["mean"]["soft_dice"],
                "site_epsilon": {site: v["epsilon"] for site, v in spent.items()},
                "seconds": method["seconds"],
            }
        )
        print(f"{name:24s} soft Dice {method['mean']['soft_dice']:.4f}  {spent or ''}")
    return rows


def dp_sgd_alone(work: Path, epochs: int = 15, cases: int = 32) -> list[dict[str, Any]]:
    import torch

    from client.privacy import PrivacyConfig, PrivacyLedger, PrivateRound
    from mrprism_core.data.synthetic import make_dataset
    from mrprism_core.local_training import DPSGD, run_epochs
    from mrprism_core.models import build_model
    from mrprism_core.train import evaluate, make_loader

    train, test = make_dataset(cases, 3, 32, 0), make_dataset(16, 3, 32, 99)
    rows = []
    for noise in (None, 0.0, 0.5, 1.0):
        torch.manual_seed(0)
        model = build_model(
            "mrprism", in_channels=3, num_classes=2, num_raters=3, image_size=32, recurrences=1
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = make_loader(train, 8, shuffle=True, seed=0)
        private = None
        if noise is not None:
            cfg = PrivacyConfig(enabled=True, noise_multiplier=noise)
            ledger = PrivacyLedger(work / f"ledger-{noise}.json")
            private = PrivateRound(cfg, ledger, epochs)
            optimizer, loader = private.wrap(model, optimizer, loader, epochs)
        started = time.perf_counter()
        strategy = DPSGD() if private is not None else None
        run_epochs(model, optimizer, lambda _, batches=loader: batches, "cpu", epochs, strategy)
        seconds = time.perf_counter() - started
        epsilon = private.finish()["dp-epsilon"] if private is not None else None
        score = evaluate(model, make_loader(test, 8, shuffle=False), "cpu")["soft_dice"]
        rows.append(
            {"noise_multiplier": noise, "soft_dice": score, "epsilon": epsilon, "seconds": seconds}
        )
        print(f"noise {noise}: soft Dice {score:.3f}, epsilon {epsilon}, {seconds:.1f} s")
    return rows


def _one_run(work: Path, state_dirs: list[str], secure: bool, rounds: int) -> dict[str, float]:
    from simulation.methods import require_ray_token

    require_ray_token()  # before Flower imports Ray
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import create_client_app
    from server.app import run_rounds
    from server.config import RunConfig
    from simulation.ray_backend import drain_before_shutdown

    drain_before_shutdown()  # Ctrl-C: Ray is shut down once no site's message is in flight
    cfg = RunConfig.from_mapping(
        {
            "num-server-rounds": rounds,
            "min-available-nodes": 3,
            "min-train-nodes": 3,
            "fraction-evaluate": 0.0,  # compare the aggregation only
            "secure-aggregation": secure,
            "secagg-max-weight": 100.0,
            "secagg-train-ahead": False,  # simulated sites have no worker to train ahead
            "out-dir": str(work / ("secagg" if secure else "plain")),
            "resume": False,
            "model-options": json.dumps({"recurrences": 1}),
        }
    )
    counted: dict[str, float] = {}
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        counting = counting_grid(grid)
        started = time.perf_counter()
        run_rounds(counting, context, cfg)
        counted["seconds_per_round"] = (time.perf_counter() - started) / rounds
        counted["bytes_per_round"] = counting.bytes / rounds

    run_simulation(
        server_app=app,
        client_app=create_client_app(state_dirs),
        num_supernodes=3,
        backend_config=BACKEND,
    )
    return counted


def secure_vs_plain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from client.site_config import compose_site_config
    from client.state import SiteStore

    runs = {}
    for secure in (False, True):
        dirs = []
        for site in SITES:
            state_dir = work / ("secagg" if secure else "plain") / "sites" / site
            cfg = compose_site_config(
                site,
                [
                    f"data.image_size={args.image_size}",
                    f"data.splits.train={args.cases}",
                    "data.splits.val=2",
                    f"state_dir={state_dir}",
                ],
            )
            SiteStore(state_dir).write_config(OmegaConf.to_yaml(OmegaConf.create(cfg)))
            dirs.append(str(state_dir))
        runs["secagg" if secure else "plain"] = _one_run(work, dirs, secure, args.secagg_rounds)
    plain, secagg = runs["plain"], runs["secagg"]
    result = {
        **runs,
        "time_ratio_secagg_over_plain": secagg["seconds_per_round"] / plain["seconds_per_round"],
        "bytes_ratio_secagg_over_plain": secagg["bytes_per_round"] / plain["bytes_per_round"],
    }
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=positive_float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--rounds", type=positive_int, default=5, help="rounds of the quality runs")
    parser.add_argument(
        "--secagg-rounds", type=positive_int, default=2, help="rounds of the timing runs"
    )
    parser.add_argument("--image-size", type=positive_int, default=32)
    parser.add_argument("--cases", type=positive_int, default=16, help="training cases per site")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["quality", "dp_alone", "secagg"],
        choices=["quality", "dp_alone", "secagg"],
        help="which measurements to run (default: all)",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "privacy.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        payload: dict[str, Any] = {"settings": vars(args)}
        if "quality" in args.parts:
            payload["quality_vs_epsilon"] = quality_vs_epsilon(args, work)
        if "dp_alone" in args.parts:
            payload["dp_sgd_alone"] = dp_sgd_alone(work)
        if "secagg" in args.parts:
            payload["secure_aggregation"] = secure_vs_plain(args, work)
    write_json(args.out, payload)


if __name__ == "__main__":
    from simulation.run import ends_on_error

    with ends_on_error():  # Ctrl-C or a crashed simulation runtime: no hang on Flower's thread
        main()
