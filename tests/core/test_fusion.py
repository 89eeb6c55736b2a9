from __future__ import annotations

import pytest
import torch

from mrprism_core.fusion import (
    fuse,
    initial_confidence,
    majority_vote,
    self_fuse,
    shuffle_raters,
    threshold,
)


def _pixel(values: list[float]) -> torch.Tensor:
    """M values at one pixel -> (1, M, 1, 1, 1)."""
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1, 1)


def test_fuse_matches_hand_computed_value():
    # raters 1, 2 say foreground, rater 3 background; confidences 0.9, 0.6, 0.2
    confidence = _pixel([0.9, 0.6, 0.2])
    labels = _pixel([1, 1, 0])
    fg = 0.9 + 0.6  # sum of conf over foreground votes
    bg = 1 - 0.2  # sum of (1 - conf) over background votes
    prior = 0.01
    expected = (fg + prior) / (fg + bg + 2 * prior)
    assert fuse(confidence, labels, prior).item() == pytest.approx(expected, rel=1e-12)


def test_unanimous_pixels_keep_their_label_whatever_the_confidence():
    confidence = torch.rand(2, 5, 2, 4, 4, dtype=torch.float64) * 0.98 + 0.01
    ones = torch.ones_like(confidence)
    assert torch.allclose(fuse(confidence, ones, 0.0), torch.ones(2, 2, 4, 4, dtype=torch.float64))
    assert torch.allclose(
        fuse(confidence, 0 * ones, 0.0), torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    )


def test_prior_alone_gives_one_half():
    # no rater carries confidence for the label it drew: only p_u speaks
    assert fuse(_pixel([0.0, 1.0]), _pixel([1, 0]), 0.3).item() == pytest.approx(0.5)


def test_confident_rater_wins_a_disagreement():
    labels = _pixel([1, 0])
    assert fuse(_pixel([0.95, 0.5]), labels).item() > 0.5
    assert fuse(_pixel([0.5, 0.05]), labels).item() < 0.5


def test_self_fusion_thresholds_the_rater_outputs():
    probs = _pixel([0.8, 0.7, 0.1])
    # labels T(z~) = [1, 1, 0]; foreground 0.8 + 0.7, background 1 - 0.1
    expected = (1.5 + 1e-4) / (1.5 + 0.9 + 2e-4)
    assert self_fuse(probs).item() == pytest.approx(expected, rel=1e-9)
    shuffled = shuffle_raters(probs, torch.tensor([2, 0, 1]))
    expected_shuffled = (0.1 + 0.8 + 1e-4) / (0.1 + 0.8 + (1 - 0.7) + 2e-4)
    assert self_fuse(probs, confidence=shuffled).item() == pytest.approx(expected_shuffled)


def test_fusion_rejects_rater_count_mismatch():
    with pytest.raises(ValueError, match="rater count mismatch"):
        fuse(torch.rand(1, 3, 1, 2, 2), torch.rand(1, 4, 1, 2, 2))


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
