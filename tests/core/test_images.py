"""Input readers for prediction: exact pixels and geometry from files the test writes, and a
clear error naming the file for every broken input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from mrprism_core.data.images import ImageReadError, find_inputs, read_case, standardize


def test_png_is_read_channels_first_and_standardised(tmp_path):
    pixels = (np.arange(6 * 10).reshape(6, 10) * 4).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([pixels, 255 - pixels, pixels // 2], -1)).save(tmp_path / "rgb.png")
    grey, rgb = read_case(tmp_path / "grey.png"), read_case(tmp_path / "rgb.png")
    assert grey.slices.shape == (1, 1, 6, 10) and rgb.slices.shape == (1, 3, 6, 10)
    expected = (pixels - pixels.mean()) / pixels.std(ddof=1)
    assert np.allclose(grey.slices[0, 0], expected, atol=1e-5)
    assert np.allclose(rgb.slices[0, 1], -expected, atol=1e-5)  # 255 - x standardises to -z
    assert grey.case_id == "grey" and grey.kind == "2d"


def test_nifti_slices_follow_the_third_axis(tmp_path):
    volume = np.random.default_rng(0).random((12, 9, 4)).astype(np.float32)
    affine = np.diag([0.5, 0.7, 3.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "vol.nii.gz")
    case = read_case(tmp_path / "vol.nii.gz")
    assert case.slices.shape == (4, 1, 12, 9) and case.case_id == "vol"
    assert np.allclose(case.slices[2, 0], standardize(volume[:, :, 2][None])[0], atol=1e-5)
    assert np.allclose(case.affine, affine) and np.allclose(case.spacing, (0.5, 0.7, 3.0))


def test_broken_inputs_name_the_file(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)), tmp_path / "ok.nii.gz")
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes((tmp_path / "ok.nii.gz").read_bytes()[:60])
    with pytest.raises(ImageReadError, match="cut.nii.gz: unreadable or truncated NIfTI"):
        read_case(truncated)
    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), series / "a.dcm")
    (series / "b.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(ImageReadError, match="b.dcm: unreadable or truncated DICOM"):
        read_case(series)
    (tmp_path / "notes.txt").write_text("hello")
    png = tmp_path / "bad.png"
    png.write_bytes(gzip.compress(b"nonsense"))
    with pytest.raises(ImageReadError, match="bad.png: not a readable PNG/JPEG"):
        read_case(png)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="no PNG/JPEG images, NIfTI files or DICOM"):
        find_inputs(empty)
    # a folder lists images, volumes and series, never other files
    found = {p.name for p in find_inputs(tmp_path)}
    assert found == {"ok.nii.gz", "cut.nii.gz", "bad.png", "series"}


def test_one_dicom_slice_reads_with_its_spacing(tmp_path):
    source = Path(get_testdata_file("MR_small.dcm"))
    case = read_case(source)
    reference = pydicom.dcmread(source)
    assert case.slices.shape == (1, 1, 64, 64) and case.kind == "dicom"
    assert case.spacing[:2] == (0.3125, 0.3125)
    assert np.allclose(case.affine[:3, 3], [83.9063, 91.2, 6.6406], atol=1e-3)
    assert np.allclose(
        case.slices[0, 0], standardize(reference.pixel_array.astype(np.float32)[None])[0], atol=1e-4
    )
