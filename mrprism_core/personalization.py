"""How personal a site's model is: which parameters a round trains, in which phase.

The *body* is what the federation shares (:func:`~mrprism_core.models.split_state`), the
*heads* what stays at the site (MrPrism: DivP's rater heads and the rater identities).

* ``fedper``: every round trains body and heads together; the heads never leave the site.
* ``fedrep``: every round trains the heads first with the body frozen, then the body with the
  heads frozen (Collins et al., 2021).
* ``fedbabu``: rounds train the body only, the heads stay as initialised; they are fine-tuned
  at the end, before prediction (Oh et al., 2022; ``python -m client --adapt`` does it).
* ``ditto``: rounds train the global copy as ``fedper``, and besides it a personal model kept
  at the site, pulled toward the received global weights by ``lambda/2 ||w - w_global||^2``
  (Li et al., 2021); the site predicts with the personal model.

Nothing here knows about Flower.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .models import split_state

__all__ = ["PERSONALIZATIONS", "check_personalization", "head_names", "phases", "trainable"]

PERSONALIZATIONS = ("fedper", "fedrep", "fedbabu", "ditto")


def check_personalization(name: str) -> str:
    if name not in PERSONALIZATIONS:
        raise ValueError(f"unknown personalization {name!r}; choose one of {PERSONALIZATIONS}")
    return name


def head_names(model: nn.Module) -> set[str]:
    """Names of the parameters that stay at the site."""
    _, local = split_state(model)
    return {name for name, _ in model.named_parameters() if name in local}


def phases(personalization: str, local_epochs: int) -> list[tuple[str, int]]:
    """The phases of one round as ``(part, epochs)``, part ``all``, ``heads`` or ``body``."""
    check_personalization(personalization)
    if personalization == "fedrep":
        return [("heads", 1), ("body", local_epochs)]
    if personalization == "fedbabu":
        return [("body", local_epochs)]
    return [("all", local_epochs)]


@contextmanager
def trainable(model: nn.Module, part: str) -> Iterator[None]:
    """Within the block only ``part`` (``all``, ``heads`` or ``body``) has gradients; the
    other parameters get none, so no optimizer moves them (they stay bit-identical)."""
    if part not in ("all", "heads", "body"):
        raise ValueError(f"part must be all, heads or body, got {part!r}")
    heads = head_names(model)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, param in model.named_parameters():
        if part != "all":
            param.requires_grad_((name in heads) == (part == "heads"))
    try:
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(before[name])
