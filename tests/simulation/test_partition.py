"""Virtual sites: disjoint, deterministic, test never drawn from training."""

from __future__ import annotations

import pytest

from mrprism_core.data.factory import build_dataset, dataset_info
from simulation.partition import partition

POOL = {
    "kind": "synthetic", "name": "pool", "num_raters": 5, "num_classes": 2, "image_size": 32,
    "seed": 3, "splits": {"train": 40, "val": 0, "test": 12},
}  # fmt: skip


def _cfg(kind: str, **extra):
    return {"kind": kind, "num_sites": 4, "data": POOL, **extra}


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg("iid"),
        _cfg("dirichlet", alpha=0.5, skew="quantity"),
        _cfg("dirichlet", alpha=5.0, skew="label"),
        _cfg("raters", min_raters=2),
    ],
    ids=["iid", "dirichlet-quantity", "dirichlet-label", "raters"],
)
def test_pooled_partitions_are_disjoint_complete_and_deterministic(cfg):
    sites = partition(cfg, seed=11)
    assert partition(cfg, seed=11) == sites
    assert partition(cfg, seed=12) != sites
    for split, size in (("train", 40), ("test", 12)):
        taken = [i for s in sites for i in s.data["cases"][split]]
        assert len(taken) == len(set(taken)) == size  # every case in exactly one site
    for site in sites:
        assert len(site.data["cases"]["train"]) >= 2
        train = build_dataset(site.data, "train")
        test = build_dataset(site.data, "test")
        train_ids = {train[i]["id"] for i in range(len(train))}
        test_ids = {test[i]["id"] for i in range(len(test))}
        assert not train_ids & test_ids


def test_quantity_skew_makes_unequal_sites():
    sizes = [len(s.data["cases"]["train"]) for s in partition(_cfg("dirichlet", alpha=0.3), seed=1)]
    assert max(sizes) - min(sizes) >= 5


def test_rater_partition_gives_sites_different_rater_subsets():
    sites = partition(_cfg("raters", min_raters=2), seed=0)
    counts = [dataset_info(build_dataset(s.data, "train")).num_raters for s in sites]
    assert len(set(counts)) > 1 and min(counts) >= 2
    full = build_dataset(POOL, "train")
    site = sites[0]
    case = site.data["cases"]["train"][0]
    sample = build_dataset(site.data, "train")[0]
    assert (sample["raters"] == full[case]["raters"][site.data["rater_subset"]]).all()


def test_source_partition_keeps_each_site_config():
    sources = [
        {"site": "a", "data": POOL, "seed": 1, "train": {"batch_size": 2}},
        {"site": "b", "data": {**POOL, "seed": 4}},
    ]
    sites = partition({"kind": "source", "sources": sources}, seed=0)
    assert [s.name for s in sites] == ["a", "b"]
    assert sites[0].settings == {"train": {"batch_size": 2}}
    with pytest.raises(ValueError, match="distinct site names"):
        partition({"kind": "source", "sources": [sources[0], sources[0]]}, seed=0)


def test_impossible_partitions_say_why():
    with pytest.raises(ValueError, match="unknown partition kind"):
        partition({"kind": "random"}, seed=0)
    with pytest.raises(ValueError, match="fewer sites or more cases"):
        partition({**_cfg("iid"), "num_sites": 30}, seed=0)


def test_every_method_steps_with_the_experiments_batch_size_and_augmentation(tmp_path):
    """A site config's own ``train.batch_size``, ``train.augment`` and ``train.test_mirroring``
    do not override the experiment's: all methods (federated, local, centralized) must take
    optimizer steps of the same size on the same kind of cases, and be scored alike."""
    from client.site import SiteRuntime
    from simulation.methods import Experiment, write_site_dirs

    train = {"batch_size": 2, "num_workers": 0, "augment": False, "test_mirroring": False}
    sources = [{"site": "a", "data": POOL, "seed": 1, "train": train}]
    sites = partition({"kind": "source", "sources": sources}, seed=0)
    experiment = Experiment(
        sites=sites, work_dir=tmp_path, batch_size=5, augment=True, test_mirroring=True
    )
    (state_dir,) = write_site_dirs(experiment, "m")
    runtime = SiteRuntime.from_state_dir(state_dir)
    assert runtime.cfg["train"]["batch_size"] == 5
    assert next(iter(runtime.loader("train", shuffle=False)))["image"].shape[0] == 5
    assert runtime.cfg["train"]["augment"] is True
    assert runtime.cfg["train"]["test_mirroring"] is True
