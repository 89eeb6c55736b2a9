from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from mrprism_core.checkpoint import CorruptCheckpointError, load_checkpoint, save_checkpoint
from mrprism_core.data import make_dataset
from mrprism_core.models import build_model
from mrprism_core.train import evaluate, fit, load_model, train_epoch


def _seeded_loss(model, batch, seed=123):
    torch.manual_seed(seed)  # same w0 draw and shuffles before and after training
    with torch.no_grad():
        return model.loss(batch)[0].item()


@pytest.mark.parametrize("name", ["mrprism", "unet_mv"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(name, tiny_batch):
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, num_classes=2, num_raters=3, image_size=32)
    model.train()
    before = _seeded_loss(model, tiny_batch)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(25):
        torch.manual_seed(step)
        loss, _ = model.loss(tiny_batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _seeded_loss(model, tiny_batch)
    assert after < before * 0.9, (before, after)


def test_train_epoch_skips_non_finite_batches_and_counts_examples(tiny_mrprism):
    dataset = make_dataset(6, 3, 32, seed=1)
    loader = list(DataLoader(dataset, batch_size=3))
    loader[1]["image"] = loader[1]["image"] * float("nan")
    before = {k: v.clone() for k, v in tiny_mrprism.state_dict().items()}
    optimizer = torch.optim.Adam(tiny_mrprism.parameters(), lr=1e-3)
    result = train_epoch(tiny_mrprism, loader, optimizer)
    assert result["num_examples"] == 6 and result["skipped_steps"] == 1
    assert torch.isfinite(torch.tensor(result["loss"]))
    after = tiny_mrprism.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_evaluate_reports_all_metrics(tiny_mrprism):
    loader = DataLoader(make_dataset(4, 3, 32, seed=2), batch_size=2)
    metrics = evaluate(tiny_mrprism, loader)
    assert metrics["num_examples"] == 4
    assert 0.0 <= metrics["soft_dice"] <= 1.0 and 0.0 <= metrics["dice_vs_truth"] <= 1.0
    assert len(metrics["per_rater_dice"]) == 3
    assert [k for k in metrics if k.startswith("soft_dice_rec")] == [
        f"soft_dice_rec{i}" for i in range(tiny_mrprism.arch.recurrences + 1)
    ]
    assert metrics["soft_dice_rec3"] == metrics["soft_dice"]


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, tiny_mrprism, tiny_batch):
    path = tmp_path / "model.pt"
    save_checkpoint(
        path, {"build_args": tiny_mrprism.build_args, "model_state": tiny_mrprism.state_dict()}
    )
    restored, _ = load_model(path)
    tiny_mrprism.eval()
    assert torch.equal(
        tiny_mrprism(tiny_batch["image"]).calibrated, restored(tiny_batch["image"]).calibrated
    )
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_corrupt_checkpoint_is_reported_with_its_path(tmp_path):
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"x": torch.arange(10)})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="bad header"):
        load_checkpoint(path)


def _config(out_dir, epochs):
    return {
        "train": {
            "epochs": epochs,
            "batch_size": 4,
            "lr": 1e-3,
            "device": "cpu",
            "seed": 0,
            "progress": False,
        },
        "model": {"name": "mrprism", "preset": "tiny", "options": {"recurrences": 2}},
        "data": {
            "kind": "synthetic",
            "num_raters": 3,
            "num_classes": 2,
            "image_size": 32,
            "seed": 0,
            "splits": {"train": 8, "val": 4, "test": 4},
        },
        "out_dir": str(out_dir),
        "resume": True,
    }


def test_fit_writes_results_and_resumes(tmp_path):
    first = fit(_config(tmp_path, 1))
    assert 0.0 <= first["test"]["soft_dice"] <= 1.0
    assert (tmp_path / "last.pt").exists()
    second = fit(_config(tmp_path, 2))  # resumes after epoch 1, runs epoch 2 only
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert second["epochs"] == 2


def test_fit_without_a_validation_split_trains_and_scores_the_last_epoch(tmp_path):
    cfg = _config(tmp_path, 2)
    cfg["data"]["splits"]["val"] = 0
    results = fit(cfg)
    assert results["tested_epoch"] == 2 and results["val"] is None
    assert results["selected_by"] == "last epoch (no validation split)"
    assert not (tmp_path / "best.pt").exists()
    with_val = fit(_config(tmp_path / "with_val", 2))
    assert with_val["selected_by"] == "best validation soft Dice"
    assert with_val["tested_epoch"] == with_val["best_epoch"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=abc", "train.batch_size='abc' is refused"),
        ("+trian.epochs=3", "unknown key 'trian' (a typo?)"),
        ("train.epochs=0", "train.epochs=0 is refused: must be >= 1"),  # once trained 0 epochs
    ],
)
def test_a_mistyped_training_config_is_one_message_before_anything_runs(
    override, message, tmp_path
):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mrprism_core.train", override, f"out_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "last.pt").exists()
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("model", ["mrprism", "unet_mv"])
def test_model_options_take_a_mapping_override(model):
    from hydra import compose, initialize_config_module

    from mrprism_core.config_schema import TrainRunSchema, checked

    with initialize_config_module("site_configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", "model.options={lr: 0.005}"])
    typed = checked(TrainRunSchema, cfg, "the training config")
    assert dict(typed.model.options) == {"lr": 0.005}
