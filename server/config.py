"""Run-wide settings of a federated run: ``[tool.flwr.app.config]`` keys (kebab-case), read
once into a frozen dataclass (snake_case) at the boundary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from mrprism_core.config_schema import above, at_least, check_bounds
from mrprism_core.models.config import get_preset
from mrprism_core.protocol import coerce

__all__ = ["RunConfig"]


@dataclass(frozen=True)
class RunConfig:
    """Every field has a default, so a run with an empty run_config (simulation API) works."""

    num_server_rounds: int = at_least(3, 1)  # federated rounds
    local_epochs: int = at_least(1, 1)  # passes over the site's training split per round
    strategy: str = "fedavg"  # fedavg, fedavgm, fedprox, fedadam, fedyogi, fedmedian, ...
    # share of connected sites sampled for training each round
    fraction_train: float = above(1.0, 0)
    fraction_evaluate: float = at_least(1.0, 0)  # share of sites sampled for evaluation (0: none)
    min_train_nodes: int = at_least(2, 1)  # a training round waits for at least this many sites
    min_evaluate_nodes: int = at_least(2, 0)  # an evaluation round waits for this many sites
    min_available_nodes: int = at_least(2, 1)  # sites that must be connected before round 1 starts
    # usable updates a round needs to change the global model
    min_train_replies: int = at_least(1, 1)
    aggregation_weight: str = "examples"  # update weight: examples, quality, examples*quality
    proximal_mu: float = at_least(0.01, 0)  # FedProx proximal weight
    server_lr: float = above(0.01, 0)  # FedAdam/FedYogi server learning rate (eta)
    server_momentum: float = at_least(0.9, 0)  # FedAvgM: momentum of the server's averaged update
    trim_beta: float = at_least(0.2, 0)  # FedTrimmedAvg: fraction trimmed at each end
    krum_malicious: int = at_least(0, 0)  # Krum: number of malicious sites tolerated
    dp_mode: str = "none"  # user-level DP: none, server-fixed, client-fixed, server-adaptive
    # user-level DP: noise std = this x clipping norm / sites
    dp_noise_multiplier: float = at_least(0.1, 0)
    # user-level DP: bound on a site's update norm (adaptive: start)
    dp_clipping_norm: float = above(1.0, 0)
    # user-level DP: sites sampled per round (sets the noise scale)
    dp_sampled_sites: int = at_least(2, 1)
    dp_delta: float = above(1e-5, 0)  # user-level DP: the delta the reported epsilon is stated with
    secure_aggregation: bool = False  # SecAgg+: the server sees only the sum of the updates
    secagg_num_shares: float = 3  # SecAgg+: key shares per site (int > 2, or a share of the sites)
    secagg_reconstruction_threshold: float = 2  # SecAgg+: shares needed to unmask a dropped site
    # SecAgg+: weights are clipped to +-this before quantization
    secagg_clipping_range: float = above(8.0, 0)
    # SecAgg+: most examples a site weighs in with (lower=finer)
    secagg_max_weight: float = above(1000.0, 0)
    # SecAgg+: the weights come with a round's first message; sites with a worker train during
    # the key exchange instead of after it
    secagg_train_ahead: bool = True
    # SecAgg+: the next round's keys are made with this round's unmasking; a round is then
    # three message round trips, not four
    secagg_keys_ahead: bool = True
    model: str = "mrprism"  # mrprism or a baseline (mrprism_core.models.MODEL_NAMES)
    preset: str = "tiny"  # architecture preset
    model_options: str = "{}"  # JSON object of preset/loss overrides, e.g. {"local_norms": true}
    local_modules: str = ""  # comma-separated sub-modules kept local; empty = model default
    in_channels: int = at_least(3, 1)  # image channels every site must have
    num_classes: int = at_least(2, 1)  # classes every site must have
    # rater slots of the global model; matters only if rater heads are shared
    num_raters: int = at_least(1, 1)
    # Adam learning rate at the sites; 0 = the preset's (tiny 1e-2, paper 1e-4)
    lr: float = at_least(0.0, 0)
    # the sites' learning rate over the rounds: constant, or cosine (decays towards 0)
    lr_schedule: str = "constant"
    # client drift: none, or scaffold (control variates; fedavg/fedprox, 2.3x the bytes)
    drift_correction: str = "none"
    persist_optimizer: bool = True  # sites keep their Adam state between rounds (at the site)
    # training replies: float16 (the change of the weights, half the bytes) or float32 (the
    # weights); float32 always under dp-mode client-fixed, whose clipping reads the weights
    update_precision: str = "float16"
    # training messages: float16 (the change since the weights a site's worker holds, server/
    # downloads.py) or float32 (the weights); float32 always under dp-mode client-fixed
    download_precision: str = "float16"
    personalization: str = (
        "fedper"  # fedper, fedrep, fedbabu or ditto (mrprism_core.personalization)
    )
    # Ditto: pull of a site's personal model toward the global one
    ditto_lambda: float = at_least(0.1, 0)
    seed: int = 0  # seeds the initial global weights and each site's shuffles
    out_dir: str = "runs/federated"  # global checkpoint, metrics.jsonl, summary.json
    resume: bool = True  # continue from <out_dir>/global_model.pt when it exists
    initial_checkpoint: str = ""  # start from this checkpoint's shared weights ("" = fresh)
    round_timeout: float = above(3600.0, 0)  # seconds to wait for replies in each phase of a round
    pipeline_rounds: bool = True  # deployment: send round r+1's training with round r's evaluation
    # pipelined rounds: sites evaluate round r in round r+1's training message, whose weights
    # are the same; round r's evaluation message then carries none (107 MiB less, paper preset)
    evaluate_in_training: bool = True
    eval_split: str = "val"  # site split used for the per-round evaluation
    select_split: str = ""  # also score this split each round ("select-soft-dice"); "" = none
    tracking: str = "none"  # none, tensorboard (<out-dir>/tensorboard/) or mlflow: round scalars

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from kebab- or snake-case keys; unknown keys raise, naming the valid ones."""
        types = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in types:
                valid = sorted(n.replace("_", "-") for n in types)
                raise ValueError(f"unknown run-config key {key!r}; valid keys: {valid}")
            kwargs[name] = coerce(str(types[name]), value, f"run-config {key!r}")
        config = cls(**kwargs)
        check_bounds(cls, asdict(config), "run-config ", kebab=True)
        return config

    def as_run_config(self) -> dict[str, Any]:
        """The kebab-case mapping :meth:`from_mapping` reads back."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def site_lr(self) -> float:
        """The learning rate the sites train with: ``lr``, or the preset's when it is 0."""
        return self.lr if self.lr > 0 else get_preset(self.preset).lr

    def model_spec(self) -> dict[str, Any]:
        """Architecture every site must build (sent to sites in the message config)."""
        try:
            options = json.loads(self.model_options or "{}")
        except json.JSONDecodeError as err:
            raise ValueError(f"model-options is not valid JSON: {self.model_options!r}") from err
        if self.local_modules:
            options["local_modules"] = [m.strip() for m in self.local_modules.split(",") if m]
        return {
            "name": self.model,
            "preset": self.preset,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "options": options,
        }
