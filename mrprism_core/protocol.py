"""The round protocol: what the server asks of a site in a round, and what the site answers.

Two typed records with ``to_config``/``from_config`` (plain dicts of scalars, lists and
strings, what Flower's ``ConfigRecord``/``MetricRecord`` carry). The server, the SecAgg+ path,
the ClientApp and the simulation use them instead of spelling the string keys themselves, so a
renamed or added field changes in one place. Nothing here imports Flower.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .lr_schedule import scheduled_lr

__all__ = [
    "BASE_VERSION_KEY",
    "CLIPPING_NORM_KEY",
    "CONTROL_KEY",
    "EVALUATED_BEFORE_KEY",
    "HOLDS_WEIGHTS_KEY",
    "KEEP_EVALUATION_KEY",
    "KEPT_EVALUATION_KEY",
    "KEYS_AHEAD_KEY",
    "LEGACY_WEIGHTS_RECORD",
    "PACKED_KEY",
    "RoundInstructions",
    "SiteReply",
    "TRAIN_AHEAD_KEY",
    "WEIGHTS_VERSION_KEY",
    "coerce",
]

#: Name of the one array that carries the shared weights in a message.
PACKED_KEY = "shared-weights"
#: With ``drift-correction=scaffold``: the array beside them that carries the server's control
#: variate (to a site) or the site's new one (in its reply), packed like the weights.
CONTROL_KEY = "control-variate"

# Pipelined deployment rounds: round r+1's training carries the weights round r's evaluation
# would, so a site that gets both evaluates them in the training message, before it trains
# (with round r's rater heads), and round r's evaluation message, sent after it, carries no
# weights, only the request for that kept result. Per message, so not in RoundInstructions.
#: Training config flag: evaluate the received weights for the previous round first; keep it.
KEEP_EVALUATION_KEY = "keep-evaluation"
#: The config key of Flower's client-side DP clipping (``fixedclipping_mod``): its training
#: replies carry the weights themselves, which the mod clips (never their float16 change).
CLIPPING_NORM_KEY = "clipping_norm"
#: Evaluation config flag: reply with the evaluation kept by the next round's training message.
KEPT_EVALUATION_KEY = "kept-evaluation"

# Half-precision downloads (``download-precision``): a training message may carry, instead of
# the float32 weights (PACKED_KEY), their float16 change since weights the site holds
# (``mrprism_core.update_codec``'s UPDATE_KEY and UPDATE_SCALE_KEY). Per message, so not in
# RoundInstructions.
#: Training config: the id of the weights the message brings (set whenever the server encodes)
WEIGHTS_VERSION_KEY = "weights-version"
#: Training config, with a float16 change only: the id of the weights the change applies to
BASE_VERSION_KEY = "base-version"
#: A training reply's detail: the id of the received weights the site now holds for the next
#: message's change (only sites that keep them: those with a site worker)
HOLDS_WEIGHTS_KEY = "holds-weights"
#: The kept evaluation's detail (site record): the round whose training message evaluated.
EVALUATED_BEFORE_KEY = "evaluated-before-training-round"

# SecAgg+ rounds (``secagg-train-ahead``): the round's weights and config come with the round's
# first message to a site (setup, or share keys when its keys were made ahead), so that a site
# with a worker trains while the keys are exchanged. A site that started doing so marks its
# reply with a record of this name; its collect stage's message then carries the config only,
# marked the same way, and the site masks what it trained.
#: The record name of that mark, in both directions.
TRAIN_AHEAD_KEY = "train-ahead"
# SecAgg+ rounds (``secagg-keys-ahead``): a round's unmask messages carry the next round's
# expected setup parameters in a record of this name; a site answers its unmask stage, then
# makes the next round's keys as its setup stage would and returns them in its unmask reply
# under the same name, so that the next round's setup stage need not be sent to it.
#: The record name, in both directions.
KEYS_AHEAD_KEY = "secagg-keys-ahead"
#: The record in which Flower's legacy fit instructions (what SecAgg+ sends) carry the weights.
LEGACY_WEIGHTS_RECORD = "fitins.parameters"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RoundInstructions:
    """The server's instructions for one round, the same for every site.

    ``server_round`` and ``proximal_mu`` are also written by Flower's strategies themselves
    (``server-round`` by all, ``proximal-mu`` by FedProx); other keys a strategy or mod adds
    (e.g. a DP clipping norm) are left to their own readers.
    """

    model_spec: dict[str, Any]  # the architecture every site builds (models.build_model_for_data)
    layout: str  # fingerprint of the shared-weight layout (federated.StateLayout)
    lr: float  # Adam learning rate at the sites (the base rate of lr_schedule)
    seed: int  # seeds each site's per-round shuffles
    num_server_rounds: int  # rounds planned (sites calibrate DP-SGD noise on it)
    persist_optimizer: bool = True  # sites keep their Adam state between rounds
    personalization: str = "fedper"  # mrprism_core.personalization.PERSONALIZATIONS
    ditto_lambda: float = 0.1  # Ditto's pull toward the global model
    local_epochs: int = 1  # training: passes over the site's training split
    eval_split: str = "val"  # evaluation: the split scored
    # evaluation: also score this split, sent as "select-soft-dice" for choosing a round by
    # (the simulation's federation.select=best_val); "" = none
    select_split: str = ""
    server_round: int = 0  # this round (Flower's strategies set it too)
    proximal_mu: float = 0.0  # FedProx's proximal weight (set by Flower's FedProx)
    lr_schedule: str = "constant"  # the rate over the rounds (mrprism_core.lr_schedule)
    drift_correction: str = "none"  # none or scaffold (mrprism_core.drift_correction)
    # scaffold: names the server's control variate; a site's c_i saved under another counts as none
    control_ledger: str = ""
    # training replies: float16 (the change of the weights, mrprism_core.update_codec) or
    # float32 (the weights); float32 is what a server that does not say means
    update_precision: str = "float32"

    def round_lr(self) -> float:
        """This round's learning rate: ``lr`` under ``lr_schedule`` over the planned rounds."""
        return scheduled_lr(self.lr, self.server_round, self.num_server_rounds, self.lr_schedule)

    def to_config(self) -> dict[str, Any]:
        """Kebab-case keys; the model spec as a JSON string (records hold no nested dicts)."""
        config = {_kebab(f.name): getattr(self, f.name) for f in fields(self)}
        config["model-spec"] = json.dumps(self.model_spec, sort_keys=True)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundInstructions:
        """Read :meth:`to_config`'s output (or Flower's copy of it); missing optional keys take
        their defaults, keys of other readers are ignored."""
        required = [f for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [_kebab(f.name) for f in required if _kebab(f.name) not in config]
        if missing:
            raise ValueError(f"round instructions lack {missing}; is the server up to date?")
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = _kebab(f.name)
            if key not in config:
                continue
            value = config[key]
            if f.name == "model_spec":
                value = json.loads(str(value)) if isinstance(value, str) else dict(value)
            else:
                value = coerce(str(f.type), value, f"round instruction {key!r}")
            values[f.name] = value
        return cls(**values)


def coerce(kind: str, value: Any, what: str) -> Any:
    """``value`` as the field type ``kind`` (``bool``, ``int``, ``float``, else ``str``), the
    way config records and command lines spell them; a value that is not one raises, naming
    ``what`` (e.g. ``"run-config 'lr'"``)."""
    try:
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be {kind}, got {value!r}") from err


@dataclass(frozen=True)
class SiteReply:
    """What a site answers after a round: who it is, what it trained on, and its numbers.

    ``metrics`` are the scalars Flower aggregates across sites weighted by ``num_examples``
    (the same keys at every site); ``details`` are per-site extras (lists, strings) that are
    logged but never aggregated. Neither ever holds a rater head or an image.
    """

    site: str  # the site's name (its config's ``site``)
    num_raters: int  # raters at the site
    heads_from_round: int  # the round the site's rater heads were last saved in (0 = fresh)
    num_examples: int  # cases the numbers are over (training or evaluation split)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_metrics(self) -> dict[str, Any]:
        """The ``MetricRecord``: the aggregatable numbers and ``num-examples``."""
        return {**self.metrics, "num-examples": self.num_examples}

    def to_site(self) -> dict[str, Any]:
        """The ``site`` ``ConfigRecord``: identity and the per-site details."""
        return {
            "name": self.site,
            "num-raters": self.num_raters,
            "heads-from-round": self.heads_from_round,
            **self.details,
        }

    def to_config(self) -> dict[str, Any]:
        """Everything in one flat mapping (the SecAgg+ path's legacy ``FitRes.metrics``)."""
        site = self.to_site()
        site["site"] = site.pop("name")
        return {**self.to_metrics(), **site}

    @classmethod
    def from_records(
        cls, metrics: Mapping[str, Any], site: Mapping[str, Any] | None = None
    ) -> SiteReply:
        """Read :meth:`to_metrics` and :meth:`to_site` back; or, with ``site`` None,
        :meth:`to_config`'s flat mapping (every number in it is then a metric)."""
        numbers = dict(metrics)
        details = dict(site) if site is not None else {}
        if site is None:  # the flat form: identity and strings came with the metrics
            details = {k: numbers.pop(k) for k in list(numbers) if not _is_number(numbers[k])}
            for key in ("num-raters", "heads-from-round"):
                if key in numbers:
                    details[key] = numbers.pop(key)
        name = details.pop("name", None) or details.pop("site", None)
        if name is None:
            raise ValueError("a site reply without the site's name")
        return cls(
            site=str(name),
            num_raters=int(details.pop("num-raters", 0)),
            heads_from_round=int(details.pop("heads-from-round", 0)),
            num_examples=int(numbers.pop("num-examples", 0)),
            metrics={k: float(v) for k, v in numbers.items()},
            details=details,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
