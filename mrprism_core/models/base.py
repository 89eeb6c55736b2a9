"""What every segmentation model in the project provides.

* ``forward(images) -> SegmentationOutput`` for inference;
* ``loss(batch) -> (loss, parts)``: the model declares its own training objective, so one
  ``train_epoch`` trains MrPrism and every baseline;
* ``backward(batch) -> (loss, parts)``: computes the loss and accumulates its gradients; a
  model may override it to free memory earlier (MrPrism back-propagates each recurrence as
  soon as its loss is known) as long as the gradients equal those of ``loss(batch).backward()``;
* ``local_modules``: the sub-modules that stay at the site in federated training (see
  :func:`mrprism_core.models.split_state`);
* ``build_args``: the arguments that rebuild it (saved in checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["SegmentationOutput", "SegmentationModel"]


@dataclass
class SegmentationOutput:
    """Inference output.

    Attributes:
        calibrated: calibrated probabilities after the last recurrence (B, K, H, W).
        raters: personalised per-rater probabilities (B, M, K, H, W), or None.
        recurrences: calibrated map of every recurrence (rec0 ... rec_tau), each (B, K, H, W).
        recurrence_raters: the per-rater outputs of every recurrence, each (B, M, K, H, W).
        reliability: MrPrism's last per-rater reliabilities (a ``fusion.Reliability``), or None.
    """

    calibrated: Tensor
    raters: Tensor | None = None
    recurrences: list[Tensor] = field(default_factory=list)
    recurrence_raters: list[Tensor] = field(default_factory=list)
    reliability: Any = None


class SegmentationModel(nn.Module):
    """Base class: subclasses implement ``forward`` and ``loss`` and set ``local_modules``."""

    #: Dotted names of sub-modules kept at the site (never aggregated).
    local_modules: tuple[str, ...] = ()

    def __init__(self, build_args: dict[str, Any]) -> None:
        super().__init__()
        self.build_args = dict(build_args)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def backward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Accumulate the gradients of ``loss(batch)``; returns the detached loss and parts."""
        loss, parts = self.loss(batch)
        loss.backward()
        return loss.detach(), parts
