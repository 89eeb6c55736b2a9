"""MrPrism's self-calibration does something: DivP learns reliabilities that move the fused
target away from the vote where raters disagree, and ConP learns a small structure."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import default_collate

from mrprism_core.data.synthetic import ImageStyle, RaterProfile, make_dataset
from mrprism_core.fusion import fuse
from mrprism_core.losses import binary_cross_entropy
from mrprism_core.models import build_model, split_state


def _train(model, batch, steps: int, lr: float = 3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model.backward(batch)
        optimizer.step()
    model.eval()
    return model


def _multihead_mrprism(num_raters: int, **options):
    """A tiny one-class MrPrism for 3-channel 32 px images, trained with the multi-head term."""
    return build_model(
        "mrprism",
        in_channels=3,
        num_classes=1,
        num_raters=num_raters,
        image_size=32,
        preset="tiny",
        divp_supervision="shuffle+multihead",
        **options,
    )


def _batch(dataset, count: int) -> dict:
    return default_collate([dataset[i] for i in range(count)])


def test_divp_learns_which_rater_over_draws_and_the_fusion_leaves_the_raters_mean():
    torch.manual_seed(0)
    # one steady expert and two raters who dilate by different amounts: they disagree on rings
    raters = [
        RaterProfile(bias=0.0, boundary_noise=0.0),
        RaterProfile(bias=0.25, boundary_noise=0.0),
        RaterProfile(bias=0.12, boundary_noise=0.0),
    ]
    data = make_dataset(4, 3, 32, seed=3, num_classes=1, rater_profiles=raters)
    batch = _batch(data, 4)
    labels = batch["raters"]
    model = _multihead_mrprism(num_raters=3)
    disagree = (labels.amax(1) != labels.amin(1)).float()
    assert disagree.sum() > 50

    def specificity_where_they_disagree() -> list[float]:
        with torch.no_grad():
            q = model(batch["image"]).reliability.specificity
        return [float((q[:, m] * disagree).sum() / disagree.sum()) for m in range(3)]

    expert, wide, _ = specificity_where_they_disagree()
    assert abs(expert - wide) < 0.1  # DivP starts without an opinion
    _train(model, batch, steps=60)
    expert, wide, _ = specificity_where_they_disagree()
    assert expert > wide + 0.1  # the widest rater draws where the structure is not
    with torch.no_grad():
        fused = fuse(model(batch["image"]).reliability, labels)
    mean = labels.mean(1)
    assert float(((fused - mean).abs() * disagree).sum() / disagree.sum()) > 0.05
    # where every rater agrees the fusion keeps their label
    agree = 1 - disagree
    assert float((((fused > 0.5).float() - labels[:, 0]).abs() * agree).sum()) == 0.0


def _nodule_batch() -> dict:
    style = ImageStyle(channels=1, structure="nodule", vessels=2, nodule_radius=(0.07, 0.1))
    raters = [RaterProfile(bias=b, boundary_noise=0.02) for b in (0.0, 0.1, -0.1, 0.05)]
    data = make_dataset(2, 4, 64, seed=5, num_classes=1, style=style, rater_profiles=raters)
    return _batch(data, 2)


def _calibrated_peak_on_the_structure(pixel_loss: str) -> float:
    torch.manual_seed(0)
    batch = _nodule_batch()
    assert float(batch["truth"].mean()) < 0.04  # a small structure in an empty background
    model = build_model(
        "mrprism",
        in_channels=1,
        num_classes=1,
        num_raters=4,
        image_size=64,
        preset="tiny",
        conp_pixel_loss=pixel_loss,
    )
    _train(model, batch, steps=50)
    with torch.no_grad():
        calibrated = model(batch["image"]).calibrated
    # the smallest peak over the images, inside each image's true structure
    inside = calibrated.masked_fill(batch["truth"] == 0, 0.0)
    return float(inside.flatten(1).amax(1).min())


def test_conp_learns_a_small_structure_that_ssim_alone_leaves_empty():
    assert _calibrated_peak_on_the_structure("dice") > 0.5
    assert _calibrated_peak_on_the_structure("none") < 0.5


def _contrast_dependent_batch() -> dict:
    # an expert, and a rater who draws much wider on low-contrast images only: how wide that
    # rater draws is in the image, not in the calibrated mask
    raters = [
        RaterProfile(bias=0.0, boundary_noise=0.0),
        RaterProfile(bias=0.0, boundary_noise=0.0, low_contrast_bias=0.4),
    ]
    style = ImageStyle(contrast_range=(0.2, 1.0))
    data = make_dataset(8, 2, 32, seed=11, num_classes=1, style=style, rater_profiles=raters)
    return _batch(data, 8)


def _pixel_heads_model(context: bool):
    torch.manual_seed(0)
    return _multihead_mrprism(num_raters=2, divp_pixel_context=context)


def test_pixel_context_moves_the_rater_masks_only_and_stays_at_the_site():
    batch = _contrast_dependent_batch()
    model = _pixel_heads_model(True).eval()
    with torch.no_grad():
        before = model(batch["image"])
        for parameter in model.divp.heads.pixel_context.out.parameters():
            parameter.normal_(0.0, 0.5)
        after = model(batch["image"])
    # it starts at zero: the masks are exactly those the reliabilities imply
    torch.testing.assert_close(
        before.raters, before.reliability.rater_probabilities(before.calibrated)
    )
    # once it has weights the masks move, but neither the calibrated mask nor the
    # reliabilities the fusions use do
    assert float((after.raters - before.raters).abs().mean()) > 0.05
    torch.testing.assert_close(after.calibrated, before.calibrated)
    torch.testing.assert_close(after.reliability.specificity, before.reliability.specificity)
    shared, local = split_state(model)
    assert any(".pixel_context." in key for key in local)
    assert not any("pixel_context" in key for key in shared)


def test_pixel_context_fits_a_rater_whose_habit_depends_on_the_image():
    batch = _contrast_dependent_batch()
    labels = batch["raters"]
    assert float((labels[:, 1] - labels[:, 0]).abs().sum()) > 100  # the rater does draw wider

    def rater_error(context: bool) -> float:
        model = _train(_pixel_heads_model(context), batch, steps=40)
        with torch.no_grad():
            masks = model(batch["image"]).raters
        return float(binary_cross_entropy(masks[:, 1], labels[:, 1]))

    plain, with_context = rater_error(False), rater_error(True)
    assert with_context < 0.8 * plain


def test_rater_mask_losses_reach_the_reliabilities_at_the_configured_share_only():
    from mrprism_core.fusion import initial_reliability
    from mrprism_core.losses import multihead_loss

    batch = _contrast_dependent_batch()
    labels = batch["raters"]

    def gradients(share: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = _pixel_heads_model(True)
        model.loss_config = replace(model.loss_config, rater_mask_reliability_grad=share)
        with torch.no_grad():  # a pixel correction that is not zero, so it has a gradient
            model.divp.heads.pixel_context.out.weight.normal_(0.0, 0.1)
        start = initial_reliability(2, tuple(labels.shape[2:])).expand_as(labels)
        _, _, masks = model.recurrence(model.encoder(batch["image"]), start)
        multihead_loss(masks, labels).backward()
        heads = model.divp.heads
        return masks.detach(), heads.to_pixels.weight.grad, heads.pixel_context.out.weight.grad

    masks_all, reliability_all, correction_all = gradients(1.0)
    masks_tenth, reliability_tenth, correction_tenth = gradients(0.1)
    assert float(reliability_all.abs().sum()) > 0
    torch.testing.assert_close(masks_tenth, masks_all)  # the masks themselves do not change
    torch.testing.assert_close(reliability_tenth, 0.1 * reliability_all)
    torch.testing.assert_close(correction_tenth, correction_all)
    assert float(gradients(0.0)[1].abs().sum()) == 0.0
