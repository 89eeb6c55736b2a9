"""How the simulation grows with the number of virtual sites: time per round and peak memory.

``python -m benchmarks.scale [--sites 50 100 200] [--rounds 2] [--cases 6]``

Each size runs ``python -m simulation.run preset=scale50`` in its own process with
``partition.num_sites`` set and the pooled set sized to ``--cases`` training cases per site
(32 px, 2 test cases per site), federated only. Time per round is the server's own
measurement (train + evaluate of every site, ``round_seconds`` in ``results.json``); peak
memory is the machine's used memory (``MemTotal - MemAvailable`` from ``/proc/meminfo``,
sampled every 0.2 s) above what it used just before the run, so the driver, Ray and its
workers all count. Results: ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mrprism_core.cli_types import positive_int

from .common import RESULTS_DIR, write_json


def used_memory_bytes() -> int:
    """Machine memory in use, as ``free`` counts it (Linux ``/proc/meminfo``)."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


class PeakMemory:
    """Samples :func:`used_memory_bytes` in a thread until stopped; keeps the maximum."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.baseline = used_memory_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, used_memory_bytes())

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_size(sites: int, rounds: int, cases: int, ray_address: str | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out_dir:
        command = [
            sys.executable,
            "-m",
            "simulation.run",
            "preset=scale50",
            f"out_dir={out_dir}",
            "progress=false",
            f"partition.num_sites={sites}",
            f"partition.data.splits.train={cases * sites}",
            f"partition.data.splits.test={2 * sites}",
            f"federation.rounds={rounds}",
        ]
        if ray_address:
            command.append(f"federation.ray_address={ray_address}")
        started = time.perf_counter()
        with PeakMemory() as memory:
            done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{sites} sites failed:\n{done.stderr[-3000:]}")
        result = json.loads((Path(out_dir) / "results.json").read_text())
    method = result["methods"]["federated"]
    return {
        "sites": sites,
        "completed_sites": len(method["sites"]),
        "round_seconds": method["round_seconds"],
        "total_seconds": seconds,
        "peak_memory_mb": (memory.peak - memory.baseline) / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=positive_int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--cases", type=positive_int, default=6, help="training cases per site")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster")
    parser.add_argument("--out", default=str(RESULTS_DIR / "scale.json"))
    args = parser.parse_args(argv)
    rows = []
    for sites in args.sites:
        row = run_size(sites, args.rounds, args.cases, args.ray_address)
        rounds = ", ".join(f"{s:.1f}" for s in row["round_seconds"])
        print(
            f"{sites:4d} sites: {row['completed_sites']} evaluated, rounds {rounds} s, "
            f"{row['total_seconds']:.0f} s in all, peak memory +{row['peak_memory_mb']:.0f} MB",
            flush=True,
        )
        rows.append(row)
    write_json(args.out, {"settings": vars(args), "sizes": rows})


if __name__ == "__main__":
    main()
