"""``full_resolution_width``: a full-resolution image branch that every decoder's last stage
reads (our option, off by default)."""

from __future__ import annotations

import pytest
import torch

from mrprism_core.metrics import dice_per_image
from mrprism_core.models import build_model, model_from_build_args
from mrprism_core.models.encoder import ResNetEncoder


def _model(name: str, width: int, channels: int = 3, classes: int = 2):
    return build_model(
        name,
        in_channels=channels,
        num_classes=classes,
        num_raters=3,
        image_size=32,
        preset="tiny",
        full_resolution_width=width,
    )


def test_the_encoder_returns_a_full_resolution_map_first_only_when_asked():
    images = torch.randn(2, 3, 32, 32)
    plain = ResNetEncoder(3, 8, (8, 16, 32, 64), (1, 1, 1, 1))
    wide = ResNetEncoder(3, 8, (8, 16, 32, 64), (1, 1, 1, 1), full_resolution_width=4)
    assert [f.shape[-1] for f in plain(images)] == [16, 8, 4, 2, 1]
    assert [f.shape[-1] for f in wide(images)] == [32, 16, 8, 4, 2, 1]
    assert wide.channels == [4, *plain.channels] and wide(images)[0].shape[1] == 4


@pytest.mark.parametrize("name", ["mrprism", "dpersona", "unet_mv"])
def test_off_by_default_and_when_on_the_output_depends_on_the_branch(name):
    plain = _model(name, 0)
    assert not any("full_resolution" in n for n, _ in plain.named_parameters())
    model = _model(name, 4).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(images).calibrated
        for parameter_name, parameter in model.named_parameters():
            if "encoder.full_resolution." in parameter_name:
                parameter.zero_()  # the branch's map is all zeros from here
        after = model(images).calibrated
    assert not torch.allclose(before, after, atol=1e-6)  # the decoder reads the branch
    rebuilt = model_from_build_args(model.build_args)  # a checkpoint rebuilds it
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(images).calibrated, after)


def test_the_branch_carries_one_pixel_detail_to_unseen_images():
    # the label is the sign of the image pixel by pixel: detail finer than the stem's
    # half-resolution map, which is all the decoder's last stage reads without the branch
    train = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    test = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = {"image": train, "raters": (train > 0).float()[:, None].expand(4, 3, 1, 32, 32)}
    dice = {}
    for width in (0, 8):
        torch.manual_seed(0)
        model = _model("unet_mv", width, channels=1, classes=1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):
            optimizer.zero_grad()
            model.loss(batch)[0].backward()
            optimizer.step()
        with torch.no_grad():
            prob = model.eval()(test).calibrated
        dice[width] = float(dice_per_image(prob > 0.5, test > 0).mean())
    assert dice[8] > dice[0] + 0.05, dice
