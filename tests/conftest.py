"""Shared fixtures: tiny synthetic batches and models (CPU only)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from mrprism_core.data import make_dataset
from mrprism_core.models import build_model


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
