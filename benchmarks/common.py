"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from mrprism_core.metrics import spread as spread  # the benchmarks' mean and spread

RESULTS_DIR = Path("benchmarks/results")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the machine description) and echo where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return path


def simulation_config(overrides: list[str]) -> dict[str, Any]:
    """The simulation config (``site_configs/simulation.yaml``) with Hydra ``overrides``."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("site_configs", version_base="1.3"):
        cfg = compose("simulation", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
