"""The one training step and the one evaluation, plus centralized training.

``train_epoch`` is one pass of training steps and ``evaluate`` the one evaluation; every
trainer (this module's :func:`fit`, a site's round, the simulation) drives ``train_epoch``
through :func:`mrprism_core.local_training.run_epochs`, so there is no second loop.

Run ``python -m mrprism_core.train`` (Hydra; ``--help`` lists the options) to train on the
synthetic default, e.g. ``python -m mrprism_core.train train.epochs=20 model.preset=paper``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, save_checkpoint
from .data.augment import RandomFlipsTurns
from .data.factory import EmptySplitError, build_dataset, dataset_info
from .lr_schedule import check_lr_schedule, scheduled_lr, set_lr
from .metrics import MetricAccumulator
from .mirroring import mirrored_forward
from .models import SegmentationModel, build_model_for_data, model_from_build_args

__all__ = [
    "resolve_device",
    "seed_everything",
    "make_loader",
    "move_batch",
    "train_epoch",
    "evaluate",
    "load_model",
    "fit",
    "preset_lr",
]

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    augment: bool = False,
) -> DataLoader:
    """A DataLoader with a seeded shuffle (same seed, same order); with ``augment``, every case
    randomly flipped and turned (:class:`~mrprism_core.data.augment.RandomFlipsTurns`, drawn
    from the same seed)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=RandomFlipsTurns(seed) if augment else None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a batch to ``device`` (non-blocking); other entries unchanged."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def train_epoch(
    model: SegmentationModel,
    loader: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    device: torch.device | str = "cpu",
    *,
    max_grad_norm: float | None = None,
    proximal_mu: float = 0.0,
    proximal_reference: Mapping[str, torch.Tensor] | None = None,
    backward_once: bool = False,
    progress: bool = False,
    description: str = "train",
) -> dict[str, float]:
    """One pass over ``loader`` with the model's own loss.

    A batch whose loss is NaN/Inf is skipped (no optimizer step) and counted in
    ``skipped_steps``, so one bad batch cannot poison the weights.

    Args:
        proximal_mu, proximal_reference: FedProx. Adds ``mu/2 * ||w - w_ref||^2`` for every
            parameter named in the reference (the global weights received this round), applied
            as its gradient ``mu * (w - w_ref)``.
        backward_once: one backward pass through the whole loss instead of the model's
            memory-saving :meth:`backward`; Opacus' per-sample gradients (DP-SGD) need it.

    Returns:
        ``loss`` (mean over examples of the applied steps), ``num_examples`` (samples seen),
        ``skipped_steps`` and the mean of each loss part the model reports.
    """
    device = torch.device(device)
    model.train()
    total, examples, applied, skipped = 0.0, 0, 0, 0
    parts_sum: dict[str, float] = {}
    bar = tqdm(loader, desc=description, leave=False, disable=not progress, unit="batch")
    for batch in bar:
        batch = move_batch(batch, device)
        size = int(batch["image"].shape[0])
        examples += size
        optimizer.zero_grad(set_to_none=True)
        if size == 0:
            _empty_step(model, optimizer)
            continue
        if backward_once:
            loss, parts = model.loss(batch)
            loss.backward()
        else:
            loss, parts = model.backward(batch)
        value = loss.item()
        if not math.isfinite(value):
            skipped += 1
            log.warning("non-finite loss %s on batch %s: step skipped", value, batch.get("id"))
            optimizer.zero_grad(set_to_none=True)
            continue
        if proximal_mu and proximal_reference is not None:
            _add_proximal_gradient(model, proximal_mu, proximal_reference)
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        applied += size
        total += value * size
        for key, part in parts.items():
            parts_sum[key] = parts_sum.get(key, 0.0) + part * size
        bar.set_postfix(loss=f"{value:.4f}")
    result = {
        "loss": total / applied if applied else float("nan"),
        "num_examples": examples,
        "skipped_steps": skipped,
    }
    result.update({f"loss_{k}": v / applied for k, v in parts_sum.items() if applied})
    return result


def _empty_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Poisson sampling (DP-SGD) can draw an empty batch. The step still happens, as pure
    noise: skipping it would reveal that the batch was empty, and the accountant counts it.
    A plain optimizer has no gradients then and leaves the weights alone."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad_sample = param.new_zeros((0, *param.shape))
    optimizer.step()
    for param in model.parameters():
        param.grad_sample = None
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _add_proximal_gradient(
    model: nn.Module, mu: float, reference: Mapping[str, torch.Tensor]
) -> None:
    for name, param in model.named_parameters():
        if param.grad is not None and name in reference:
            param.grad.add_(param - reference[name].to(param.device), alpha=mu)


@torch.no_grad()
def evaluate(
    model: SegmentationModel,
    loader: Iterable[Mapping[str, Any]],
    device: torch.device | str = "cpu",
    *,
    progress: bool = False,
    description: str = "evaluate",
    mirror: bool = False,
) -> dict[str, Any]:
    """Soft Dice (overall and per recurrence), per-rater Dice, GED, ECE and, when the data
    carries a true mask, Dice against it. See :class:`~mrprism_core.metrics.MetricAccumulator`.
    ``mirror``: score the mean output over the 4 mirrorings of each case
    (:func:`~mrprism_core.mirroring.mirrored_forward`)."""
    device = torch.device(device)
    model.eval()
    metrics = MetricAccumulator()
    for batch in tqdm(loader, desc=description, leave=False, disable=not progress, unit="batch"):
        batch = move_batch(batch, device)
        out = mirrored_forward(model, batch["image"]) if mirror else model(batch["image"])
        metrics.update(
            out.calibrated,
            batch["raters"],
            rater_probs=out.raters,
            recurrences=out.recurrences,
            recurrence_raters=out.recurrence_raters,
            truth=batch.get("truth"),
            rater_valid=batch.get("rater_valid"),
        )
    return metrics.compute()


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[SegmentationModel, dict]:
    """Rebuild a model from a checkpoint written by :func:`fit` (or the federated server)."""
    payload = load_checkpoint(path, map_location=device)
    model = model_from_build_args(payload["build_args"]).to(device)
    model.load_state_dict(payload["model_state"])
    return model, payload


def _checkpoint_payload(
    model: SegmentationModel, optimizer: torch.optim.Optimizer, epoch: int, metrics: dict
) -> dict[str, Any]:
    return {
        "build_args": model.build_args,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "epoch": epoch,
        "metrics": metrics,
    }


def fit(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Centralized training and evaluation from a config shaped like ``site_configs/train.yaml``.

    Resumes from ``<out_dir>/last.pt`` when present (and ``resume`` is true); writes
    ``last.pt`` every epoch, ``best.pt`` whenever the validation soft Dice improves,
    ``metrics.jsonl`` (one line per epoch) and ``results.json``. With ``train.keep_best``
    (default) the test split scores the best validation epoch, not the last; a data set
    without a validation split trains all the same and the test scores the last epoch.
    """
    train_cfg, model_cfg, data_cfg = cfg["train"], cfg["model"], cfg["data"]
    seed_everything(int(train_cfg["seed"]))
    device = resolve_device(str(train_cfg["device"]))
    out_dir = Path(str(cfg["out_dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)

    train_set = build_dataset(data_cfg, "train")
    try:
        val_set: Dataset | None = build_dataset(data_cfg, "val")
    except EmptySplitError:
        val_set = None
        log.warning("no validation split: no epoch is selected, the test scores the last one")
    test_set = build_dataset(data_cfg, "test")
    info = dataset_info(train_set)
    spec = {
        "name": model_cfg["name"],
        "preset": model_cfg["preset"],
        "in_channels": info.in_channels,
        "num_classes": info.num_classes,
        "options": model_cfg.get("options") or {},
    }
    model = build_model_for_data(spec, info).to(device)
    lr = float(train_cfg.get("lr") or preset_lr(model))
    schedule = check_lr_schedule(str(train_cfg.get("lr_schedule", "constant")), "train.lr_schedule")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    start_epoch, history = 0, []
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    keep_best = bool(train_cfg.get("keep_best", True))
    if bool(cfg.get("resume", True)) and last.exists():
        payload = load_checkpoint(last, map_location=device)
        model.load_state_dict(payload["model_state"])
        optimizer.load_state_dict(payload["optimizer_state"])
        start_epoch = int(payload["epoch"])
        history = _read_history(out_dir / "metrics.jsonl")[:start_epoch]
        log.info("resumed from %s at epoch %d", last, start_epoch)
    best_epoch, best_score = _best_so_far(history)

    batch_size = int(train_cfg["batch_size"])
    workers = int(train_cfg.get("num_workers", 0))
    epochs = int(train_cfg["epochs"])
    progress = bool(train_cfg.get("progress", True))
    from .tracking import open_tracker

    tracker = open_tracker(str(cfg.get("tracking", "none")), out_dir)
    val_loader = None
    if val_set is not None:
        val_loader = make_loader(val_set, batch_size, shuffle=False, num_workers=workers)
    bar = tqdm(total=epochs, initial=start_epoch, desc="epochs", disable=not progress, unit="epoch")

    def schedule_epoch(epoch: int) -> None:  # 1-based; a resumed run continues the schedule
        set_lr(optimizer, scheduled_lr(lr, epoch, epochs, schedule))

    def train_loader(epoch: int) -> DataLoader:
        seed = int(train_cfg["seed"]) + epoch
        return make_loader(
            train_set,
            batch_size,
            shuffle=True,
            seed=seed,
            num_workers=workers,
            augment=bool(train_cfg.get("augment", False)),
        )

    def after_epoch(epoch: int, train_metrics: dict[str, Any]) -> None:
        nonlocal best_epoch, best_score
        val_metrics = None
        if val_loader is not None:
            val_metrics = evaluate(model, val_loader, device, progress=progress)
        epoch_lr = float(optimizer.param_groups[0]["lr"])
        record = {"epoch": epoch + 1, "lr": epoch_lr, "train": train_metrics, "val": val_metrics}
        history.append(record)
        _write_history(out_dir / "metrics.jsonl", history)
        payload = _checkpoint_payload(model, optimizer, epoch + 1, record)
        save_checkpoint(last, payload)
        if val_metrics is not None and val_metrics["soft_dice"] > best_score:
            best_epoch, best_score = epoch + 1, float(val_metrics["soft_dice"])
            save_checkpoint(best, payload)
        tracker.scalars(
            epoch + 1,
            {
                **{f"train/{k}": v for k, v in train_metrics.items()},
                "train/lr": epoch_lr,
                **{f"val/{k}": v for k, v in (val_metrics or {}).items()},
            },
        )
        scored = "" if val_metrics is None else f", val soft Dice {val_metrics['soft_dice']:.4f}"
        log.info("epoch %d: loss %.4f%s", epoch + 1, train_metrics["loss"], scored)
        bar.update(1)
        schedule_epoch(epoch + 2)

    from .local_training import run_epochs  # it drives train_epoch, defined above

    if epochs > start_epoch:
        schedule_epoch(start_epoch + 1)
        run_epochs(
            model,
            optimizer,
            train_loader,
            device,
            epochs - start_epoch,
            first_epoch=start_epoch,
            progress=progress,
            on_epoch=after_epoch,
        )
    bar.close()

    tested_epoch = best_epoch if keep_best and best.exists() else len(history)
    if tested_epoch != len(history):
        model.load_state_dict(load_checkpoint(best, map_location=device)["model_state"])
    test_loader = make_loader(test_set, batch_size, shuffle=False, num_workers=workers)
    mirror = bool(train_cfg.get("test_mirroring", False))
    results = {
        "model": dict(model.build_args),
        "epochs": epochs,
        "best_epoch": best_epoch,
        "tested_epoch": tested_epoch,
        "selected_by": (
            "best validation soft Dice"
            if tested_epoch and tested_epoch == best_epoch
            else "last epoch" + (" (no validation split)" if val_set is None else "")
        ),
        "test": evaluate(model, test_loader, device, progress=progress, mirror=mirror),
        "test_mirroring": mirror,
        "val": history[tested_epoch - 1]["val"] if tested_epoch else None,
    }
    tracker.scalars(tested_epoch, {f"test/{k}": v for k, v in results["test"].items()})
    tracker.close()
    atomic_write_json(out_dir / "results.json", results)
    return results


def preset_lr(model: SegmentationModel) -> float:
    """The learning rate of the model's architecture preset (1e-4 for a model without one)."""
    arch = getattr(model, "arch", None)
    return float(arch.lr) if arch is not None else 1e-4


def _best_so_far(history: list[dict[str, Any]]) -> tuple[int, float]:
    """(epoch, validation soft Dice) of the best epoch in ``history``; (0, -inf) if none."""
    scored = [(float(r["val"]["soft_dice"]), int(r["epoch"])) for r in history if r.get("val")]
    if not scored:
        return 0, float("-inf")
    score, epoch = max(scored)
    return epoch, score


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_bytes(
        path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode()
    )


def main() -> None:
    """Hydra entry point of ``python -m mrprism_core.train``."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from .config_schema import TrainRunSchema, checked

    @hydra.main(version_base="1.3", config_path="pkg://site_configs", config_name="train")
    def _run(cfg: DictConfig) -> None:
        try:  # a mistyped key or value: the message alone, before anything runs
            cfg = checked(TrainRunSchema, cfg, "the training config")
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        results = fit(OmegaConf.to_container(cfg, resolve=True))
        test = results["test"]
        print(
            json.dumps({k: test[k] for k in ("soft_dice", "dice_vs_truth", "ged", "ece")}, indent=2)
        )
        print(f"results written to {cfg.out_dir}/results.json")

    _run()


if __name__ == "__main__":
    main()
