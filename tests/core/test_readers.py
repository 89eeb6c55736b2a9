"""Each reader on a small tree in its release's layout: exact decoded pixels, rater order,
counts, splits; and the preprocessing cache."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from mrprism_core.data.cases import Case
from mrprism_core.data.factory import EmptySplitError, build_dataset
from mrprism_core.data.files import FileDataset
from mrprism_core.data.readers import masks_from_outlines
from tests.core.data_trees import disc_cup_masks, photo, write_nifti, write_refuge


def _by_id(dataset) -> dict[str, dict]:
    return {sample["id"]: sample for sample in (dataset[i] for i in range(len(dataset)))}


def test_refuge_gives_each_raters_disc_and_cup_in_order(tmp_path):
    written = write_refuge(tmp_path, {"Training-400": 3, "Test-400": 2}, size=(64, 64))
    cfg = {
        "kind": "refuge",
        "root": str(tmp_path),
        "num_raters": 3,
        "classes": ["disc", "cup"],
        "num_classes": 2,
        "image_size": 64,
    }
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (3, 2)
    with pytest.raises(EmptySplitError):  # no Validation-400 folder: allowed, just empty
        build_dataset(cfg, "val")
    samples = {**_by_id(train), **_by_id(test)}
    assert sorted(samples) == sorted(written)
    for case_id, masks in written.items():
        raters = samples[case_id]["raters"]
        assert raters.shape == (3, 2, 64, 64)
        for (rater, name), mask in masks.items():
            assert torch.equal(
                raters[rater, ["disc", "cup"].index(name)], torch.tensor(mask).float()
            )
    # rater order follows the file numbers: rater 1 drew the smallest disc
    areas = samples["Tr0000"]["raters"][:, 0].sum(dim=(1, 2))
    assert areas[0] < areas[1] < areas[2]
    image = samples["Tr0000"]["image"]
    assert image.shape == (3, 64, 64)
    assert torch.allclose(image.mean(dim=(1, 2)), torch.zeros(3), atol=1e-4)


def test_resizing_keeps_masks_binary_and_picks_nearest_pixels(tmp_path):
    write_refuge(tmp_path, {"Training-400": 1}, num_raters=1, size=(64, 64), photo_suffix=".jpg")
    case_dir = tmp_path / "Training-400" / "Tr0000"
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.uint8)  # 1 at odd (row + col)
    Image.fromarray(checker * 255).save(case_dir / "Tr0000_seg_disc_1.png")
    cfg = {"kind": "refuge", "root": str(tmp_path), "num_raters": 1, "image_size": 32}
    sample = build_dataset(cfg, "train")[0]
    # pixel-centre nearest neighbour samples source pixel 2i+1: (odd + odd) is even -> all 0
    assert torch.equal(sample["raters"][0, 0], torch.zeros(32, 32))
    assert set(sample["raters"].unique().tolist()) <= {0.0, 1.0}
    assert sample["image"].shape == (3, 32, 32)


def _outlined(plain: np.ndarray, disc_box, cup_box) -> np.ndarray:
    image = Image.fromarray(plain)
    draw = ImageDraw.Draw(image)
    draw.ellipse(disc_box, outline=(0, 255, 0), width=2)
    draw.ellipse(cup_box, outline=(0, 0, 255), width=2)
    return np.asarray(image)


def _filled(size, box) -> np.ndarray:
    canvas = Image.new("L", (size[1], size[0]), 0)
    ImageDraw.Draw(canvas).ellipse(box, fill=1)
    return np.asarray(canvas)


def test_riga_outlines_are_recovered_as_filled_disc_and_cup(tmp_path):
    size = (80, 96)
    plain = photo(size, 3)
    folder = tmp_path / "BinRushed" / "BinRushed1"
    folder.mkdir(parents=True)
    Image.fromarray(plain).save(folder / "image1prime.png")
    boxes = [((20, 10, 76, 70), (38, 28, 58, 50)), ((16, 6, 80, 74), (34, 24, 62, 54))]
    for rater, (disc_box, cup_box) in enumerate(boxes, start=1):
        Image.fromarray(_outlined(plain, disc_box, cup_box)).save(folder / f"image1-{rater}.png")
    cfg = {
        "kind": "riga",
        "root": str(tmp_path),
        "source": "binrushed",
        "num_raters": 2,
        "image_size": 96,
        "split_fractions": {"train": 1.0},
    }
    dataset = build_dataset(cfg, "train")
    assert len(dataset) == 1 and dataset[0]["id"] == "BinRushed1/image1"
    raw = dataset.cases[0].load()
    for rater, (disc_box, cup_box) in enumerate(boxes):
        for k, box in enumerate((disc_box, cup_box)):
            truth = _filled(size, box)
            recovered = raw.raters[0, rater, k]
            assert np.abs(recovered.astype(int) - truth).sum() <= 0.02 * truth.sum()
    # the function alone: no outline drawn -> a clear refusal
    with pytest.raises(ValueError, match="found 0 closed outline"):
        masks_from_outlines(plain.transpose(2, 0, 1), plain.transpose(2, 0, 1), where="x.png")


def test_riga_per_rater_mask_folders_are_read_like_refuge(tmp_path):
    written = write_refuge(tmp_path / "MESSIDOR", {"prepared": 4}, num_raters=2, size=(32, 32))
    cfg = {
        "kind": "riga",
        "root": str(tmp_path),
        "source": "MESSIDOR",
        "num_raters": 2,
        "image_size": 32,
        "split_fractions": {"train": 0.5, "test": 0.5},
        "split_seed": 1,
    }
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == len(test) == 2
    samples = {**_by_id(train), **_by_id(test)}
    for case_id, masks in written.items():
        assert torch.equal(
            samples[case_id]["raters"][1, 1], torch.tensor(masks[(1, "cup")]).float()
        )


def test_qubiq_subtasks_are_classes_and_volumes_are_sliced(tmp_path):
    rng = np.random.default_rng(0)
    task = tmp_path / "prostate"
    truth = {}
    for case, depth in (("case01", None), ("case02", 3)):
        shape = (32, 32) if depth is None else (32, 32, depth)
        write_nifti(
            task / case / "image.nii.gz",
            rng.normal(size=shape).astype(np.float32),
            (0.5, 0.6, 2.0)[: len(shape)],
        )
        for subtask in (1, 2):
            for rater in (1, 2, 3):
                mask = (rng.random(shape) > 0.5).astype(np.uint8)
                write_nifti(task / case / f"task{subtask:02d}_seg{rater:02d}.nii.gz", mask)
                truth[(case, subtask, rater)] = mask
    cfg = {
        "kind": "qubiq",
        "root": str(tmp_path),
        "task": "prostate",
        "subtasks": [1, 2],
        "num_raters": 3,
        "num_classes": 2,
        "image_size": 32,
        "split_fractions": {"train": 1},
    }
    dataset = build_dataset(cfg, "train")
    samples = _by_id(dataset)
    assert sorted(samples) == [
        "prostate/case01",
        *[f"prostate/case02/slice{z:03d}" for z in range(3)],
    ]
    assert torch.equal(
        samples["prostate/case01"]["raters"][2, 1], torch.tensor(truth[("case01", 2, 3)]).float()
    )
    for z in range(3):
        got = samples[f"prostate/case02/slice{z:03d}"]["raters"][0, 0]
        assert torch.equal(got, torch.tensor(truth[("case02", 1, 1)][..., z]).float())
    assert samples["prostate/case01"]["spacing"][:2].tolist() == pytest.approx([0.5, 0.6])


def test_brats_modalities_stack_as_channels_and_labels_map_to_nested_classes(tmp_path):
    case = tmp_path / "BraTS_001"
    rows = np.arange(32, dtype=np.float32)[:, None, None].repeat(32, 1).repeat(2, 2)
    write_nifti(case / "BraTS_001_t1.nii.gz", rows)  # varies along rows
    write_nifti(case / "BraTS_001_flair.nii.gz", rows.transpose(1, 0, 2).copy())  # along columns
    labels = np.zeros((32, 32, 2), dtype=np.uint8)
    labels[4:12, 4:12], labels[6:10, 6:10], labels[7:9, 7:9] = 2, 1, 4
    write_nifti(case / "BraTS_001_seg_1.nii.gz", labels)
    write_nifti(case / "BraTS_001_seg_2.nii.gz", np.where(labels == 4, 1, labels).astype(np.uint8))
    cfg = {
        "kind": "brats",
        "root": str(tmp_path),
        "modalities": ["t1", "flair"],
        "num_raters": 2,
        "labels": {"whole": [1, 2, 4], "core": [1, 4], "enhancing": [4]},
        "num_classes": 3,
        "image_size": 32,
        "split_fractions": {"train": 1},
    }
    sample = build_dataset(cfg, "train")[0]
    assert sample["image"].shape == (2, 32, 32)
    assert sample["image"][0, 0, 0] < sample["image"][0, 31, 0]  # t1 first: grows along rows
    assert sample["image"][1, 0, 0] < sample["image"][1, 0, 31]
    raters = sample["raters"].numpy()
    assert np.array_equal(raters[0, 0], (labels[..., 0] > 0))
    assert np.array_equal(raters[0, 1], np.isin(labels[..., 0], [1, 4]))
    assert np.array_equal(raters[0, 2], labels[..., 0] == 4)
    assert raters[1, 2].sum() == 0 and raters[1, 1].sum() == raters[0, 1].sum()


def test_csv_and_yaml_manifests_give_the_same_cases(tmp_path):
    size = (32, 32)
    rows = []
    for case in range(3):
        Image.fromarray(photo(size, case)).save(tmp_path / f"img{case}.png")
        row = {
            "id": f"c{case}",
            "split": ["train", "train", "test"][case],
            "image": f"img{case}.png",
        }
        for rater in range(2):
            disc, cup = disc_cup_masks(size, rater, case)
            for name, mask in (("disc", disc), ("cup", cup)):
                Image.fromarray(mask).save(tmp_path / f"m{case}_{rater}_{name}.png")
                row[f"rater{rater + 1}_{name}"] = f"m{case}_{rater}_{name}.png"
        rows.append(row)
    with (tmp_path / "cases.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    yaml_lines = ["cases:"]
    for row in rows:
        yaml_lines += [
            f"  - id: {row['id']}",
            f"    split: {row['split']}",
            f"    image: {row['image']}",
            "    raters:",
        ]
        for rater in (1, 2):
            yaml_lines.append(
                f"      - {{disc: {row[f'rater{rater}_disc']}, cup: {row[f'rater{rater}_cup']}}}"
            )
    (tmp_path / "cases.yaml").write_text("\n".join(yaml_lines) + "\n")
    base = {"kind": "manifest", "num_raters": 2, "classes": ["disc", "cup"], "image_size": 32}
    from_csv = build_dataset({**base, "manifest": str(tmp_path / "cases.csv")}, "train")
    from_yaml = build_dataset({**base, "manifest": str(tmp_path / "cases.yaml")}, "train")
    assert [s["id"] for s in _by_id(from_csv).values()] == ["c0", "c1"]
    for a, b in zip(_by_id(from_csv).values(), _by_id(from_yaml).values()):
        assert torch.equal(a["raters"], b["raters"]) and torch.equal(a["image"], b["image"])
    disc, _ = disc_cup_masks(size, 1, 1)
    assert torch.equal(_by_id(from_csv)["c1"]["raters"][1, 0], torch.tensor(disc).float())
    assert len(build_dataset({**base, "manifest": str(tmp_path / "cases.csv")}, "test")) == 1


# --- LIDC -----------------------------------------------------------------------------
def write_lidc_series(folder: Path, depth: int = 3) -> list[pydicom.Dataset]:
    """``depth`` CT slices built from pydicom's CT_small, 2.5 mm apart, new UIDs."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    slices = []
    for index in range(depth):
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.SeriesInstanceUID = series_uid
        dataset.ImagePositionPatient = [-158.1, -179.0, -75.0 + 2.5 * index]
        dataset.save_as(folder / f"{index:03d}.dcm")
        slices.append(dataset)
    return slices


def lidc_xml(sessions: list[list[list[tuple[str, float, list[tuple[int, int]]]]]]) -> str:
    """sessions -> nodules -> contours (SOP UID, z, points), in the LIDC XML schema."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<LidcReadMessage xmlns="http://www.nih.gov" uid="1">',
        "<ResponseHeader/>",
    ]
    for session in sessions:
        parts.append("<readingSession><servicingRadiologistID>r</servicingRadiologistID>")
        for number, nodule in enumerate(session):
            parts.append(f"<unblindedReadNodule><noduleID>{number}</noduleID>")
            for uid, z, points in nodule:
                edges = "".join(
                    f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                    for x, y in points
                )
                parts.append(
                    f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{uid}</imageSOP_UID>"
                    f"<inclusion>TRUE</inclusion>{edges}</roi>"
                )
            parts.append("</unblindedReadNodule>")
        parts.append("</readingSession>")
    parts.append("</LidcReadMessage>")
    return "\n".join(parts)


def _rectangle(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_lidc_nodule_crops_have_one_mask_per_reading_session(tmp_path):
    series = tmp_path / "LIDC-IDRI-0001" / "study" / "series"
    slices = write_lidc_series(series)
    uid = [s.SOPInstanceUID for s in slices]
    big, small = _rectangle(60, 50, 80, 66), _rectangle(62, 52, 76, 62)
    sessions = [
        [[(uid[0], -75.0, small), (uid[1], -72.5, big)]],  # rater 1: largest on slice 1
        [[(uid[1], -72.5, small)]],  # rater 2: the same nodule
        [[(uid[1], -72.5, [(10, 10)])]],  # rater 3: a < 3 mm mark elsewhere, no contour
    ]
    (series / "069.xml").write_text(lidc_xml(sessions))
    cfg = {
        "kind": "lidc",
        "root": str(tmp_path),
        "num_raters": 4,
        "crop_size": 32,
        "image_size": 32,
        "intensity_window": [-1000, 400],
        "split_fractions": {"train": 1},
    }
    dataset = build_dataset(cfg, "train")
    assert len(dataset) == 1
    sample = dataset[0]
    assert sample["id"] == "LIDC-IDRI-0001_069_nodule01"
    raters = sample["raters"][:, 0].numpy()
    # crop centred on the contours' points of slice 1: columns 61..92 -> top-left (42, 54)
    expected = np.zeros((4, 32, 32), dtype=np.float32)
    top, left = 42, 54
    expected[0, 50 - top + 1 : 66 - top, 60 - left + 1 : 80 - left] = 1  # interior, no outline
    expected[1, 52 - top + 1 : 62 - top, 62 - left + 1 : 76 - left] = 1
    assert np.array_equal(raters, expected)
    hu = slices[1].pixel_array.astype(np.float32) - 1024
    crop = np.clip(hu[top : top + 32, left : left + 32], -1000, 400)
    assert np.corrcoef(sample["image"][0].numpy().ravel(), crop.ravel())[0, 1] > 0.999
    assert sample["spacing"][:2].tolist() == pytest.approx([0.661468, 0.661468])


# --- cache --------------------------------------------------------------------------
def test_disk_cache_returns_the_fresh_arrays_without_decoding_again(tmp_path, monkeypatch):
    write_refuge(tmp_path / "data", {"Training-400": 3}, size=(40, 48), photo_suffix=".jpg")
    cfg = {
        "kind": "refuge",
        "root": str(tmp_path / "data"),
        "num_raters": 3,
        "image_size": 32,
        "cache_dir": str(tmp_path / "cache"),
    }
    fresh = build_dataset({**cfg, "cache_dir": None}, "train")
    first = build_dataset(cfg, "train")
    epoch1 = [first[i] for i in range(3)]
    assert len(list((tmp_path / "cache").glob("*.image.npy"))) == 3

    def no_decoding(self):
        raise AssertionError(f"{self.case_id} decoded again")

    monkeypatch.setattr(Case, "load", no_decoding)
    for cls in Case.__subclasses__():
        monkeypatch.setattr(cls, "load", no_decoding)
    second = build_dataset(cfg, "train")  # a new process would see only the disk
    for index in range(3):
        cached, before = second[index], epoch1[index]
        assert torch.equal(cached["image"], before["image"])
        assert torch.equal(cached["raters"], before["raters"])
    monkeypatch.undo()
    for index in range(3):
        assert torch.equal(fresh[index]["image"], epoch1[index]["image"])
        assert torch.equal(fresh[index]["raters"], epoch1[index]["raters"])
    assert isinstance(first, FileDataset)


def test_a_manifest_diagnosis_column_makes_diff_applicable(tmp_path):
    from torch.utils.data import DataLoader

    from mrprism_core.models import build_model

    lines = ["id,split,image,rater1,rater2,diagnosis"]
    for case in range(4):
        Image.fromarray(photo((32, 32), case)).save(tmp_path / f"i{case}.png")
        for rater in range(2):
            disc, _ = disc_cup_masks((32, 32), rater, case)
            Image.fromarray(disc).save(tmp_path / f"m{case}{rater}.png")
        lines.append(f"c{case},train,i{case}.png,m{case}0.png,m{case}1.png,{case % 2}")
    (tmp_path / "cases.csv").write_text("\n".join(lines) + "\n")
    cfg = {"kind": "manifest", "manifest": str(tmp_path / "cases.csv"), "num_raters": 2,
           "image_size": 32}  # fmt: skip
    dataset = build_dataset(cfg, "train")
    assert [float(dataset[i]["diagnosis"]) for i in range(4)] == [0.0, 1.0, 0.0, 1.0]
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    model = build_model("diff", in_channels=3, num_classes=1, num_raters=2, image_size=32)
    loss, parts = model.loss(batch)
    assert torch.isfinite(loss) and parts["diagnosis"] > 0
    (tmp_path / "cases.csv").write_text("\n".join([*lines[:-1], lines[-1][:-2] + ","]) + "\n")
    with pytest.raises(ValueError, match="some cases have a diagnosis and some do not"):
        build_dataset(cfg, "train")
