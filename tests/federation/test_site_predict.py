"""Prediction at a site with its own personalised model: files in the input's format and
geometry, a calibrated mask that beats chance against the truth, uncertainty on the edges,
bad inputs reported and skipped, and the same code path for central checkpoints."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image
from pydicom.data import get_testdata_file

from client.app import create_client_app
from mrprism_core.checkpoint import save_checkpoint
from mrprism_core.data.synthetic import make_dataset
from mrprism_core.predict import main as predict_main
from server.config import RunConfig

from .conftest import node_context, train_message
from .deploy import PROJECT_ROOT


def _client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
    )  # fmt: skip


def _write_cases(folder: Path, count: int = 3) -> list[np.ndarray]:
    """Synthetic cases from synthetic_a's image style at 64 px, cropped to 64 x 48 so the
    output size differs from the model's (32) and is not square; returns their true masks."""
    from client.site_config import compose_site_config

    style = compose_site_config("synthetic_a")["data"]["style"]
    from mrprism_core.data.synthetic import ImageStyle

    cases = make_dataset(count, 3, 64, seed=77, style=ImageStyle(**style))
    folder.mkdir(parents=True)
    truths = []
    for i in range(count):
        sample = cases[i]
        image = sample["image"][:, :, 8:56]
        low, high = image.amin(dim=(1, 2), keepdim=True), image.amax(dim=(1, 2), keepdim=True)
        pixels = ((image - low) / (high - low) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"case{i}.png")
        truths.append(sample["truth"][:, :, 8:56].numpy())
    return truths


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a * b).sum() / max(a.sum() + b.sum(), 1))


def test_site_predicts_pngs_at_input_size_beating_chance(trained_site, tmp_path):
    truths = _write_cases(tmp_path / "new")
    (tmp_path / "new" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    result = _client(
        "--site", "synthetic_a", f"state_dir={trained_site}",
        "--predict", str(tmp_path / "new"), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # one case failed, the others were predicted
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr

    rows = {r["case"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["broken.png"]["status"].startswith("failed:")
    rng = np.random.default_rng(0)
    for i, truth in enumerate(truths):
        case = out / f"case{i}"
        assert rows[f"case{i}"]["status"] == "ok"
        names = {p.name for p in case.iterdir()}
        assert {"calibrated_class0.png", "uncertainty.png", "rater2_class1.png"} <= names
        mask = np.asarray(Image.open(case / "calibrated_class0.png")) > 127
        assert mask.shape == truth.shape[1:]  # the input's 64 x 48, not the model's 32 x 32
        assert float(rows[f"case{i}"]["class0_pixels"]) == mask.sum()
        chance = _dice(rng.random(mask.shape) < 0.5, truth[0] > 0)
        assert _dice(mask, truth[0] > 0) > max(0.7, chance + 0.3)

        # the raters disagree on the disc's edge, not away from every edge
        uncertainty = np.asarray(Image.open(case / "uncertainty.png"), dtype=float)
        disc, cup = (torch.from_numpy(t > 0).float()[None, None] for t in truth)

        def grow(mask, px):
            return F.max_pool2d(mask, 2 * px + 1, 1, px)[0, 0].numpy() > 0

        def shrink(mask, px):
            return -F.max_pool2d(-mask, 2 * px + 1, 1, px)[0, 0].numpy() > 0

        edge = grow(disc, 2) & ~shrink(disc, 2)
        ring = shrink(disc, 4) & ~grow(cup, 4)  # inside the disc, far from the cup too
        outside = ~grow(disc, 6)
        calm = ring | outside
        assert edge.sum() > 0 and calm.sum() > 0
        assert uncertainty[edge].mean() > uncertainty[calm].mean() + 20


def test_info_and_no_snapshot_are_clear(trained_site, tmp_path):
    info = _client("--site", "synthetic_a", f"state_dir={trained_site}", "--info")
    assert info.returncode == 0, info.stderr
    assert "round:       1" in info.stdout and "raters:      3" in info.stdout
    assert "classes:     2" in info.stdout
    empty = tmp_path / "fresh"
    none = _client(
        "--site", "synthetic_a", f"state_dir={empty}", "--predict", str(tmp_path), "--out", "x"
    )
    assert none.returncode == 2 and "no model yet" in none.stderr


def test_volumes_keep_their_geometry_and_central_checkpoints_share_the_path(
    make_site, task_identity, tmp_path
):
    state_dir = make_site("synthetic_b", "data.style.channels=1", "data.image_size=32")
    cfg = RunConfig(in_channels=1, model_options=json.dumps({"recurrences": 1}))
    reply = create_client_app()(train_message(cfg)[0], node_context(state_dir))
    assert not reply.has_error(), reply.error

    inputs = tmp_path / "in"
    inputs.mkdir()
    anatomical = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    shutil.copy(anatomical, inputs / "anatomical.nii")
    series = inputs / "mr_series"  # three slices of pydicom's MR sample, 0.8 mm apart
    series.mkdir()
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for k in range(3):
        position = [float(v) for v in source.ImagePositionPatient]
        source.ImagePositionPatient = [position[0], position[1], 6.6406 + 0.8 * k]
        source.InstanceNumber = k + 1
        source.SOPInstanceUID = f"{source.SOPInstanceUID.rsplit('.', 1)[0]}.{900 + k}"
        source.save_as(series / f"slice{2 - k}.dcm")  # written out of order on purpose

    site_out = tmp_path / "site_out"
    result = _client(
        "--site", "synthetic_b", f"state_dir={state_dir}", "data.style.channels=1",
        "--predict", str(inputs), "--out", str(site_out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr

    source_image = nib.load(str(anatomical))
    out = nib.load(str(site_out / "anatomical" / "calibrated_class0.nii.gz"))
    assert out.shape == source_image.shape
    assert np.allclose(out.affine, source_image.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}

    dicom = nib.load(str(site_out / "mr_series" / "rater1_class0.nii.gz"))
    assert dicom.shape == (64, 64, 3)
    # voxel (0,0,0) is the first slice's ImagePositionPatient, LPS turned into RAS
    assert np.allclose(dicom.affine[:3, 3], [83.9063, 91.2, 6.6406], atol=1e-3)
    # down the rows is the column direction (0, 1, 0) in LPS, i.e. -y in RAS; slices go +z
    assert np.allclose(dicom.affine[:3, 0], [0, -0.3125, 0], atol=1e-4)
    assert np.allclose(dicom.affine[:3, 1], [-0.3125, 0, 0], atol=1e-4)
    assert np.allclose(dicom.affine[:3, 2], [0, 0, 0.8], atol=1e-4)

    # the same weights as a central checkpoint give the same files
    from client.site import SiteRuntime

    model = SiteRuntime.from_state_dir(state_dir).personal_model()
    checkpoint = tmp_path / "central.pt"
    save_checkpoint(checkpoint, {"build_args": model.build_args, "model_state": model.state_dict()})
    central_out = tmp_path / "central_out"
    args = [str(inputs), "--checkpoint", str(checkpoint), "--out", str(central_out)]
    assert predict_main([*args, "--device", "cpu"]) == 0
    for name in ("anatomical/calibrated_class1.nii.gz", "mr_series/uncertainty.nii.gz"):
        a = np.asarray(nib.load(str(site_out / name)).dataobj)
        b = np.asarray(nib.load(str(central_out / name)).dataobj)
        assert np.allclose(a, b, atol=1e-5), name

    # --mirror: the mean of four mirrored passes, close to the plain prediction but not it
    mirrored_out = tmp_path / "mirrored_out"
    args = [str(inputs), "--checkpoint", str(checkpoint), "--out", str(mirrored_out)]
    assert predict_main([*args, "--device", "cpu", "--mirror"]) == 0
    name = "anatomical/uncertainty.nii.gz"
    plain = np.asarray(nib.load(str(central_out / name)).dataobj)
    mirrored = np.asarray(nib.load(str(mirrored_out / name)).dataobj)
    assert mirrored.shape == plain.shape and not np.allclose(mirrored, plain, atol=1e-3)
    assert np.corrcoef(mirrored.ravel(), plain.ravel())[0, 1] > 0.5

    # a colour photo for a grey-level model: reported in the summary, exit status 1
    colour = tmp_path / "colour"
    colour.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(colour / "photo.png")
    shutil.copy(anatomical, colour / "anatomical.nii")
    mixed_out = tmp_path / "mixed_out"
    args = [str(colour), "--checkpoint", str(checkpoint), "--out", str(mixed_out)]
    assert predict_main([*args, "--device", "cpu"]) == 1
    rows = {r["case"]: r for r in csv.DictReader((mixed_out / "summary.csv").open())}
    assert "3 channel(s), the model takes 1" in rows["photo.png"]["status"]
    assert rows["anatomical"]["status"] == "ok" and float(rows["anatomical"]["class0_mm3"]) >= 0
