"""What federation costs: bytes on the wire per round, and Flower's time overhead.

``python -m benchmarks.federation [--presets tiny paper] [--cases 16] [--skip-overhead]``

* bytes: per client and round the site downloads and uploads the packed shared weights;
  compared with sending the full model (shared + rater heads), for M = 7 raters.
* overhead: one real federated round (flower-superlink + one SuperNode started with
  ``python -m client``, ``flwr run``; 1 local epoch + evaluation) against the same epoch and
  evaluation run directly with ``train_epoch`` / ``evaluate`` in one process, on the same
  synthetic site. The round time is the server's own measurement (``metrics.jsonl``).

Results: ``benchmarks/results/federation.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mrprism_core.federated import PACKED_KEY, StateLayout
from mrprism_core.models import build_model, split_state

from .common import RESULTS_DIR, write_json

IMAGE_SIZE = {"tiny": 64, "paper": 256}
BATCH = {"tiny": 8, "paper": 2}


def payload_bytes(preset: str, raters: int = 7) -> dict[str, float]:
    from flwr.app import ArrayRecord

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
    record = ArrayRecord({PACKED_KEY: layout.pack(shared)})
    full = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    shared_bytes = record.count_bytes()
    return {
        "preset": preset,
        "raters": raters,
        "full_model_bytes": full,
        "shared_payload_bytes": shared_bytes,
        "local_bytes_kept_at_site": sum(v.numel() * v.element_size() for v in local.values()),
        "bytes_per_round_per_client": 2 * shared_bytes,  # download + upload
        "shared_over_full": shared_bytes / full,
    }


def _site_overrides(preset: str, cases: int) -> list[str]:
    return [
        f"data.image_size={IMAGE_SIZE[preset]}",
        f"data.splits.train={cases}",
        f"data.splits.val={max(2, cases // 4)}",
        f"train.batch_size={BATCH[preset]}",
        "device=cpu",
    ]


def direct_round_seconds(preset: str, cases: int, root: Path) -> float:
    """The same epoch + evaluation without Flower, in one process."""
    from omegaconf import OmegaConf

    from client.site import SiteRuntime, compose_site_config
    from client.state import SiteStore
    from server.config import RunConfig

    cfg = compose_site_config("synthetic_a", _site_overrides(preset, cases))
    SiteStore(root).write_config(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    site = SiteRuntime.from_state_dir(root)
    spec = RunConfig(preset=preset).model_spec()
    start = time.perf_counter()
    model = site.build_model(spec)
    site.train(model, local_epochs=1, lr=1e-4, seed=0)
    site.save(model, server_round=1, run_id=0)
    site.evaluate(model)
    return time.perf_counter() - start


def federated_round_seconds(preset: str, cases: int, root: Path) -> float:
    from tests.federation.deploy import Deployment

    deployment = Deployment(root)
    try:
        deployment.start_superlink(limit=3600)
        deployment.start_site("synthetic_a", *_site_overrides(preset, cases), limit=3600)
        deployment.wait_online(1)
        out_dir = root / "out"
        result = deployment.run(
            {
                "num-server-rounds": 1,
                "min-available-nodes": 1,
                "min-train-nodes": 1,
                "min-evaluate-nodes": 1,
                "preset": preset,
                "lr": 1e-4,
                "out-dir": str(out_dir),
            },
            timeout=3600,
        )
        if result.returncode:
            raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
        record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
        return float(record["seconds"])
    finally:
        deployment.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"], choices=list(IMAGE_SIZE))
    parser.add_argument("--cases", type=int, default=16, help="training cases of the site")
    parser.add_argument("--skip-overhead", action="store_true", help="bytes only")
    parser.add_argument("--out", default=str(RESULTS_DIR / "federation.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    payload = [payload_bytes(p) for p in args.presets]
    for row in payload:
        print(
            f"{row['preset']:6} full model {row['full_model_bytes'] / 2**20:.1f} MiB, shared "
            f"payload {row['shared_payload_bytes'] / 2**20:.1f} MiB "
            f"({row['shared_over_full']:.3f} of full), per round per client "
            f"{row['bytes_per_round_per_client'] / 2**20:.1f} MiB"
        )
    overhead = []
    if not args.skip_overhead:
        for preset in args.presets:
            with tempfile.TemporaryDirectory() as tmp:
                direct = direct_round_seconds(preset, args.cases, Path(tmp) / "direct")
                federated = federated_round_seconds(preset, args.cases, Path(tmp) / "fed")
            row = {
                "preset": preset,
                "cases": args.cases,
                "direct_seconds": direct,
                "federated_round_seconds": federated,
                "overhead_fraction": (federated - direct) / direct,
            }
            overhead.append(row)
            print(
                f"{preset:6} {args.cases} cases: direct {direct:.1f} s, federated round "
                f"{federated:.1f} s, overhead {100 * row['overhead_fraction']:.1f} %"
            )
    write_json(args.out, {"payload": payload, "overhead": overhead})


if __name__ == "__main__":
    main()
