"""Shared fixtures: tiny synthetic batches and models (CPU only)."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import default_collate

from mrprism_core.data import make_dataset
from mrprism_core.models import build_model

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test workers share the cores: one compute thread each (and for the sites and
    # simulations they start, which inherit the variable), or their thread pools contend
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def tiny_batch() -> dict:
    dataset = make_dataset(4, 3, 32, seed=7)
    return default_collate([dataset[i] for i in range(len(dataset))])


@pytest.fixture
def tiny_mrprism():
    torch.manual_seed(0)
    return build_model(
        "mrprism", in_channels=3, num_classes=2, num_raters=3, image_size=32, preset="tiny"
    )
