"""``benchmarks.quality``'s soft Dice of a model's rater outputs, the number D-Persona's own
soft Dice is (its calibrated output is the mean of its rater outputs)."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from benchmarks.quality import heads_mean_soft_dice
from mrprism_core.data.synthetic import make_dataset
from mrprism_core.metrics import soft_dice
from mrprism_core.models import SegmentationModel, SegmentationOutput, build_model


def _batch() -> dict:
    data = make_dataset(4, 3, 32, seed=2, num_classes=2)
    return default_collate([data[i] for i in range(4)])


class _Replay(SegmentationModel):
    """Rater outputs fixed in advance: the test knows what their mean scores."""

    def __init__(self, raters: torch.Tensor) -> None:
        super().__init__({})
        self.raters = raters

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        return SegmentationOutput(calibrated=self.raters[:, 0] * 0, raters=self.raters)


def test_the_mean_of_the_raters_own_masks_scores_one_and_a_wrong_rater_lowers_it():
    batch = _batch()
    labels = batch["raters"]
    assert heads_mean_soft_dice(_Replay(labels), [batch]) == 1.0
    wrong = labels.clone()
    wrong[:, 1] = 1.0 - wrong[:, 1]
    assert heads_mean_soft_dice(_Replay(wrong), [batch]) < 0.9


def test_it_is_dpersonas_soft_dice_and_none_without_rater_outputs():
    torch.manual_seed(0)
    batch = _batch()
    common = {"in_channels": 3, "num_classes": 2, "num_raters": 3, "image_size": 32}
    dpersona = build_model("dpersona", **common).eval()
    with torch.no_grad():
        calibrated = dpersona(batch["image"]).calibrated
    expected = soft_dice(calibrated, batch["raters"])
    assert abs(heads_mean_soft_dice(dpersona, [batch]) - expected) < 1e-6
    assert heads_mean_soft_dice(build_model("unet_mv", **common), [batch]) is None
