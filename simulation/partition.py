"""Virtual sites: how a data set (or several) is split across simulated hospitals.

Every partitioner returns :class:`VirtualSite` objects whose ``data`` is an ordinary data
config (``mrprism_core.data.factory.build_dataset`` reads it), so a virtual site runs through
exactly the code a real site runs. Partitions are deterministic given the seed; no case is
in two sites; each split (train / val / test) is cut separately, so test cases never come from
a training split.

Kinds:
    source     one site per data source (a site config each, e.g. synthetic_a/b/c, or RIGA's
               BinRushed / Magrabia / MESSIDOR once those readers exist)
    iid        one pooled data set, cases dealt uniformly at random
    dirichlet  quantity skew (site sizes ~ Dirichlet(alpha)) or label skew (each size class
               of the structure dealt by its own Dirichlet draw)
    raters     IID cases, but every site sees only a subset of the raters, of varying size
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrprism_core.data.factory import SPLITS, EmptySplitError, build_dataset, dataset_info

__all__ = ["PARTITION_KINDS", "VirtualSite", "case_size_labels", "partition"]

PARTITION_KINDS = ("source", "iid", "dirichlet", "raters")


@dataclass(frozen=True)
class VirtualSite:
    """One simulated hospital: a name, a data config and a seed for its heads/shuffles."""

    name: str
    data: dict[str, Any]
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)  # other site-config keys (train, ...)


def _split_sizes(base: Mapping[str, Any]) -> dict[str, int]:
    sizes = {}
    for split in SPLITS:
        try:
            sizes[split] = len(build_dataset(base, split))
        except EmptySplitError:
            continue
    if "train" not in sizes:
        raise ValueError("the pooled data config has no training cases to partition")
    return sizes


def _deal(indices: np.ndarray, proportions: np.ndarray, minimum: int) -> list[list[int]]:
    """Deal ``indices`` (already shuffled) into len(proportions) groups of at least
    ``minimum`` cases, sized in proportion."""
    groups = len(proportions)
    if len(indices) < groups * minimum:
        raise ValueError(
            f"{len(indices)} cases cannot give {groups} sites at least {minimum} case(s) each; "
            "use fewer sites or more cases"
        )
    spare = len(indices) - groups * minimum
    extra = np.floor(proportions * spare).astype(int)
    for i in np.argsort(-(proportions * spare - extra))[: spare - extra.sum()]:
        extra[i] += 1
    sizes = minimum + extra
    cuts = np.cumsum(sizes)[:-1]
    return [part.tolist() for part in np.split(indices, cuts)]


def _with_cases(base: Mapping[str, Any], cases: dict[str, list[int]], name: str) -> dict:
    data = copy.deepcopy(dict(base))
    data["cases"] = cases
    data["name"] = f"{data.get('name', 'pool')}@{name}"
    return data


def case_size_labels(data: Mapping[str, Any], split: str, bins: int = 3) -> np.ndarray:
    """A label per case for label skew: the tercile (``bins``) of the structure's area in the
    raters' mean mask (class 0), so sites can differ in how large their structures are."""
    dataset = build_dataset(data, split)
    areas = np.array(
        [float(dataset[i]["raters"][:, 0].float().mean()) for i in range(len(dataset))]
    )
    edges = np.quantile(areas, np.linspace(0, 1, bins + 1)[1:-1])
    return np.digitize(areas, edges)


def _source(cfg: Mapping[str, Any], seed: int) -> list[VirtualSite]:
    sites = []
    for index, spec in enumerate(cfg["sources"]):
        sites.append(
            VirtualSite(
                name=str(spec["site"]),
                data=copy.deepcopy(dict(spec["data"])),
                seed=int(spec.get("seed", seed + index)),
                settings={k: v for k, v in spec.items() if k not in ("site", "data", "seed")},
            )
        )
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"source partition needs distinct site names, got {names}")
    return sites


def _pooled(cfg: Mapping[str, Any], seed: int, kind: str) -> list[VirtualSite]:
    base = dict(cfg["data"])
    num_sites = int(cfg["num_sites"])
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    rng = np.random.default_rng(seed)
    sizes = _split_sizes(base)
    cases: list[dict[str, list[int]]] = [{} for _ in range(num_sites)]
    alpha = float(cfg.get("alpha", 0.5))
    skew = str(cfg.get("skew", "quantity"))
    quantity = rng.dirichlet(np.full(num_sites, alpha)) if kind == "dirichlet" else None
    for split, size in sizes.items():
        minimum = 2 if split == "train" else 1
        if kind == "dirichlet" and skew == "label":
            labels = case_size_labels(base, split)
            groups: list[list[int]] = [[] for _ in range(num_sites)]
            for label in np.unique(labels):
                members = rng.permutation(np.flatnonzero(labels == label))
                share = rng.dirichlet(np.full(num_sites, alpha))
                for site, part in enumerate(_deal(members, share, 0)):
                    groups[site].extend(part)
            short = [i for i, g in enumerate(groups) if len(g) < minimum]
            if short:
                raise ValueError(
                    f"label-skew partition left site(s) {short} with fewer than {minimum} "
                    f"{split} case(s); raise alpha or use fewer sites"
                )
        elif kind == "dirichlet" and skew != "quantity":
            raise ValueError(f"unknown dirichlet skew {skew!r}; choose 'quantity' or 'label'")
        else:
            proportions = quantity if quantity is not None else np.full(num_sites, 1 / num_sites)
            groups = _deal(rng.permutation(size), proportions, minimum)
        for site, group in enumerate(groups):
            cases[site][split] = sorted(int(i) for i in group)

    total_raters = dataset_info(build_dataset(base, "train")).num_raters
    sites = []
    for index in range(num_sites):
        name = f"site{index:02d}"
        data = _with_cases(base, cases[index], name)
        if kind == "raters":
            low = int(cfg.get("min_raters", 2))
            if not 1 <= low <= total_raters:
                raise ValueError(f"min_raters must be in 1..{total_raters}, got {low}")
            count = low + index % (total_raters - low + 1)  # sites differ in rater count
            data["rater_subset"] = sorted(rng.choice(total_raters, count, replace=False).tolist())
        sites.append(VirtualSite(name=name, data=data, seed=seed * 1000 + index))
    return sites


def partition(cfg: Mapping[str, Any], seed: int) -> list[VirtualSite]:
    """Virtual sites described by a ``partition`` config block (see module docstring).

    Raises:
        ValueError: unknown kind or a partition that cannot be made (too few cases, ...).
    """
    kind = str(cfg.get("kind", "source"))
    if kind not in PARTITION_KINDS:
        raise ValueError(f"unknown partition kind {kind!r}; choose one of {list(PARTITION_KINDS)}")
    if kind == "source":
        return _source(cfg, seed)
    return _pooled(cfg, seed, kind)
