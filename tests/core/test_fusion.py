from __future__ import annotations

import math

import pytest
import torch

from mrprism_core.fusion import (
    Reliability,
    fuse,
    initial_confidence,
    majority_vote,
    reliability_from_confidence,
    self_fuse,
    threshold,
)


def _pixel(values: list[float]) -> torch.Tensor:
    """M values at one pixel -> (1, M, 1, 1, 1)."""
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1, 1)


def _reliability(sensitivity: list[float], specificity: list[float]) -> Reliability:
    return Reliability(_pixel(sensitivity), _pixel(specificity))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_fuse_is_the_posterior_of_the_structure_given_the_votes():
    # raters 1, 2 draw the structure, rater 3 does not; Bayes by hand with prior 0.3
    s, q = [0.9, 0.6, 0.8], [0.7, 0.95, 0.6]
    on = 0.3 * s[0] * s[1] * (1 - s[2])  # P(y = 1) P(votes | y = 1)
    off = 0.7 * (1 - q[0]) * (1 - q[1]) * q[2]  # P(y = 0) P(votes | y = 0)
    fused = fuse(_reliability(s, q), _pixel([1, 1, 0]), prior=0.3)
    assert fused.item() == pytest.approx(on / (on + off), rel=1e-9)


def test_equal_reliabilities_give_the_vote():
    # every rater 0.75 reliable: each vote is worth logit(0.75) nats, so 2 against 1 is
    # sigmoid(logit(0.75)) = 0.75 and 3 against 1 is sigmoid(2 logit(0.75)) = 0.9
    equal = reliability_from_confidence(torch.full((1, 4, 1, 1, 1), 0.5, dtype=torch.float64))
    assert fuse(equal, _pixel([1, 1, 0, 1])).item() == pytest.approx(0.9)
    three = reliability_from_confidence(torch.full((1, 3, 1, 1, 1), 0.5, dtype=torch.float64))
    assert fuse(three, _pixel([1, 0, 1])).item() == pytest.approx(0.75)
    assert fuse(three, _pixel([0, 0, 1])).item() == pytest.approx(0.25)
    # a tie leaves the prior
    two = reliability_from_confidence(torch.full((1, 2, 1, 1, 1), 0.5, dtype=torch.float64))
    assert fuse(two, _pixel([1, 0])).item() == pytest.approx(0.5)


def test_unanimous_votes_keep_their_label_for_any_informative_raters():
    generator = torch.Generator().manual_seed(0)
    s = torch.rand(2, 5, 2, 4, 4, generator=generator, dtype=torch.float64) * 0.45 + 0.5
    q = torch.rand(2, 5, 2, 4, 4, generator=generator, dtype=torch.float64) * 0.45 + 0.5
    ones = torch.ones_like(s)
    assert bool((fuse(Reliability(s, q), ones) > 0.5).all())
    assert bool((fuse(Reliability(s, q), 0 * ones) < 0.5).all())


def test_a_less_reliable_rater_moves_the_fusion_toward_the_others_by_bayes():
    labels = _pixel([1, 1, 0])  # two say structure, the third says background
    base = fuse(_reliability([0.8, 0.8, 0.8], [0.8, 0.8, 0.8]), labels).item()
    assert base == pytest.approx(0.8)  # 2 - 1 votes of logit(0.8) each
    # the dissenter becomes less reliable (0.8 -> 0.6): its vote weighs logit(0.6) only
    lowered = fuse(_reliability([0.8, 0.8, 0.6], [0.8, 0.8, 0.6]), labels).item()
    expected = 1 / (1 + math.exp(-(2 * _logit(0.8) - _logit(0.6))))
    assert lowered == pytest.approx(expected, rel=1e-9) and lowered > base
    # a rater at chance (s + q = 1) says nothing at all
    silent = fuse(_reliability([0.8, 0.8, 0.3], [0.8, 0.8, 0.7]), labels).item()
    assert silent == pytest.approx(torch.sigmoid(torch.tensor(2 * _logit(0.8))).item())


def test_the_fusion_moves_when_the_reliabilities_move_and_is_not_the_raters_mean():
    # the raters' mean is 2/3 whatever DivP says; the posterior is not
    labels = _pixel([1, 1, 0])
    trusting_dissenter = fuse(_reliability([0.6, 0.6, 0.99], [0.6, 0.6, 0.99]), labels).item()
    trusting_majority = fuse(_reliability([0.99, 0.99, 0.6], [0.99, 0.99, 0.6]), labels).item()
    assert trusting_dissenter < 0.1 and trusting_majority > 0.99


def test_self_fusion_thresholds_the_rater_outputs():
    s, q = [0.9, 0.7, 0.8], [0.6, 0.9, 0.7]
    probs = _pixel([0.8, 0.7, 0.1])  # T(z~) = [1, 1, 0]
    reliability = _reliability(s, q)
    assert self_fuse(reliability, probs).item() == pytest.approx(
        fuse(reliability, _pixel([1, 1, 0])).item(), rel=1e-12
    )
    shuffled = reliability.permute(torch.tensor([2, 0, 1]))
    assert shuffled.sensitivity.flatten().tolist() == [0.8, 0.9, 0.7]
    on = 0.8 * 0.9 * (1 - 0.7)
    off = (1 - 0.7) * (1 - 0.6) * 0.9
    assert self_fuse(shuffled, probs).item() == pytest.approx(on / (on + off), rel=1e-9)


def test_rater_masks_follow_from_the_reliabilities():
    reliability = _reliability([0.9, 0.5], [0.8, 0.99])
    calibrated = torch.tensor([0.25], dtype=torch.float64).view(1, 1, 1, 1)
    masks = reliability.rater_probabilities(calibrated).flatten().tolist()
    assert masks == pytest.approx([0.9 * 0.25 + 0.2 * 0.75, 0.5 * 0.25 + 0.01 * 0.75])


def test_fusion_rejects_rater_count_mismatch():
    with pytest.raises(ValueError, match="rater count mismatch"):
        fuse(reliability_from_confidence(torch.rand(1, 3, 1, 2, 2)), torch.rand(1, 4, 1, 2, 2))


def test_majority_vote():
    mask = (torch.rand(2, 4, 4) > 0.5).float()
    identical = mask.unsqueeze(0).repeat(5, 1, 1, 1)
    assert torch.equal(majority_vote(identical), mask)
    labels = _pixel([1, 1, 0]).float()
    assert majority_vote(labels).item() == 1
    assert majority_vote(_pixel([1, 0]).float()).item() == 0  # a tie is not a majority


def test_straight_through_threshold_passes_gradient():
    x = torch.tensor([0.2, 0.7], requires_grad=True)
    y = threshold(x, straight_through=True)
    assert y.tolist() == [0.0, 1.0]
    (y * torch.tensor([3.0, 5.0])).sum().backward()
    assert x.grad.tolist() == [3.0, 5.0]
    assert threshold(torch.tensor([0.5])).item() == 0.0  # strictly greater than the level


def test_initial_confidence_follows_eq14():
    generator = torch.Generator().manual_seed(0)
    conf = initial_confidence(6, (2, 64, 64), generator=generator)
    assert conf.shape == (1, 6, 2, 64, 64)
    assert float(conf.min()) >= 0.99e-4 and float(conf.max()) <= 1.0
    # one psi per rater in [0.1, 0.9]; noise of std 0.2 around it
    means = conf.mean(dim=(0, 2, 3, 4))
    assert float(means.min()) > 0.05 and float(means.max()) < 0.95
    assert means.std() > 0.02  # raters really get different levels
    repeat = initial_confidence(6, (2, 64, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(conf, repeat)


def test_conp_is_given_the_whole_log_likelihood_table_of_a_vote():
    # a reliable (q = 0.99) and a very reliable (q = 0.999) rater: log q barely differs, the
    # wrong-vote entry log(1 - q) does, and it is what ConP needs to tell them apart
    maps = _reliability([0.9, 0.9], [0.99, 0.999]).log_confidence()
    assert maps.shape == (1, 2, 4, 1, 1)  # log s, log(1 - s), log q, log(1 - q) for K = 1
    expected = [[math.log(0.9), math.log(0.1), math.log(q), math.log(1 - q)] for q in (0.99, 0.999)]
    for rater, row in enumerate(expected):
        assert maps[0, rater, :, 0, 0].tolist() == pytest.approx(row, rel=1e-9)
    assert float(maps[0, 1, 3] - maps[0, 0, 3]) == pytest.approx(math.log(0.001 / 0.01), rel=1e-9)
    # the correct-vote entries alone (the reading before; an option for comparison)
    short = _reliability([0.9, 0.9], [0.99, 0.999]).log_confidence(whole_table=False)
    assert short[0, :, :, 0, 0].flatten().tolist() == pytest.approx(
        [value for row in expected for value in (row[0], row[2])], rel=1e-9
    )
