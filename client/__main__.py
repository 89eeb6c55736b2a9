"""``python -m client --site NAME [--check] [key=value ...]``: run a hospital's SuperNode.

Resolves ``site_configs/NAME.yaml`` with Hydra (``key=value`` overrides, e.g.
``data.root=/mnt/refuge superlink=coordinator.example.org:9092``), checks the site's data,
writes the resolved config into the site's state directory and starts a Flower SuperNode
(``flower-supernode``) that runs this project's ClientApp on the site's data and GPU.
Nothing but the shared model weights and metrics leaves the site.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mrprism_core.cli_types import positive_float, positive_int

from .site_config import SITE_CONFIGS_ENV, SiteDataError, compose_site_config, site_sources
from .socket_paths import socket_path
from .supernode_launch import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_IDLE_POLL_S,
    FLOWER_HEARTBEAT_S,
    FLOWER_IDLE_WAIT_S,
    HEARTBEAT_RANGE_S,
)
from .worker_protocol import SOCKET_NODE_CONFIG

EXAMPLES = """
examples:
  python -m client --list
  python -m client --site synthetic_a --check
  python -m client --site synthetic_a superlink=127.0.0.1:9092
  python -m client --site synthetic_a privacy=dp_sgd privacy.target_epsilon=4
  python -m client --site synthetic_a --info
  python -m client --site synthetic_a --predict new_cases/ --out predictions/
  python -m client --site synthetic_a --raters --out rater_report/
  python -m client --site synthetic_a --adapt --cases 8 --from runs/federated/global_model.pt
  python -m client --site refuge data.root=/mnt/refuge supernode.insecure=false \\
      supernode.root_certificates=/etc/mrprism/ca.crt \\
      supernode.auth_private_key=/etc/mrprism/keys/refuge

a site's key pair for SuperNode authentication: python -m client.keys DIR --site NAME
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--site", help="site config name: site_configs/<SITE>.yaml")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only validate the site's data (every file is decoded once, which also fills the "
        "preprocessing cache) and print a summary: cases per split, raters, classes, size, "
        "the raters' agreement",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the known site configs and where each is from"
    )
    parser.add_argument(
        "--config-dir",
        help="the hospital's own folder of site YAML files, looked up before the packaged "
        f"site_configs/ (whose data/ and privacy/ groups stay available); default: "
        f"${SITE_CONFIGS_ENV}",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check, write the resolved config, print the SuperNode command, do not start it",
    )
    parser.add_argument(
        "--info",
        action="store_true",
        help="print what the site holds: its model snapshot (round, run, raters, classes, date)",
    )
    parser.add_argument(
        "--predict",
        metavar="INPUT",
        help="segment new cases with the site's own model: an image, NIfTI file, DICOM series "
        "folder or a folder of them (needs --out; no coordinator needed)",
    )
    parser.add_argument(
        "--raters",
        action="store_true",
        help="write the site's rater report from its own model and data: agreement of each "
        "rater with the calibrated consensus, area bias, DivP's sensitivity/specificity, "
        "missed structures, where and on which cases each rater departs (raters.json, "
        "raters.md, PNG plots in --out; default <state_dir>/rater_report). It stays at the site",
    )
    parser.add_argument(
        "--split",
        default="all",
        choices=("all", "train", "val", "test"),
        help="--raters: the cases the report covers (default: every split)",
    )
    parser.add_argument("--out", help="output folder for --predict and --raters")
    parser.add_argument(
        "--adapt",
        action="store_true",
        help="onboarding (a site that joins late, or a new rater): train only this site's rater "
        "heads on a few cases with the shared weights frozen, save them, and exit",
    )
    parser.add_argument(
        "--cases", type=positive_int, default=8, help="--adapt: training cases used"
    )
    parser.add_argument("--epochs", type=positive_int, default=20, help="--adapt: passes over them")
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="--adapt: Adam learning rate (default: the preset's)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        metavar="CHECKPOINT",
        help="--adapt: the shared weights (a global_model.pt, or a centralized last.pt); "
        "default: the site's own snapshot",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, help="--predict: slices per forward pass"
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="--predict: average each slice's prediction over its 4 mirrorings (test-time "
        "mirroring; 4x the inference time)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Hydra overrides of the site config, e.g. data.root=/mnt/refuge",
    )
    args = parser.parse_args(argv)
    if not args.list and not args.site:
        parser.error("--site is required (use --list to see the known sites)")
    if args.predict and not args.out:
        parser.error("--predict needs --out OUTPUT_FOLDER")
    if args.mirror and not args.predict:
        parser.error("--mirror applies to --predict only")
    return args


#: Flower's SuperExec polling interval (seconds); ``python -m client`` lowers its 1 s default.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: The checkout this site runs (the folder above the ``client`` package): an app the SuperLink
#: sends must be this code (``supernode.pin_app``).
SITE_CODE_ROOT = Path(__file__).resolve().parents[1]


def heartbeat_s(cfg: Mapping[str, Any]) -> float | None:
    """The site's ``supernode.heartbeat_s`` (None: Flower's own interval), refused with a
    ``SiteDataError`` outside what Flower's SuperLink accepts."""
    heartbeat = dict(cfg.get("supernode") or {}).get("heartbeat_s", DEFAULT_HEARTBEAT_S)
    low, high = HEARTBEAT_RANGE_S
    if heartbeat is not None and not low <= float(heartbeat) <= high:
        raise SiteDataError(
            f"site {cfg['site']}: supernode.heartbeat_s={heartbeat!r} is refused: {low:g}-"
            f"{high:g} seconds, what Flower's SuperLink accepts (or null for Flower's "
            f"{FLOWER_HEARTBEAT_S} s)"
        )
    return None if heartbeat is None else float(heartbeat)


def supernode_command(
    cfg: Mapping[str, Any], state_dir: Path, worker_socket: Path | None = None
) -> list[str]:
    """The ``flower-supernode`` command line for a resolved site config; ``worker_socket``
    tells the ClientApp where the site worker listens."""
    node = dict(cfg.get("supernode") or {})
    idle_poll_s = node.get("idle_poll_s", DEFAULT_IDLE_POLL_S)
    wait = FLOWER_IDLE_WAIT_S if idle_poll_s is None else float(idle_poll_s)
    pin = bool(node.get("pin_app", True))
    if not wait > 0:
        raise SiteDataError(
            f"site {cfg['site']}: supernode.idle_poll_s={idle_poll_s!r} is refused: seconds > 0 "
            f"(or null for Flower's {FLOWER_IDLE_WAIT_S} s)"
        )
    heartbeat = heartbeat_s(cfg)
    if wait >= FLOWER_IDLE_WAIT_S and not pin and heartbeat is None:
        command = [shutil.which("flower-supernode") or "flower-supernode"]
    else:
        # Flower's own entry point, its 3 s wait after an empty poll shortened, its heartbeat
        # set, running only apps that are this checkout's code (client/app_check.py)
        command = [sys.executable, "-m", "client.supernode_launch", f"--idle-poll-s={wait:g}"]
        if heartbeat is not None:
            command.append(f"--heartbeat-s={heartbeat:g}")
        if pin:
            command.append(f"--pin-app={SITE_CODE_ROOT}")
    command += ["--superlink", str(cfg["superlink"])]
    if node.get("insecure", False):
        command.append("--insecure")
    elif node.get("root_certificates"):
        command += ["--root-certificates", str(Path(node["root_certificates"]).resolve())]
    else:
        raise SiteDataError(
            f"site {cfg['site']}: supernode.insecure is false but no supernode.root_certificates "
            "is given; point it at the CA certificate that signed the SuperLink's certificate"
        )
    if node.get("auth_private_key"):
        command += ["--auth-supernode-private-key", str(Path(node["auth_private_key"]).resolve())]
    if node.get("max_retries") is not None:
        command += ["--max-retries", str(int(node["max_retries"]))]
    command += ["--port", str(int(node.get("port", 9094)))]
    node_config = f"site={_toml_string(str(cfg['site']))} state-dir={_toml_string(str(state_dir))}"
    if worker_socket is not None:
        node_config += f" {SOCKET_NODE_CONFIG}={_toml_string(str(worker_socket))}"
    command += ["--node-config", node_config]
    return command


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.list:
            for name, root in site_sources(args.config_dir).items():
                print(f"{name:24s} {root}")
            return 0
        cfg = compose_site_config(args.site, args.overrides, args.config_dir)
        from .site import SiteRuntime  # torch: after the config is known to be good

        site = SiteRuntime(cfg)
        if args.info:
            print("\n".join(site.describe()))
            return 0
        if args.raters:
            out = Path(args.out) if args.out else site.store.root / "rater_report"
            written = site.rater_report(out, args.split)
            print(f"rater report of {site.name} ({args.split}): {out}")
            print("\n".join(f"  {path.name}" for path in written))
            return 0
        if args.predict:
            from mrprism_core.predict import run_cli

            model = site.personal_model()
            return run_cli(
                model, args.predict, args.out, str(site.device), args.batch_size, args.mirror
            )
        summary = site.check()
        if args.adapt:
            print("\n".join(summary.lines()))
            result = site.adapt(
                cases=args.cases, epochs=args.epochs, lr=args.lr, source=args.source
            )
            print(
                f"adapted:     rater heads on {result['cases']} cases x {result['epochs']} "
                f"epochs, loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}"
            )
            print(f"snapshot:    {site.store.snapshot_path}")
            return 0
    except (SiteDataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    if args.check:
        return 0

    from omegaconf import OmegaConf

    state_dir = site.store.root.resolve()
    site.store.write_config(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    with contextlib.ExitStack() as stack:  # the sockets' folders go when the site stops
        return _run_site(args, cfg, state_dir, stack)


def _run_site(
    args: argparse.Namespace, cfg: Mapping[str, Any], state_dir: Path, stack: contextlib.ExitStack
) -> int:
    """Start the site's fork server, worker and SuperNode (print the command with
    ``--dry-run``) and supervise them until the SuperNode ends; the exit code."""
    node = cfg.get("supernode") or {}
    worker = bool(node.get("worker", True))
    worker_socket = stack.enter_context(socket_path(state_dir, "worker.sock")) if worker else None
    try:
        command = supernode_command(cfg, state_dir, worker_socket)
    except SiteDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"state dir:   {state_dir}")
    print("starting:    " + " ".join(shlex.quote(part) for part in command), flush=True)
    if args.dry_run:
        return 0
    from .supervisor import DEFAULT_STOP_WAIT_S, SiteWorker, run_supernode

    # Flower's SuperExec looks for a message to start a ClientApp for once a second by default;
    # a tenth of a second costs a local gRPC call and saves half a second per message on average
    os.environ.setdefault(SUPEREXEC_POLL_ENV, "0.1")

    # a refused activation (node auth) is retried; SIGTERM/SIGINT reach the SuperNode, which
    # is killed if it has not stopped after supernode.stop_wait_s
    wait_s, retries = float(node.get("activation_wait_s", 180.0)), node.get("max_retries")
    stop_wait_s = float(node.get("stop_wait_s", DEFAULT_STOP_WAIT_S))
    heartbeat = heartbeat_s(cfg)  # checked by supernode_command above
    supervise = {
        "stop_wait_s": stop_wait_s,
        "heartbeat_s": FLOWER_HEARTBEAT_S if heartbeat is None else heartbeat,
        # our launcher ends with this process, so it can run apart from the site's process
        # group and get a stop signal once (Flower's own flower-supernode stays in the group)
        "own_session": command[1:3] == ["-m", "client.supernode_launch"],
    }
    if node.get("fork_clientapp", True):
        from .clientapp_fork import ForkServer

        fork_socket = stack.enter_context(socket_path(state_dir, "clientapp_fork.sock"))
        print(f"fork server: {fork_socket} (each ClientApp process starts with Flower loaded)")
        stack.enter_context(ForkServer(state_dir, fork_socket))
    try:
        if worker_socket is not None:
            print(f"worker:      {worker_socket} (starting; torch, config, data stay loaded)")
            stack.enter_context(SiteWorker(state_dir, worker_socket))
        return run_supernode(command, wait_s, retries, **supervise)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
