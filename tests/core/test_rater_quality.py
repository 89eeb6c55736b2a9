"""The rater report's statistics and the bounded annotation-quality score, on raters whose
habits are planted in synthetic data (their dilation, erosion, skipped structures known)."""

from __future__ import annotations

import math

import pytest
import torch

from mrprism_core.data.synthetic import RaterProfile, make_dataset
from mrprism_core.federated import aggregation_weights
from mrprism_core.rater_quality import QUALITY_FLOOR, assess_raters, bounded_quality
from mrprism_core.rater_report import rank_correlation, write_rater_report
from mrprism_core.train import make_loader

EXPERT = RaterProfile(bias=0.0, boundary_noise=0.02)
PLANTED = [
    EXPERT,
    RaterProfile(bias=0.2, boundary_noise=0.02),  # dilates
    RaterProfile(bias=-0.2, boundary_noise=0.02),  # erodes
    RaterProfile(bias=0.0, boundary_noise=0.02, miss_rate=1.0),  # never draws the cup
    EXPERT,
]


def _loader(profiles, cases=8):
    data = make_dataset(cases, len(profiles), 32, seed=3, rater_profiles=profiles)
    return make_loader(data, 4, shuffle=False)


def test_planted_habits_are_named_with_the_right_sign(tmp_path):
    assessment = assess_raters(None, _loader(PLANTED))  # consensus: the majority vote
    row = {(r.rater, r.class_name): r for r in assessment.rows}
    for k in ("class 0", "class 1"):
        assert row[(1, k)].area_bias > 10 and row[(1, k)].area_bias_px > 0  # over-segments
        assert row[(2, k)].area_bias < -10 and row[(2, k)].area_bias_px < 0  # under-segments
        assert row[(0, k)].agreement_dice > max(
            row[(1, k)].agreement_dice, row[(2, k)].agreement_dice
        )
        # the dilating rater marks the ring around the structure, the eroding one misses its rim
        assert row[(1, k)].observed_specificity < 0.95 < row[(1, k)].observed_sensitivity
        assert row[(2, k)].observed_sensitivity < 0.95 < row[(2, k)].observed_specificity
    # the skipped cup: every case it is in the consensus, the rater drew nothing
    assert row[(3, "class 1")].empty_rate == 1.0 and row[(3, "class 1")].agreement_dice == 0.0
    assert row[(3, "class 0")].empty_rate == 0.0 and row[(0, "class 1")].empty_rate == 0.0
    # the worst cases of the rater who never draws the cup are shown worst first
    worst = assessment.worst_cases[(3, 1)]
    assert len(worst) == 5 and all(case.departure == 1.0 for case in worst)
    assert assessment.quality < 1.0

    written = write_rater_report(assessment, tmp_path, "planted", "train")
    names = {path.name for path in written}
    assert {"raters.json", "raters.md", "disagreement.png", "difficulty.png"} <= names
    assert {f"departures_rater{m}.png" for m in range(5)} <= names
    text = (tmp_path / "raters.md").read_text()
    assert "class 1: lowest agreement rater 3" in text


def test_identical_raters_get_the_top_score_and_every_score_is_bounded():
    data = make_dataset(8, 1, 32, seed=3)
    copies = [{**item, "raters": item["raters"].repeat(3, 1, 1, 1)} for item in data]
    assessment = assess_raters(None, make_loader(copies, 4, shuffle=False))
    for rater in assessment.rows:
        assert rater.agreement_dice == 1.0 and rater.area_bias == 0.0
    assert assessment.quality == 1.0
    # planted poor raters lower it
    assert assess_raters(None, _loader(PLANTED)).quality < 0.95
    assert bounded_quality(-3.0) == QUALITY_FLOOR and bounded_quality(7.0) == 1.0
    assert bounded_quality(float("nan")) == QUALITY_FLOOR


def test_aggregation_weights_equal_scores_change_nothing_and_claims_are_clipped():
    examples = [10, 30, 60]
    weights, _ = aggregation_weights(examples, [0.8, 0.8, 0.8], "examples*quality")
    assert [w / sum(weights) for w in weights] == pytest.approx([0.1, 0.3, 0.6])
    weights, used = aggregation_weights(examples, [1.0, 0.5, 50.0], "examples*quality")
    assert used == [1.0, 0.5, 1.0]  # a site cannot claim more than 1
    assert weights == pytest.approx([10.0, 15.0, 60.0])
    weights, used = aggregation_weights(examples, [0.9, None, 0.5], "quality")
    assert used == pytest.approx([0.9, 0.7, 0.5])  # the silent site gets the others' median
    assert weights == used
    weights, _ = aggregation_weights(examples, [None, None, None], "examples*quality")
    assert weights == [10.0, 30.0, 60.0]  # nobody shared: FedAvg
    with pytest.raises(ValueError, match="unknown aggregation-weight 'best'"):
        aggregation_weights(examples, [1.0] * 3, "best")


def test_rank_correlation_of_known_series():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(x, x * 10) == pytest.approx(1.0)
    assert rank_correlation(x, -x) == pytest.approx(-1.0)
    assert math.isnan(rank_correlation(x[:2], x[:2]))
