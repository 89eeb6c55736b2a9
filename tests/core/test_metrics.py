from __future__ import annotations

import math

import pytest
import torch

from mrprism_core.metrics import (
    MetricAccumulator,
    dice_per_image,
    dice_vs_truth,
    expected_calibration_error,
    generalized_energy_distance,
    per_rater_dice,
    soft_dice,
)


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), len(rows[0]))


def test_dice_of_a_known_pair():
    a = _mask([[1, 1, 0, 0]])
    b = _mask([[1, 0, 1, 0]])
    assert dice_per_image(a, b).item() == pytest.approx(2 * 1 / (2 + 2))
    empty = _mask([[0, 0, 0, 0]])
    assert dice_per_image(empty, empty).item() == 1.0
    assert dice_per_image(a, empty).item() == 0.0


def test_soft_dice_matches_hand_computation():
    # 4 raters on a 1x4 image: soft truth = [1, 0.75, 0.25, 0]
    raters = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32
    ).view(1, 4, 1, 1, 4)
    prob = torch.tensor([0.95, 0.6, 0.2, 0.05]).view(1, 1, 1, 4)
    # thresholds 0.1, 0.3, 0.5, 0.7, 0.9 (strict >):
    # t=0.1: pred {0,1,2} truth {0,1,2}      -> 1
    # t=0.3: pred {0,1}   truth {0,1}        -> 1
    # t=0.5: pred {0,1}   truth {0,1}        -> 1
    # t=0.7: pred {0}     truth {0,1}        -> 2/3
    # t=0.9: pred {0}     truth {0}          -> 1
    expected = (1 + 1 + 1 + 2 / 3 + 1) / 5
    assert soft_dice(prob, raters) == pytest.approx(expected)


def test_soft_dice_is_one_for_the_soft_truth_itself_and_validates_shapes():
    raters = (torch.rand(2, 5, 2, 8, 8) > 0.5).float()
    assert soft_dice(raters.mean(dim=1), raters) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        soft_dice(torch.rand(2, 2, 8, 8), torch.rand(2, 5, 2, 4, 4))


def test_per_rater_dice_scores_each_head_against_its_rater():
    labels = torch.zeros(1, 2, 1, 1, 4)
    labels[0, 0, 0, 0, :2] = 1
    labels[0, 1, 0, 0, 2:] = 1
    probs = labels.clone()
    probs[0, 1, 0, 0, 3] = 0.2  # head 2 misses one of its two pixels
    scores = per_rater_dice(probs, labels)
    assert scores[0, 0].item() == pytest.approx(1.0)
    assert scores[0, 1].item() == pytest.approx(2 * 1 / (1 + 2))


def test_ged_zero_for_identical_sets_and_known_value():
    labels = (torch.rand(1, 3, 1, 6, 6) > 0.5).float()
    assert generalized_energy_distance(labels, labels).item() == pytest.approx(0.0, abs=1e-6)
    # one rater {0,1}; prediction {1,2}: d = 1 - 1/3; within-set distances 0
    a = torch.tensor([1.0, 1, 0]).view(1, 1, 1, 1, 3)
    b = torch.tensor([0.0, 1, 1]).view(1, 1, 1, 1, 3)
    assert generalized_energy_distance(b, a).item() == pytest.approx(2 * (2 / 3))


def test_ece_known_value():
    prob = torch.tensor([0.95, 0.95, 0.15, 0.15])
    truth = torch.tensor([1.0, 0.5, 0.0, 0.0])
    # bin 9: mean prob 0.95 vs mean truth 0.75 (2 px); bin 1: 0.15 vs 0 (2 px)
    assert expected_calibration_error(prob, truth) == pytest.approx((2 * 0.2 + 2 * 0.15) / 4)


def test_dice_vs_truth():
    truth = _mask([[1, 1, 0, 0]])
    assert dice_vs_truth(truth * 0.9, truth).item() == pytest.approx(1.0)


def test_accumulator_equals_batch_functions_and_weights_by_images():
    torch.manual_seed(0)
    raters = (torch.rand(4, 3, 2, 8, 8) > 0.5).float()
    prob = torch.rand(4, 2, 8, 8)
    rater_probs = torch.rand(4, 3, 2, 8, 8)
    acc = MetricAccumulator()
    acc.update(prob[:1], raters[:1], rater_probs=rater_probs[:1])
    acc.update(prob[1:], raters[1:], rater_probs=rater_probs[1:])
    result = acc.compute()
    assert result["num_examples"] == 4
    assert result["soft_dice"] == pytest.approx(soft_dice(prob, raters), rel=1e-6)
    assert result["ged"] == pytest.approx(
        generalized_energy_distance(rater_probs, raters).mean().item(), rel=1e-6
    )
    assert result["ece"] == pytest.approx(
        expected_calibration_error(prob, raters.mean(dim=1)), rel=1e-6
    )
    assert len(result["per_rater_dice"]) == 3
    assert result["dice_vs_truth"] is None
    assert not math.isnan(result["ece"])


def _rater_batch() -> dict:
    from torch.utils.data import default_collate

    from mrprism_core.data.synthetic import make_dataset

    data = make_dataset(4, 3, 32, seed=2, num_classes=2)
    return default_collate([data[i] for i in range(4)])


def _heads_mean_soft_dice(rater_probs: torch.Tensor, batch: dict) -> float | None:
    metrics = MetricAccumulator()
    calibrated = torch.zeros_like(batch["raters"][:, 0])
    metrics.update(calibrated, batch["raters"], rater_probs=rater_probs)
    return metrics.compute()["heads_mean_soft_dice"]


def test_the_mean_of_the_raters_own_masks_scores_one_and_a_wrong_rater_lowers_it():
    # soft Dice of the mean of the rater outputs: what D-Persona's own soft Dice is
    batch = _rater_batch()
    labels = batch["raters"]
    assert _heads_mean_soft_dice(labels, batch) == 1.0
    wrong = labels.clone()
    wrong[:, 1] = 1.0 - wrong[:, 1]
    assert _heads_mean_soft_dice(wrong, batch) < 0.9


def test_heads_mean_soft_dice_is_dpersonas_soft_dice_and_none_without_rater_outputs():
    from mrprism_core.models import build_model
    from mrprism_core.train import evaluate

    torch.manual_seed(0)
    batch = _rater_batch()
    common = {"in_channels": 3, "num_classes": 2, "num_raters": 3, "image_size": 32}
    result = evaluate(build_model("dpersona", **common), [batch])
    assert abs(result["heads_mean_soft_dice"] - result["soft_dice"]) < 1e-6
    assert evaluate(build_model("unet_mv", **common), [batch])["heads_mean_soft_dice"] is None


def test_the_true_masks_soft_dice_is_below_one_when_raters_share_an_error():
    from benchmarks.quality import true_mask_soft_dice

    truth = torch.zeros(1, 1, 8, 8)
    truth[..., 2:6, 2:6] = 1  # 16 pixels
    dilated = torch.zeros_like(truth)
    dilated[..., 1:7, 1:7] = 1  # 36 pixels
    # two of three raters dilate: the raters' mean is 2/3 on the 20-pixel ring
    case = {"truth": truth[0], "raters": torch.stack([truth[0], dilated[0], dilated[0]])}
    # thresholds 0.1, 0.3, 0.5 see 36 raters' pixels (Dice 2*16/52), 0.7 and 0.9 see 16 (1)
    expected = (3 * 32 / 52 + 2 * 1.0) / 5
    assert true_mask_soft_dice([case, case]) == pytest.approx(expected)
    unanimous = {"truth": truth[0], "raters": torch.stack([truth[0]] * 3)}
    assert true_mask_soft_dice([unanimous]) == pytest.approx(1.0)
    assert true_mask_soft_dice([{"raters": unanimous["raters"]}]) is None
