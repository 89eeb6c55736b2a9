"""Test-time mirroring: every output field is the mean of the four passes, each flipped back;
the centralized trainer scores its test split that way when asked, and prediction too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mrprism_core.data.factory import build_dataset
from mrprism_core.data.images import InputCase
from mrprism_core.fusion import Reliability
from mrprism_core.mirroring import mirrored_forward
from mrprism_core.models.base import SegmentationModel, SegmentationOutput
from mrprism_core.predict import predict_case
from mrprism_core.train import evaluate, fit, load_model, make_loader

from .test_train import _config


class Shifted(SegmentationModel):
    """Outputs that are the image moved by one pixel: not mirror-equivariant, so the mirrored
    passes differ from the plain one in a way worked out by hand."""

    def __init__(self, size: int) -> None:
        super().__init__({"in_channels": 1, "image_size": size})

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        right = torch.roll(images, 1, dims=-1)
        down = torch.roll(images, 1, dims=-2)
        return SegmentationOutput(
            calibrated=right,
            raters=torch.stack([right, down], dim=1),
            recurrences=[images, down],
            reliability=Reliability(down.unsqueeze(1), images.unsqueeze(1)),
        )


def _both_ways(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Mirroring along ``dim`` turns a shift by +1 into a shift by -1; the other axis's
    mirroring leaves it alone. So half the passes shift each way."""
    return (torch.roll(x, 1, dims=dim) + torch.roll(x, -1, dims=dim)) / 2


def test_each_field_is_the_mean_of_the_passes_flipped_back():
    images = torch.rand(2, 1, 6, 5, generator=torch.Generator().manual_seed(0))
    out = mirrored_forward(Shifted(6), images)
    right, down = _both_ways(images, -1), _both_ways(images, -2)
    assert torch.allclose(out.calibrated, right)
    assert torch.allclose(out.raters, torch.stack([right, down], dim=1))
    assert torch.allclose(out.recurrences[0], images)  # a pixel-wise output is unchanged
    assert torch.allclose(out.recurrences[1], down)
    assert isinstance(out.reliability, Reliability)
    assert torch.allclose(out.reliability.sensitivity, down.unsqueeze(1))
    assert torch.allclose(out.reliability.specificity, images.unsqueeze(1))
    assert not torch.allclose(out.calibrated, Shifted(6)(images).calibrated)


def test_prediction_mirrors_when_asked():
    slices = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    case = InputCase("case", Path("case.png"), "2d", slices)
    plain = predict_case(Shifted(8), case).calibrated
    mirrored = predict_case(Shifted(8), case, mirror=True).calibrated
    assert np.allclose(plain, np.roll(slices, 1, axis=-1), atol=1e-6)
    assert np.allclose(mirrored, _both_ways(torch.from_numpy(slices), -1).numpy(), atol=1e-6)


def test_fit_scores_the_test_split_mirrored_when_asked(tmp_path):
    cfg = _config(tmp_path, 1)
    cfg["train"]["test_mirroring"] = True
    results = fit(cfg)
    assert results["test_mirroring"] is True
    model, _ = load_model(tmp_path / "best.pt")
    loader = make_loader(build_dataset(cfg["data"], "test"), 4, shuffle=False)
    mirrored, plain = evaluate(model, loader, mirror=True), evaluate(model, loader)
    assert results["test"]["soft_dice"] == mirrored["soft_dice"]
    assert results["test"]["per_rater_dice"] == mirrored["per_rater_dice"]
    assert mirrored["soft_dice"] != plain["soft_dice"]
