from __future__ import annotations

import itertools

import pytest
import torch

from mrprism_core.fusion import Reliability, shuffle_raters
from mrprism_core.losses import multihead_loss, random_permutations, shuffle_loss, ssim_loss


def test_ssim_loss_zero_for_identical_maps_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.rand(2, 2, 32, 32)
    assert ssim_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.rand(2, 2, 32, 32)
    assert ssim_loss(a, b).item() > 0.5


def _rater_tensors(seed: int = 0, raters: int = 4):
    """Rater masks z~, labels z and per-rater reliabilities that differ between raters."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(2, raters, 1, 8, 8, generator=generator)
    labels = (torch.rand(2, raters, 1, 8, 8, generator=generator) > 0.5).float()
    levels = torch.linspace(0.55, 0.95, raters).view(1, raters, 1, 1, 1)
    reliability = Reliability(
        levels.expand_as(probs).clone(), levels.flip(1).expand_as(probs).clone()
    )
    return reliability, probs, labels


def test_shuffle_loss_changes_with_the_permutation_and_is_not_the_multihead_loss():
    reliability, probs, labels = _rater_tensors(1)
    identity = torch.arange(4).view(1, 4)
    values = {
        tuple(p.tolist()): shuffle_loss(reliability, probs, labels, p.view(1, 4)).item()
        for p in torch.tensor(list(itertools.permutations(range(4))))
    }
    assert max(values.values()) - min(values.values()) > 0.02  # the pairing matters
    unshuffled = shuffle_loss(reliability, probs, labels, identity).item()
    assert unshuffled != pytest.approx(multihead_loss(probs, labels).item(), rel=1e-3)


def test_shuffle_loss_invariant_to_joint_rater_permutation():
    reliability, probs, labels = _rater_tensors()
    perms = random_permutations(4, 3, torch.Generator().manual_seed(1))
    sigma = torch.tensor([2, 0, 3, 1])
    inverse = torch.argsort(sigma)
    base = shuffle_loss(reliability, probs, labels, perms)
    # relabelling the raters by sigma maps every shuffle pi to sigma^-1 . pi . sigma
    conjugated = torch.stack([inverse[p[sigma]] for p in perms])
    moved = shuffle_loss(
        reliability.permute(sigma),
        shuffle_raters(probs, sigma),
        shuffle_raters(labels, sigma),
        conjugated,
    )
    assert moved.item() == pytest.approx(base.item(), rel=1e-5)


def test_shuffle_loss_prefers_heads_that_match_their_raters():
    reliability, _, labels = _rater_tensors(3)
    perms = random_permutations(4, 3, torch.Generator().manual_seed(0))
    matching = labels * 0.8 + 0.1  # each head on the right side of 0.5 for its rater
    swapped = shuffle_raters(matching, torch.tensor([1, 0, 3, 2]))
    assert shuffle_loss(reliability, matching, labels, perms) < shuffle_loss(
        reliability, swapped, labels, perms
    )


def test_shuffle_loss_trains_masks_and_reliabilities():
    reliability, probs, labels = _rater_tensors(5)
    probs.requires_grad_(True)
    reliability.sensitivity.requires_grad_(True)
    shuffle_loss(reliability, probs, labels, random_permutations(4, 3)).backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0  # through the threshold
    assert reliability.sensitivity.grad.abs().sum() > 0


def test_multihead_loss_is_cross_entropy_per_rater():
    labels = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1, 1)
    probs = torch.tensor([0.8, 0.3]).view(1, 2, 1, 1, 1)
    expected = -(torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.7))) / 2
    assert multihead_loss(probs, labels).item() == pytest.approx(expected.item(), rel=1e-6)
