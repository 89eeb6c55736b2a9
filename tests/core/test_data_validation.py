"""A site's data is checked before training: each problem stops with a message naming the file;
a good tree gives a summary with the raters' agreement."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.site import SiteRuntime
from client.site_config import SiteDataError
from tests.core.data_trees import write_nifti, write_refuge
from tests.core.test_readers import lidc_xml, write_lidc_series

REFUGE = {
    "kind": "refuge",
    "num_raters": 3,
    "classes": ["disc", "cup"],
    "num_classes": 2,
    "image_size": 32,
}


def _check(tmp_path: Path, data: dict) -> object:
    site = SiteRuntime({"site": "hospital", "state_dir": str(tmp_path / "state"), "data": data})
    return site.check()


def _refuge(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "refuge"
    write_refuge(root, {"Training-400": 3, "Validation-400": 1}, size=(40, 48))
    return root / "Training-400", {**REFUGE, "root": str(root)}


def _fails(tmp_path: Path, data: dict, *needles: str) -> str:
    with pytest.raises(SiteDataError) as info:
        _check(tmp_path, data)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_rater_mask_is_named(tmp_path):
    train, data = _refuge(tmp_path)
    missing = train / "Tr0001" / "Tr0001_seg_cup_2.png"
    missing.unlink()
    _fails(tmp_path, data, str(missing), "missing rater mask")


def test_rater_count_different_from_the_config(tmp_path):
    train, data = _refuge(tmp_path)
    _fails(tmp_path, {**data, "num_raters": 4}, str(train / "Tr0000"), "3 raters", "num_raters=4")


def test_mask_and_image_size_mismatches(tmp_path):
    train, data = _refuge(tmp_path)
    wrong_mask = train / "Tr0002" / "Tr0002_seg_disc_3.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(wrong_mask)
    _fails(tmp_path, data, str(wrong_mask), "mask size (40, 40)")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(wrong_mask)
    wrong_photo = train / "Tr0000" / "Tr0000.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(wrong_photo)
    _fails(tmp_path, data, str(wrong_photo), "image size (30, 30)")


def test_non_binary_mask_values(tmp_path):
    train, data = _refuge(tmp_path)
    grey = train / "Tr0001" / "Tr0001_seg_disc_1.png"
    values = np.zeros((40, 48), np.uint8)
    values[10:20, 10:20], values[20:30, 20:30] = 128, 255
    Image.fromarray(values).save(grey)
    _fails(tmp_path, data, str(grey), "non-binary mask values", "128")


def test_unreadable_photograph(tmp_path):
    train, data = _refuge(tmp_path)
    broken = train / "Tr0000" / "Tr0000.png"
    broken.write_bytes(broken.read_bytes()[:60])
    _fails(tmp_path, data, str(broken), "not a readable PNG/JPEG")


def test_truncated_nifti(tmp_path):
    case = tmp_path / "qubiq" / "kidney" / "case01"
    write_nifti(case / "image.nii.gz", np.zeros((32, 32), np.float32))
    rng = np.random.default_rng(0)
    for rater in (1, 2):
        mask = (rng.random((32, 32)) > 0.5).astype(np.uint8)
        write_nifti(case / f"task01_seg{rater:02d}.nii.gz", mask)
    truncated = case / "task01_seg02.nii.gz"
    content = truncated.read_bytes()
    truncated.write_bytes(content[: len(content) // 2])
    data = {
        "kind": "qubiq",
        "root": str(tmp_path / "qubiq"),
        "task": "kidney",
        "num_raters": 2,
        "image_size": 32,
        "split_fractions": {"train": 1},
    }
    _fails(tmp_path, data, str(truncated), "truncated NIfTI")


def test_truncated_dicom(tmp_path):
    series = tmp_path / "lidc" / "LIDC-IDRI-0002" / "s" / "x"
    slices = write_lidc_series(series, depth=2)
    contour = [(40, 40), (60, 40), (60, 60), (40, 60)]
    (series / "1.xml").write_text(lidc_xml([[[(slices[0].SOPInstanceUID, -75.0, contour)]]]))
    truncated = series / "000.dcm"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    data = {
        "kind": "lidc",
        "root": str(tmp_path / "lidc"),
        "num_raters": 4,
        "crop_size": 32,
        "image_size": 32,
        "split_fractions": {"train": 1},
    }
    _fails(tmp_path, data, str(truncated), "DICOM")


def test_empty_data_set_and_missing_root(tmp_path):
    (tmp_path / "refuge" / "Training-400").mkdir(parents=True)
    _fails(tmp_path, {**REFUGE, "root": str(tmp_path / "refuge")}, "empty data set")
    _fails(tmp_path, {**REFUGE, "root": str(tmp_path / "nowhere")}, "nowhere", "does not exist")


def test_split_overlap_in_a_manifest(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "cases.csv").write_text(
        "id,split,image,rater1\none,train,a.png,m.png\ntwo,test,a.png,m.png\n"
    )
    data = {
        "kind": "manifest",
        "manifest": str(tmp_path / "cases.csv"),
        "num_raters": 1,
        "image_size": 32,
    }
    _fails(tmp_path, data, "split overlap", str(tmp_path / "a.png"), "train", "test")


def _expected_agreement(written: dict, cases: list[str], name: str) -> float:
    scores = []
    for case in cases:
        for a, b in itertools.combinations(range(3), 2):
            x, y = written[case][(a, name)].astype(bool), written[case][(b, name)].astype(bool)
            scores.append(2 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


def test_check_summary_reports_splits_and_rater_agreement(tmp_path):
    root = tmp_path / "refuge"
    written = write_refuge(root, {"Training-400": 3, "Test-400": 2}, size=(32, 32))
    data = {**REFUGE, "root": str(root)}
    summary = _check(tmp_path, data)
    text = "\n".join(summary.lines())
    assert "train 3, test 2" in text
    disc = _expected_agreement(written, ["Tr0000", "Tr0001", "Tr0002"], "disc")
    cup = _expected_agreement(written, ["Tr0000", "Tr0001", "Tr0002"], "cup")
    assert 0.5 < cup < 1.0 and 0.5 < disc < 1.0 and abs(cup - disc) > 0.01
    assert f"disc {disc:.3f}, cup {cup:.3f}" in text


def test_client_check_command_on_a_refuge_tree(tmp_path):
    root = tmp_path / "refuge"
    write_refuge(root, {"Training-400": 2}, num_raters=7, size=(32, 32))
    command = [
        sys.executable,
        "-m",
        "client",
        "--site",
        "refuge",
        "--check",
        f"data.root={root}",
        "data.image_size=32",
        f"state_dir={tmp_path / 'state'}",
    ]
    good = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "cases:       train 2" in good.stdout and "raters:      7" in good.stdout
    assert "mean pairwise rater Dice (train): disc" in good.stdout
    assert len(list((tmp_path / "state" / "data_cache").glob("*.image.npy"))) == 2
    (root / "Training-400" / "Tr0001" / "Tr0001_seg_disc_7.png").unlink()
    bad = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Tr0001_seg_disc_7.png: missing rater mask" in bad.stderr
    assert "Traceback" not in bad.stderr
