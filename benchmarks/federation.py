"""What federation costs: bytes on the wire per round, and the fixed time per message.

``python -m benchmarks.federation [--presets tiny paper] [--cases 16] [--rounds 3]
[--variants worker ...] [--secagg-cases 16 64 128] [--secagg-light-cases N] [--skip-overhead]
[--skip-secagg]``

* bytes: per client and round the site downloads the float16 change of the packed shared
  weights since those its worker holds (the float32 weights with
  ``download-precision=float32``, and in a site's first round) and uploads the float16 change
  of its trained weights (float32 weights with ``update-precision=float32``); its evaluation
  message carries no weights in pipelined rounds (``evaluate-in-training``), else the float32
  weights once more;
  compared with sending the full model (shared + rater heads), for M = 7 raters; and with
  ``drift-correction=scaffold``, whose control variate travels beside the weights each way.
* fixed cost per message: real rounds (flower-superlink + one SuperNode started with
  ``python -m client``, ``flwr run``; 1 local epoch + evaluation) against the same epoch and
  evaluation run directly in one warm process on the same synthetic site (the median of three
  rounds after a first); (round - direct) / 2
  messages, steady rounds (not the first, which also installs the app bundle, nor the last),
  with the site worker and the ClientApp fork server (the default), without the fork server
  (``supernode.fork_clientapp=false``: Flower starts a fresh interpreter per message), with
  the worker but Flower's fixed 3 s wait after an empty poll (``supernode.idle_poll_s=null``;
  the default asks again after 0.5 s), with float32 training replies
  (``update-precision=float32``: the weights instead of their float16 change, twice the bytes
  back), with float32 training messages (``download-precision=float32``: twice the bytes
  down), with evaluation messages that carry the weights (``evaluate-in-training=false``:
  each is evaluated on its own), and without the worker (``supernode.worker=false``: each
  ClientApp process imports torch and opens the site).
  The round time is the server's own measurement (``metrics.jsonl``).
* breakdown: the pieces a per-message ClientApp process pays without the worker, each timed
  alone (interpreter + Flower import, our ClientApp module, torch and the round code, site
  config, data, model build, state read and write: snapshot and Adam moments), and the part of
  the write a reply still waits for when the site worker writes behind it; what is left of the
  fixed cost is Flower's own (process start-up by the SuperNode, polling, message transport).
* SecAgg+: a SecAgg+ round (training only) over a plain one (training and evaluation,
  pipelined: one round trip), three tiny sites, for each of ``--secagg-cases`` training cases
  per site (default ``--cases``). Flower's protocol is four round trips a round; ours three (the
  next round's keys made with this round's unmasking, ``secagg-keys-ahead``), the sites
  training from the round's first message (``secagg-train-ahead``). Measured as we run it,
  with a setup stage every round (``secagg-keys-ahead=false``), and as Flower's protocol is
  (both false: the weights with the third stage). The fixed cost is per round trip, so the
  ratio falls as the sites' own work grows. Three equally busy
  sites fill this machine's two cores, so training during the key exchange only takes the
  cores from it; ``--secagg-light-cases N`` makes two of the sites light, leaving a core for
  each busy process, as in a deployment where every site has its own machine.

Results: ``benchmarks/results/federation.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mrprism_core.cli_types import positive_int
from mrprism_core.federated import PACKED_KEY, StateLayout
from mrprism_core.models import build_model, split_state
from mrprism_core.protocol import CONTROL_KEY
from mrprism_core.update_codec import encode_update

from .common import RESULTS_DIR, write_json

IMAGE_SIZE = {"tiny": 64, "paper": 256}
BATCH = {"tiny": 8, "paper": 2}


def payload_bytes(preset: str, raters: int = 7) -> dict[str, float]:
    from flwr.app import Array, ArrayRecord

    model = build_model(
        "mrprism",
        in_channels=3,
        num_classes=2,
        num_raters=raters,
        image_size=IMAGE_SIZE[preset],
        preset=preset,
    )
    shared, local = split_state(model)
    layout = StateLayout.of(shared)
    packed = layout.pack(shared)
    record = ArrayRecord({PACKED_KEY: packed})
    full = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    shared_bytes = record.count_bytes()
    # a training reply at update-precision float16 (the default): the weights' change
    trained = packed.numpy() + 1e-3
    encoded = encode_update(trained, packed.numpy())
    assert encoded is not None
    reply_bytes = ArrayRecord({k: Array(v) for k, v in encoded.items()}).count_bytes()
    # a training message at download-precision float16 (the default), to a site whose worker
    # holds the previous weights (every round but its first): their change, the same size
    change_bytes = reply_bytes
    # a SCAFFOLD round: the control variate beside the weights' change down, and beside their
    # change back (the control variate and its change stay float32)
    control = ArrayRecord({CONTROL_KEY: packed.clone()}).count_bytes()
    scaffold_bytes = change_bytes + control + reply_bytes + control
    return {
        "preset": preset,
        "raters": raters,
        "full_model_bytes": full,
        "shared_payload_bytes": shared_bytes,
        "local_bytes_kept_at_site": sum(v.numel() * v.element_size() for v in local.values()),
        "reply_bytes_float16": reply_bytes,
        "download_bytes_float16": change_bytes,
        # download (the float16 change of the weights) + upload (the float16 change of theirs)
        "bytes_per_round_per_client": change_bytes + reply_bytes,
        # download-precision=float32 (or a site without a worker, or its first round)
        "bytes_per_round_per_client_float32_downloads": shared_bytes + reply_bytes,
        "bytes_per_round_per_client_float32_replies": change_bytes + shared_bytes,
        "bytes_per_round_per_client_float32_both": 2 * shared_bytes,
        # evaluate-in-training=false, or a site sampled for the evaluation only: the
        # evaluation message carries the (float32) weights too
        "bytes_per_round_per_client_evaluation_weights": shared_bytes + change_bytes + reply_bytes,
        "shared_over_full": shared_bytes / full,
        "scaffold_bytes_per_round_per_client": scaffold_bytes,
        "scaffold_over_plain": scaffold_bytes / (change_bytes + reply_bytes),
    }


def _site_overrides(preset: str, cases: int) -> list[str]:
    return [
        f"data.image_size={IMAGE_SIZE[preset]}",
        f"data.splits.train={cases}",
        f"data.splits.val={max(2, cases // 4)}",
        f"train.batch_size={BATCH[preset]}",
        "device=cpu",
    ]


def _median_seconds(code: str, repeats: int = 3) -> float:
    """Wall time of ``python -c code`` in a fresh interpreter (the median of ``repeats``)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _open_site(preset: str, cases: int, root: Path):
    from omegaconf import OmegaConf

    from client.site_config import compose_site_config
    from client.state import SiteStore

    cfg = compose_site_config("synthetic_a", _site_overrides(preset, cases))
    SiteStore(root).write_config(OmegaConf.to_yaml(OmegaConf.create(cfg)))


def message_breakdown(preset: str, cases: int, root: Path) -> dict[str, float]:
    """What a fresh per-message ClientApp process pays before and around the work, piece by
    piece: the interpreter with Flower, our ClientApp module, the round code (torch, models),
    the site config, its data, the model, and the site state read and written."""
    from client.site import SiteRuntime
    from server.config import RunConfig

    _open_site(preset, cases, root)
    spec = RunConfig(preset=preset).model_spec()
    # what Flower's flwr-clientapp command imports before it asks for its message (its CLI
    # pulls in the SuperNode's modules, far more than flwr.app); the ClientApp fork server
    # pays it once, not per message
    entry = "import flwr.supernode.cli.flwr_clientapp"
    python_flower = _median_seconds(entry)
    clientapp = _median_seconds(f"{entry}, client.app")
    round_code = _median_seconds(f"{entry}, client.app, client.rounds")
    pieces = {"python_start_and_flower_import_s": python_flower}
    pieces["clientapp_module_import_s"] = clientapp - python_flower
    pieces["torch_and_round_code_import_s"] = round_code - clientapp
    site = SiteRuntime.from_state_dir(root)
    pieces["site_config_s"] = _timed(lambda: SiteRuntime.from_state_dir(root))
    pieces["site_data_s"] = _timed(lambda: (site.info, site.dataset("val")))
    model = site.build_model(spec)  # the first build also pays one-off lazy imports
    pieces["model_build_s"] = _timed(lambda: site.build_model(spec))
    optimizer = torch.optim.Adam(model.parameters())  # Adam's moments, as a site keeps them
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()

    def write_state(runtime: SiteRuntime) -> None:  # what a training message writes
        runtime.save(model, server_round=1, run_id=0)
        runtime.store.save_optimizer(optimizer.state_dict(), server_round=1)

    write_state(site)
    pieces["state_write_s"] = _timed(lambda: write_state(site))
    # the site worker's store: the reply waits only for a copy, the disk write runs behind it
    behind = SiteRuntime.from_state_dir(root, write_behind=True)
    pieces["state_write_behind_s"] = _timed(lambda: write_state(behind))
    behind.store.flush()
    site.forget_saved_state()
    pieces["state_read_s"] = (
        _timed(lambda: (site.build_model(spec), site.store.load_optimizer()))
        - pieces["model_build_s"]
    )
    return pieces


def direct_round_seconds(preset: str, cases: int, root: Path) -> float:
    """The same epoch + evaluation without Flower, in one warm process (data built, imports
    done): the work a round must do whoever runs it."""
    from client.site import SiteRuntime
    from server.config import RunConfig

    _open_site(preset, cases, root)
    site = SiteRuntime.from_state_dir(root)
    spec = RunConfig(preset=preset).model_spec()
    times = []
    for server_round in (1, 2, 3, 4):
        start = time.perf_counter()
        model = site.build_model(spec)
        site.train(model, local_epochs=1, lr=1e-4, seed=0)
        site.save(model, server_round=server_round, run_id=0)
        site.evaluate(model)
        times.append(time.perf_counter() - start)
    # the first also pays one-off lazy imports and allocations; the median of the others,
    # since one busy moment of the machine moved a single measurement by 3 s (paper preset)
    return statistics.median(times[1:])


def federated_round_seconds(
    preset: str,
    cases: int,
    root: Path,
    *,
    site_overrides: Sequence[str] = (),
    run_overrides: dict[str, object] | None = None,
    sites: int = 1,
    rounds: int = 3,
    secure: bool = False,
    light_cases: int | None = None,
) -> list[float]:
    """Real rounds (flower-superlink, ``python -m client`` per site, ``flwr run``): the
    server's own time of each round (train + evaluate of every site, ``metrics.jsonl``).
    ``light_cases``: every site but the first trains on this many cases instead."""
    from tests.federation.deploy import Deployment

    deployment = Deployment(root)
    # sites sharing this machine's cores take one thread each (README, Deploy); one site all
    threads = "threads=1" if sites > 1 else "threads=null"
    try:
        deployment.start_superlink(limit=3600)
        for index in range(sites):
            site_cases = cases if index == 0 or light_cases is None else light_cases
            overrides = [*_site_overrides(preset, site_cases), *site_overrides, threads]
            deployment.start_site("synthetic_a", *overrides, name=f"site{index}", limit=3600)
        deployment.wait_online(sites, timeout=600)
        out_dir = root / "out"
        run_config = {
            "num-server-rounds": rounds,
            "min-available-nodes": sites,
            "min-train-nodes": sites,
            "min-evaluate-nodes": sites,
            "preset": preset,
            "lr": 1e-4,
            "out-dir": str(out_dir),
            **(run_overrides or {}),
        }
        if secure:
            run_config.update({"secure-aggregation": True, "secagg-max-weight": float(cases)})
        result = deployment.run(run_config, timeout=3600)
        if result.returncode:
            raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
        records = [
            json.loads(line)
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
        for record in records:  # a round a site sat out is quick, and says nothing of its cost
            trained = len(record.get("train_sites") or {})
            if record.get("dropped") or record.get("evaluate_dropped") or trained != sites:
                raise RuntimeError(
                    f"round {record.get('round')}: {trained} of {sites} sites trained; dropped "
                    f"{record.get('dropped')}, evaluation dropped {record.get('evaluate_dropped')}"
                )
        return [float(record["seconds"]) for record in records]
    finally:
        deployment.stop()


def _steady_state(round_times: list[float]) -> float:
    """Mean round time without the first round (which also installs the app bundle) and,
    from three rounds on, the last: a round's record is written once its evaluation is in,
    which with ``evaluate-in-training`` comes after the next round's training, so the first
    round's time holds two trainings and the last one's none."""
    steady = round_times[1:-1] if len(round_times) >= 3 else round_times[1:]
    return statistics.mean(steady or round_times)


#: The settings compared, as (site overrides, run-config overrides): the default (site worker,
#: ClientApp processes forked from the fork server, SuperNode polling every 0.5 s when idle,
#: float16 training replies and downloads, evaluations done by the next round's training
#: message), ClientApp processes started by Flower (a fresh interpreter each), Flower's own 3 s
#: idle wait, float32 replies (the weights themselves), float32 training messages, evaluation
#: messages that carry the weights and are evaluated on their own, and no site worker.
OVERHEAD_VARIANTS: dict[str, tuple[tuple[str, ...], dict[str, object]]] = {
    "worker": ((), {}),
    "worker_no_fork": (("supernode.fork_clientapp=false",), {}),
    "worker_flower_idle_wait": (("supernode.idle_poll_s=null",), {}),
    "worker_float32_replies": ((), {"update-precision": "float32"}),
    "worker_float32_downloads": ((), {"download-precision": "float32"}),
    "worker_eval_message_weights": ((), {"evaluate-in-training": False}),
    "no_worker": (("supernode.worker=false",), {}),
}


def overhead(
    preset: str, cases: int, rounds: int, variants: Sequence[str] = tuple(OVERHEAD_VARIANTS)
) -> dict[str, object]:
    """Fixed cost per message = (a federated round - the same work done directly) / 2, a round
    being two messages (train, evaluate); steady rounds only (:func:`_steady_state`), for each
    of ``variants`` (:data:`OVERHEAD_VARIANTS`; ``worker`` always)."""
    chosen = ["worker", *(name for name in variants if name != "worker")]
    with tempfile.TemporaryDirectory() as tmp:
        breakdown = message_breakdown(preset, cases, Path(tmp) / "pieces")
        direct = direct_round_seconds(preset, cases, Path(tmp) / "direct")
        round_times = {
            name: federated_round_seconds(
                preset,
                cases,
                Path(tmp) / name,
                site_overrides=OVERHEAD_VARIANTS[name][0],
                run_overrides=OVERHEAD_VARIANTS[name][1],
                rounds=rounds,
            )
            for name in chosen
        }
    per_message = {name: (_steady_state(times) - direct) / 2 for name, times in round_times.items()}
    return {
        "preset": preset,
        "cases": cases,
        "direct_seconds": direct,
        "round_seconds": round_times,
        "overhead_per_message_s": per_message["worker"],
        "overhead_per_message_s_no_fork": per_message.get("worker_no_fork"),
        "overhead_per_message_s_flower_idle_wait": per_message.get("worker_flower_idle_wait"),
        "overhead_per_message_s_float32_replies": per_message.get("worker_float32_replies"),
        "overhead_per_message_s_float32_downloads": per_message.get("worker_float32_downloads"),
        "overhead_per_message_s_eval_message_weights": per_message.get(
            "worker_eval_message_weights"
        ),
        "overhead_per_message_s_without_worker": per_message.get("no_worker"),
        "breakdown_without_worker_s": breakdown,
    }


def _seconds(value: object) -> str:
    return "not measured" if value is None else f"{value:.1f} s"


#: SecAgg+ settings measured against the plain round: ours (the defaults), then each thing
#: done ahead turned off in turn.
SECURE_VARIANTS: dict[str, dict[str, object]] = {
    "secure": {},
    "secure_setup_every_round": {"secagg-keys-ahead": False},
    "secure_flower_protocol": {"secagg-keys-ahead": False, "secagg-train-ahead": False},
}


def secure_aggregation_cost(
    cases: int, rounds: int, light_cases: int | None = None
) -> dict[str, object]:
    """SecAgg+ against a plain round, three tiny sites with ``cases`` training cases each
    (``light_cases``: the second and third site this many) and their workers; SecAgg+ as we
    run it (three round trips a round, the sites training during the key exchange), with a
    setup stage every round (``secagg-keys-ahead=false``: four round trips) and as Flower's
    protocol is (also ``secagg-train-ahead=false``: the weights with the third stage)."""
    settings: dict[str, dict[str, object] | None] = {"plain": None, **SECURE_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        times = {
            name: federated_round_seconds(
                "tiny",
                cases,
                Path(tmp) / name,
                sites=3,
                rounds=rounds,
                secure=extra is not None,
                run_overrides=extra,
                light_cases=light_cases,
            )
            for name, extra in settings.items()
        }
    later = {name: _steady_state(t) for name, t in times.items()}
    return {
        "cases": cases,
        "light_site_cases": light_cases,
        "round_seconds": times,
        **{f"{name}_over_plain": later[name] / later["plain"] for name in SECURE_VARIANTS},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"], choices=list(IMAGE_SIZE))
    parser.add_argument("--cases", type=positive_int, default=16, help="training cases of the site")
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="federated rounds per measurement"
    )
    parser.add_argument(
        "--secagg-cases",
        type=positive_int,
        nargs="+",
        default=None,
        help="training cases per site of each SecAgg+ measurement (default: --cases)",
    )
    parser.add_argument(
        "--secagg-light-cases",
        type=positive_int,
        default=None,
        help="SecAgg+: the second and third site train on this many cases (one busy site and "
        "two light ones leave this machine a core for each busy process, as when every site "
        "has its own machine); default: all three train on --secagg-cases",
    )
    parser.add_argument(
        "--skip-overhead", action="store_true", help="no fixed-cost-per-message measurement"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(OVERHEAD_VARIANTS),
        choices=list(OVERHEAD_VARIANTS),
        metavar="NAME",
        help="site settings whose fixed cost is measured (default: all): "
        f"{', '.join(OVERHEAD_VARIANTS)}; worker, the default setting, always",
    )
    parser.add_argument("--skip-secagg", action="store_true", help="no SecAgg+ measurement")
    parser.add_argument("--out", default=str(RESULTS_DIR / "federation.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    payload = [payload_bytes(p) for p in args.presets]
    for row in payload:
        print(
            f"{row['preset']:6} full model {row['full_model_bytes'] / 2**20:.1f} MiB, shared "
            f"payload {row['shared_payload_bytes'] / 2**20:.1f} MiB "
            f"({row['shared_over_full']:.3f} of full), per round per client "
            f"{row['bytes_per_round_per_client'] / 2**20:.1f} MiB (float32 downloads "
            f"{row['bytes_per_round_per_client_float32_downloads'] / 2**20:.1f} MiB, float32 "
            f"replies {row['bytes_per_round_per_client_float32_replies'] / 2**20:.1f} MiB, both "
            f"{row['bytes_per_round_per_client_float32_both'] / 2**20:.1f} MiB, evaluation "
            "messages with the weights "
            f"{row['bytes_per_round_per_client_evaluation_weights'] / 2**20:.1f} MiB); "
            "with SCAFFOLD "
            f"{row['scaffold_bytes_per_round_per_client'] / 2**20:.1f} MiB "
            f"({row['scaffold_over_plain']:.2f}x)"
        )
    rows: list[dict[str, object]] = []
    secure: list[dict[str, object]] = []
    if not args.skip_overhead:
        for preset in args.presets:
            row = overhead(preset, args.cases, args.rounds, args.variants)
            rows.append(row)
            pieces = ", ".join(
                f"{k.removesuffix('_s')} {v:.2f}"
                for k, v in row["breakdown_without_worker_s"].items()  # type: ignore[union-attr]
            )
            print(
                f"{preset:6} {args.cases} cases: direct {row['direct_seconds']:.1f} s; fixed cost "
                f"per message {row['overhead_per_message_s']:.1f} s with the site worker, "
                f"{_seconds(row['overhead_per_message_s_no_fork'])} without the fork server, "
                f"{_seconds(row['overhead_per_message_s_flower_idle_wait'])} with it at "
                f"Flower's 3 s idle wait, {_seconds(row['overhead_per_message_s_float32_replies'])}"
                f" with float32 replies, "
                f"{_seconds(row['overhead_per_message_s_float32_downloads'])} with float32 "
                "downloads, "
                f"{_seconds(row['overhead_per_message_s_eval_message_weights'])} with evaluation "
                f"messages that carry the weights, "
                f"{_seconds(row['overhead_per_message_s_without_worker'])} without the worker\n"
                f"       without the worker, per message: {pieces} (s)"
            )
    for cases in [] if args.skip_secagg else args.secagg_cases or [args.cases]:
        secure.append(secure_aggregation_cost(cases, args.rounds, args.secagg_light_cases))
        light = args.secagg_light_cases
        sites = f"{cases} cases each" if light is None else f"{cases}, {light} and {light} cases"
        print(
            f"SecAgg+ round / plain round (3 tiny sites, {sites}): "
            f"{secure[-1]['secure_over_plain']:.2f}; with a setup stage every round "
            f"(secagg-keys-ahead=false) {secure[-1]['secure_setup_every_round_over_plain']:.2f}"
            "; as Flower's protocol (also secagg-train-ahead=false) "
            f"{secure[-1]['secure_flower_protocol_over_plain']:.2f}"
        )
    write_json(args.out, {"payload": payload, "overhead": rows, "secure_aggregation": secure})


if __name__ == "__main__":
    main()
