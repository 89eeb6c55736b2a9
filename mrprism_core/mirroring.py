"""Test-time mirroring: a model's output averaged over its input mirrored along the two image
axes (as is, left-right, up-down, both: four forward passes), each output mirrored back
before the mean. nnU-Net predicts this way by default; here it is a switch, off by default:
``mirror`` of :func:`~mrprism_core.train.evaluate` (``train.test_mirroring`` of centralized
training and of a site config, ``federation.test_mirroring`` of the simulation; test splits
only) and ``--mirror`` of the prediction commands and of ``benchmarks.quality``.

None of our models is mirror-equivariant (patch attention, strided convolutions), so the four
passes disagree a little, mostly at boundaries, and their mean is a small ensemble: on the
hard-rater quality set it raised every model's soft Dice by 0.3-1.2 points and Dice against
the truth by 0.9-2.0 (README, "Benchmarks"). Where a structure always lies on one side (the
heart, say), mirrored images are unlike any seen in training: measure before turning it on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from .models.base import SegmentationModel, SegmentationOutput

__all__ = ["MIRRORINGS", "mirrored_forward"]

#: The axes each pass flips (the last two: height and width); () is the image as it is.
MIRRORINGS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor of an output field (a tensor, a list of them, a
    ``Reliability``-like named tuple or None)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return type(value)(*(_map(item, fn) for item in value))
    return [_map(item, fn) for item in value]


def _mean(values: Sequence[Any]) -> Any:
    """The element-wise mean of the same field from several outputs."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.stack(list(values)).mean(dim=0)
    if isinstance(first, tuple):
        return type(first)(*(_mean(items) for items in zip(*values)))
    return [_mean(items) for items in zip(*values)]


_FIELDS = tuple(f.name for f in fields(SegmentationOutput))


def mirrored_forward(model: SegmentationModel, images: Tensor) -> SegmentationOutput:
    """``model(images)`` averaged over :data:`MIRRORINGS`: every field of the output (the
    calibrated map, the rater outputs, each recurrence's maps, MrPrism's reliabilities) is the
    mean of the four passes' fields, each flipped back to the input's orientation."""
    outputs = []
    for axes in MIRRORINGS:
        if not axes:
            outputs.append(model(images))
            continue
        output = model(torch.flip(images, axes))
        outputs.append(
            SegmentationOutput(
                **{
                    name: _map(getattr(output, name), lambda t, a=axes: torch.flip(t, a))
                    for name in _FIELDS
                }
            )
        )
    return SegmentationOutput(
        **{name: _mean([getattr(o, name) for o in outputs]) for name in _FIELDS}
    )
