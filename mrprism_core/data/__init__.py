"""Data sources. Every reader yields the same sample: ``image`` (C, H, W), ``raters``
(M, K, H, W) in {0, 1}, ``id``, and, where known, ``truth`` (K, H, W)."""

from .views import CaseSubset, RaterSlots, RaterSubset
from .synthetic import (
    ImageStyle,
    RaterProfile,
    SyntheticMultiRaterDataset,
    default_rater_profiles,
    make_dataset,
)

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
