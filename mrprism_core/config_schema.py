"""Typed configs: a composed Hydra config merged into a dataclass schema before anything runs.

OmegaConf checks the merge: a value of the wrong type (``train.batch_size=abc``) or a key the
schema does not know (``trian.epochs=4``) is refused with the key, the value and what was
expected. Then numbers outside their range (``federation.rounds=-1``; fields made with
:func:`at_least` or :func:`above`) are refused the same way. Free-form blocks (a data set's
reader options, model overrides) are ``dict`` fields and are checked by whoever reads them.
The site config's schema is ``client/site_schema.py``; centralized training's
(``site_configs/train.yaml``) and the simulation's (``site_configs/simulation.yaml``) are here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

__all__ = [
    "SimulationSchema",
    "TrainRunSchema",
    "above",
    "at_least",
    "check_bounds",
    "checked",
    "within",
]


def at_least(default: Any, bound: float) -> Any:
    """A schema field whose value (unless None) must be ``>= bound``."""
    return field(default=default, metadata={"at_least": bound})


def above(default: Any, bound: float) -> Any:
    """A schema field whose value (unless None) must be ``> bound``."""
    return field(default=default, metadata={"above": bound})


def within(default: Any, low: float, high: float) -> Any:
    """A schema field whose value (unless None) must lie in ``[low, high]``."""
    return field(default=default, metadata={"at_least": low, "at_most": high})


def checked(schema: type, cfg: Any, what: str) -> Any:
    """``cfg`` (a composed OmegaConf config or a mapping) merged into ``schema``.

    Raises:
        ValueError: naming the key, the value and the expected type, or the unknown key and
            the keys ``what`` (e.g. "a site config") has at that level.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    typed = OmegaConf.structured(schema)
    _writable(typed)
    try:
        merged = OmegaConf.merge(typed, cfg)
    except ValidationError as err:
        expected = getattr(err, "msg", str(err)).splitlines()[0]
        raise ValueError(f"{err.full_key}={err.value!r} is refused: {expected}") from err
    except ConfigKeyError as err:
        raise ValueError(
            f"unknown key {err.full_key!r} (a typo?); {what} has "
            f"{sorted(f.name for f in fields(schema))} and their sub-keys"
        ) from err
    check_bounds(schema, merged)
    return merged


def check_bounds(schema: type, node: Any, prefix: str = "", kebab: bool = False) -> None:
    """Refuse a value of ``node`` (a mapping shaped like ``schema``) outside the range its
    field declares (:func:`at_least`, :func:`above`, :func:`within`), naming ``prefix`` + the
    key (spelt with dashes when ``kebab``, as Flower's run config is)."""
    for spec in fields(schema):
        value = node[spec.name]
        key = prefix + (spec.name.replace("_", "-") if kebab else spec.name)
        if is_dataclass(spec.default_factory):  # a nested schema (MISSING, list: not)
            check_bounds(spec.default_factory, value, f"{key}.", kebab)  # type: ignore[arg-type]
            continue
        if value is None:
            continue
        if "at_least" in spec.metadata and not value >= spec.metadata["at_least"]:
            raise ValueError(f"{key}={value!r} is refused: must be >= {spec.metadata['at_least']}")
        if "above" in spec.metadata and not value > spec.metadata["above"]:
            raise ValueError(f"{key}={value!r} is refused: must be > {spec.metadata['above']}")
        if "at_most" in spec.metadata and not value <= spec.metadata["at_most"]:
            raise ValueError(f"{key}={value!r} is refused: must be <= {spec.metadata['at_most']}")


def _writable(node: Any) -> None:
    """Frozen dataclasses inside a schema (e.g. ``PrivacyConfig``) arrive read-only; the
    merge must be able to write into them (each node carries its own flag)."""
    from omegaconf import DictConfig, OmegaConf

    OmegaConf.set_readonly(node, False)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _writable(child)


# -- centralized training: python -m mrprism_core.train ---------------------------------------


@dataclass
class TrainOptions:
    epochs: int = at_least(10, 1)  # passes over the training split
    batch_size: int = at_least(8, 1)  # cases per optimizer step
    lr: float | None = above(None, 0)  # Adam learning rate; None = the preset's
    lr_schedule: str = "constant"  # the rate over the epochs: constant or cosine
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    seed: int = 0  # seeds weights, shuffling and Eq. 14's random confidences
    num_workers: int = at_least(0, 0)  # DataLoader worker processes
    augment: bool = False  # random flips and quarter turns of the training cases
    progress: bool = True  # progress bars
    keep_best: bool = True  # test the best validation epoch, not the last
    test_mirroring: bool = False  # score the test split averaged over 4 mirrorings per case


@dataclass
class ModelChoice:
    name: str = "mrprism"  # registered model name
    preset: str = "tiny"  # architecture preset
    options: dict[str, Any] | None = None  # preset/loss overrides (None = none)


@dataclass
class TrainRunSchema:
    train: TrainOptions = field(default_factory=TrainOptions)
    model: ModelChoice = field(default_factory=ModelChoice)
    data: dict[str, Any] = field(default_factory=dict)  # checked by its reader
    out_dir: str = "runs/centralized"  # checkpoints and results
    resume: bool = True  # continue from <out_dir>/last.pt
    tracking: str = "none"  # none, tensorboard or mlflow


# -- the simulation: python -m simulation.run --------------------------------------------------


@dataclass
class PartitionOptions:
    kind: str = "source"  # source, iid, dirichlet or raters
    sources: list[str] = field(default_factory=list)  # site configs (kind=source)
    source_overrides: list[str] = field(default_factory=list)  # Hydra overrides for each
    config_dir: str | None = None  # the hospital's own folder of site YAMLs
    num_sites: int = at_least(3, 1)  # iid / dirichlet / raters: virtual sites
    alpha: float = above(0.5, 0)  # dirichlet concentration
    skew: str = "quantity"  # dirichlet: quantity or label
    min_raters: int = at_least(2, 1)  # raters: the smallest rater subset of a site
    data: dict[str, Any] = field(default_factory=dict)  # the pooled set; checked by its reader


@dataclass
class FederationOptions:
    rounds: int = at_least(10, 1)  # federated rounds
    local_epochs: int = at_least(1, 1)  # passes over a site's cases per round
    strategy: str = "fedavg"  # server strategy
    server_momentum: float = at_least(0.9, 0)  # fedavgm
    server_lr: float = above(0.01, 0)  # fedadam / fedyogi
    lr: float | None = above(None, 0)  # Adam learning rate; None = the preset's
    lr_schedule: str = "constant"  # the rate over the rounds: constant or cosine
    drift_correction: str = "none"  # client drift: none or scaffold (control variates)
    persist_optimizer: bool = True  # sites keep their Adam state between rounds
    update_precision: str = "float16"  # training replies: float16 change or float32 weights
    preset: str = "tiny"  # architecture preset
    model_options: dict[str, Any] | None = None  # model overrides (null = none)
    batch_size: int = at_least(8, 1)  # cases per optimizer step
    augment: bool = False  # random flips and quarter turns of the training cases, every method
    test_mirroring: bool = False  # test splits scored over 4 mirrorings per case, every method
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    eval_split: str = "test"  # split every method is scored on
    select: str = "last"  # round reported: last, or best_val (best validation soft Dice)
    ray_num_cpus: int | None = at_least(None, 1)  # CPUs of a local Ray (None: all)
    ray_address: str | None = None  # join this Ray cluster
    client_num_cpus: float = above(1.0, 0)  # CPUs one virtual site reserves
    client_num_gpus: float = at_least(0.0, 0)  # GPU share of one virtual site
    quality_weight: str = "examples*quality"  # federated_quality's update weight


@dataclass
class SimulationSchema:
    out_dir: str = "runs/simulation"  # report, plots and the sites' state
    seed: int = 0  # partitions, weights, heads, shuffles
    seeds: int = at_least(1, 1)  # runs, seeds seed .. seed+seeds-1; more than one: mean and spread
    methods: list[str] = field(default_factory=list)  # the grid
    progress: bool = True  # progress bar
    tracking: str = "none"  # none, tensorboard or mlflow
    partition: PartitionOptions = field(default_factory=PartitionOptions)
    federation: FederationOptions = field(default_factory=FederationOptions)
