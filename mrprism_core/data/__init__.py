"""Data sources. Every reader yields the same sample: ``image`` (C, H, W), ``raters``
(M, K, H, W) in {0, 1}, ``id``, and, where known, ``truth`` (K, H, W)."""

from .synthetic import (
    ImageStyle,
    RaterProfile,
    SyntheticMultiRaterDataset,
    default_rater_profiles,
    make_dataset,
)
from .views import CaseSubset, RaterSlots, RaterSubset

__all__ = [
    "CaseSubset",
    "RaterSlots",
    "RaterSubset",
    "ImageStyle",
    "RaterProfile",
    "SyntheticMultiRaterDataset",
    "default_rater_profiles",
    "make_dataset",
]
