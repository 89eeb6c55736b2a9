"""The baselines: they learn, fuse labels as their papers say, and keep their per-rater parts
at the site."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mrprism_core.data import make_dataset
from mrprism_core.fusion import Reliability, majority_vote, staple
from mrprism_core.label_fusion import label_fusion_dice
from mrprism_core.models import DiagnosisNotAvailable, build_model, split_state
from mrprism_core.models.diff import diagnosis_first_fusion
from mrprism_core.models.mrnet import SoftAttention

BASELINES = ("unet_mv", "unet_staple", "multihead_unet", "mrnet", "dpersona", "diff")
# what each model keeps at the site: exactly its parts that belong to named raters
LOCAL_PARTS = {
    "unet_mv": set(),
    "unet_staple": set(),
    "diff": set(),
    "multihead_unet": {"rater_heads"},
    "mrnet": {"expertise", "mrm_expertise", "reconstruction_heads"},
    "dpersona": {"projection_heads"},
    "mrprism": {"confidence", "divp"},
}


@pytest.fixture(scope="module")
def batch():
    return next(iter(DataLoader(make_dataset(8, 3, 32, seed=3), batch_size=8)))


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_lowers_its_loss_on_a_tiny_batch(name, batch):
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, num_classes=2, num_raters=3, image_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = model.backward(batch)
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses
    model.eval()
    with torch.no_grad():
        out = model(batch["image"])
    assert out.calibrated.shape == (8, 2, 32, 32)
    assert float(out.calibrated.min()) >= 0.0 and float(out.calibrated.max()) <= 1.0
    if LOCAL_PARTS[name]:  # models with per-rater parts give one output per rater
        assert out.raters.shape == (8, 3, 2, 32, 32)


@pytest.mark.parametrize("name", sorted(LOCAL_PARTS))
def test_site_local_state_is_exactly_the_per_rater_parts(name):
    shapes = {}
    for raters in (3, 5):
        model = build_model(name, in_channels=1, num_classes=1, num_raters=raters, image_size=32)
        shared, local = split_state(model)
        assert {key.split(".")[0] for key in local} == LOCAL_PARTS[name]
        shapes[raters] = {k: tuple(v.shape) for k, v in shared.items()}
    # nothing sized by the rater count is shared: sites with 3 and 5 raters can aggregate
    assert shapes[3] == shapes[5]


def test_majority_vote_of_identical_masks_is_that_mask():
    mask = (torch.rand(1, 1, 2, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    for count in (1, 3, 5):
        labels = mask.expand(-1, count, -1, -1, -1)
        assert torch.equal(majority_vote(labels), mask[:, 0])
        assert torch.equal(staple(labels), mask[:, 0])


def _noisy(truth: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    flips = torch.rand(truth.shape, generator=torch.Generator().manual_seed(seed)) < rate
    return torch.where(flips, 1 - truth, truth)


def test_staple_recovers_the_truth_better_than_the_worst_rater():
    truth = torch.zeros(48, 48)
    truth[10:38, 12:40] = 1
    raters = [truth, _noisy(truth, 0.10, 1), _noisy(truth, 0.25, 2), _noisy(truth, 0.30, 3)]
    labels = torch.stack(raters)[None, :, None]
    fused = staple(labels)[0, 0]
    errors = [int((r != truth).sum()) for r in raters]
    assert int((fused != truth).sum()) < max(errors)
    assert int((fused != truth).sum()) < 0.5 * errors[1]  # better than the best noisy rater


def test_label_fusion_dice_scores_each_fusion_against_the_truth():
    truth = torch.zeros(1, 1, 32, 32)
    truth[..., 8:24, 8:24] = 1
    wrong = torch.zeros_like(truth)
    labels = torch.stack([truth, truth, wrong], dim=1)  # (1, 3, 1, H, W)
    scores = label_fusion_dice(labels, truth)
    assert scores == pytest.approx({"majority_vote": 1.0, "staple": 1.0})

    # DivP finds the third rater reliable and the first two barely better than chance: the
    # empty third mask outweighs them; with the reliabilities swapped the majority wins
    def reliability(levels: list[float]) -> Reliability:
        level = torch.tensor(levels).view(1, 3, 1, 1, 1).expand(1, 3, 1, 32, 32)
        return Reliability(level, level)

    masks = torch.full((1, 3, 1, 32, 32), 0.99)  # DivP's own masks: structure everywhere
    trusts_third = label_fusion_dice(labels, truth, reliability([0.6, 0.6, 0.99]), masks)
    trusts_pair = label_fusion_dice(labels, truth, reliability([0.99, 0.99, 0.6]), masks)
    assert trusts_third["divp_fusion"] == 0.0 and trusts_pair["divp_fusion"] == 1.0
    # self-fusion ignores the raters' masks: DivP's own structure everywhere
    assert trusts_pair["divp_self_fusion"] == pytest.approx(2 * 256 / (1024 + 256))


def test_diagnosis_first_fusion_picks_the_raters_that_explain_the_diagnosis():
    small = torch.zeros(1, 1, 32, 32)
    small[..., 12:20, 12:20] = 1
    large = torch.zeros(1, 1, 32, 32)
    large[..., 6:26, 6:26] = 1
    masks = torch.stack([small, large], dim=1)  # (1, M=2, K=1, H, W)
    images = torch.zeros(1, 1, 32, 32)

    def diagnose(x: torch.Tensor) -> torch.Tensor:  # a large structure means "diseased"
        return 40 * x[:, -1].mean(dim=(1, 2)) - 8

    uniform = masks.mean(dim=1).sum()
    diseased = diagnosis_first_fusion(diagnose, images, masks, torch.ones(1), steps=10)
    healthy = diagnosis_first_fusion(diagnose, images, masks, torch.zeros(1), steps=10)
    assert diseased.sum() > uniform > healthy.sum()
    assert float(diseased.max()) <= 1.0 and float(healthy.min()) >= 0.0


def test_diff_refuses_data_without_a_diagnosis(batch):
    model = build_model("diff", in_channels=3, num_classes=2, num_raters=3, image_size=32)
    plain = {k: v for k, v in batch.items() if k != "diagnosis"}
    with pytest.raises(DiagnosisNotAvailable, match="not applicable"):
        model.loss(plain)


def test_mrnet_soft_attention_widens_and_never_lowers_the_map():
    attention = torch.zeros(1, 1, 32, 32)
    attention[..., 16, 16] = 1.0
    soft = SoftAttention(kernel=9, sigma=2.0)(attention)
    assert torch.all(soft >= attention)
    assert int((soft > 1e-3).sum()) > 20  # spread beyond the single pixel


def test_unet_staple_learns_the_staple_estimate_computed_once_per_case():
    batch = next(iter(DataLoader(make_dataset(8, 4, 32, seed=3), batch_size=8)))
    model = build_model("unet_staple", in_channels=3, num_classes=2, num_raters=4, image_size=32)
    expected = staple(batch["raters"])
    assert not torch.equal(expected, majority_vote(batch["raters"]))  # a different target
    assert torch.equal(model.target(batch), expected)
    # the second epoch reads the cached targets, even if the masks were (wrongly) changed
    assert torch.equal(
        model.target({**batch, "raters": torch.zeros_like(batch["raters"])}), expected
    )
