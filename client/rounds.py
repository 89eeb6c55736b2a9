"""One message's work at a site, Flower-free: a training round or an evaluation, from the
server's instructions and packed shared weights to the weights to send back and the reply.

The ClientApp runs it in its own process (simulation, or a site without a worker), the site
worker (``client/worker.py``) runs it in its long-lived one; both get the same
:class:`RoundOutcome`. Rater heads, data and optimizer state stay in the site's state directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrprism_core.checkpoint import CorruptCheckpointError
from mrprism_core.federated import QUALITY_KEY, SELECT_KEY, StateLayout, split_evaluation
from mrprism_core.models import SegmentationModel, split_state
from mrprism_core.protocol import (
    CLIPPING_NORM_KEY,
    CONTROL_KEY,
    EVALUATED_BEFORE_KEY,
    HOLDS_WEIGHTS_KEY,
    KEEP_EVALUATION_KEY,
    PACKED_KEY,
    RoundInstructions,
    SiteReply,
)
from mrprism_core.update_codec import encode_update

from .held_weights import HeldWeights, received_weights
from .kept_evaluation import keep_evaluation
from .site import SiteRuntime
from .site_config import SiteDataError
from .worker_protocol import RoundOutcome

__all__ = ["SITE_FAULTS", "RoundOutcome", "run_message"]

# A site that cannot take part (bad data, damaged state, a model that does not fit its data)
# answers with an error naming the problem; the server leaves it out and the round goes on.
SITE_FAULTS = (SiteDataError, CorruptCheckpointError, ValueError)


def _site_model(
    site: SiteRuntime, instructions: RoundInstructions, packed: np.ndarray
) -> tuple[SegmentationModel, StateLayout]:
    """The site's model with the server's shared weights and its own rater heads."""
    model = site.build_model(instructions.model_spec)
    layout = StateLayout.of(split_state(model)[0])
    if layout.fingerprint != instructions.layout:
        raise ValueError(
            f"site {site.name}: shared-weight layout {layout.fingerprint} differs from the "
            f"server's {instructions.layout}; both sides must run the same code and model spec"
        )
    writable = np.require(packed, requirements=["C", "W"])  # a received buffer is read-only
    site.load_shared(model, layout.unpack(torch.from_numpy(writable)))
    return model, layout


def _server_control(
    instructions: RoundInstructions, layout: StateLayout, control: np.ndarray | None
) -> dict[str, torch.Tensor] | None:
    """The server's SCAFFOLD control variate per shared tensor (None: no drift correction)."""
    if instructions.drift_correction == "none":
        return None
    if control is None:
        raise ValueError(
            f"drift-correction={instructions.drift_correction} but the message carries no "
            f"{CONTROL_KEY!r} array; is the server up to date?"
        )
    return layout.unpack(torch.from_numpy(np.require(control, requirements=["C", "W"])))


def _keep_previous_evaluation(
    site: SiteRuntime, instructions: RoundInstructions, run_id: int, kept: RoundOutcome
) -> None:
    """Keep ``kept``, the evaluation of this training message's weights, for the previous
    round's evaluation message (pipelined rounds), marked with the round that evaluated."""
    if kept.reply is not None:
        details = {**kept.reply.details, EVALUATED_BEFORE_KEY: instructions.server_round}
        kept = RoundOutcome(reply=replace(kept.reply, details=details))
    keep_evaluation(site.store.root, run_id, instructions.server_round - 1, kept)


def _train_message(
    site: SiteRuntime,
    instructions: RoundInstructions,
    config: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    run_id: int,
    held: HeldWeights | None,
) -> RoundOutcome:
    """A training round; with ``keep_evaluation`` the received weights are first evaluated,
    before training replaces the rater heads, on the same model (evaluation leaves it as it
    was: eval mode, no gradients; training reseeds and sets train mode)."""
    keep_evaluation = bool(config.get(KEEP_EVALUATION_KEY))
    try:
        packed, holds = received_weights(site.name, config, arrays, held)
        model, layout = _site_model(site, instructions, packed)
    except SITE_FAULTS as err:
        if keep_evaluation:
            _keep_previous_evaluation(site, instructions, run_id, RoundOutcome(error=str(err)))
        raise
    if keep_evaluation:
        try:
            kept = _evaluate(site, instructions, model)  # reads no per-round field
        except SITE_FAULTS as err:
            kept = RoundOutcome(error=str(err))
        _keep_previous_evaluation(site, instructions, run_id, kept)
    outcome = _train(
        site,
        instructions,
        model,
        layout,
        packed,
        run_id,
        arrays.get(CONTROL_KEY),
        clipped=CLIPPING_NORM_KEY in config,  # Flower's fixedclipping_mod runs on this reply
    )
    if holds and outcome.reply is not None:  # the server may send the next weights' change
        details = {**outcome.reply.details, HOLDS_WEIGHTS_KEY: holds}
        outcome.reply = replace(outcome.reply, details=details)
    return outcome


def _sent_weights(
    trained: np.ndarray, received: np.ndarray, instructions: RoundInstructions, clipped: bool
) -> dict[str, np.ndarray]:
    """The training reply's weight arrays: their float16 change when the server asks for it
    (``update-precision``; half the bytes on every hop back to the server), else the float32
    weights, as always under Flower's client-side DP clipping (``clipped``), which reads the
    weights themselves."""
    if instructions.update_precision == "float16" and not clipped:
        encoded = encode_update(trained, received)
        if encoded is not None:
            return encoded
    return {PACKED_KEY: trained}


def _train(
    site: SiteRuntime,
    instructions: RoundInstructions,
    model: SegmentationModel,
    layout: StateLayout,
    packed: np.ndarray,
    run_id: int,
    control: np.ndarray | None = None,
    clipped: bool = False,
) -> RoundOutcome:
    server_control = _server_control(instructions, layout, control)
    heads_from = site.heads_round  # before this round's save replaces the snapshot
    server_round = instructions.server_round
    result = site.train(
        model,
        local_epochs=instructions.local_epochs,
        lr=instructions.round_lr(),
        seed=site.round_seed(instructions.seed, server_round),
        proximal_mu=instructions.proximal_mu,
        planned_rounds=instructions.num_server_rounds,
        persist_optimizer=instructions.persist_optimizer,
        server_round=server_round,
        personalization=instructions.personalization,
        ditto_lambda=instructions.ditto_lambda,
        server_control=server_control,
        control_ledger=instructions.control_ledger,
    )
    site.save(model, server_round=server_round, run_id=run_id)
    metrics = {
        "train-loss": float(result["loss"]),
        "skipped-steps": int(result["skipped_steps"]),
        **{k: float(v) for k, v in result.items() if k.startswith("dp-")},
    }
    if site.shares_quality:  # the one number of the rater report a site may send (opt-in)
        metrics[QUALITY_KEY] = site.annotation_quality(model)
    reply = SiteReply(
        site=site.name,
        num_raters=site.info.num_raters,
        heads_from_round=heads_from,
        num_examples=int(result["num_examples"]),
        metrics=metrics,
    )
    trained = layout.pack(split_state(model)[0]).numpy()  # rater heads stay here
    shared = _sent_weights(trained, packed, instructions, clipped)
    control = None
    if server_control is not None:  # the shared buffers (no gradient) get zeros
        control = layout.pack_padded(result["control_change"]).numpy()
    return RoundOutcome(shared=shared, reply=reply, control=control)


def _evaluate(
    site: SiteRuntime, instructions: RoundInstructions, model: SegmentationModel
) -> RoundOutcome:
    """An evaluation reply for ``model`` (the received weights with the site's heads)."""
    model = site.evaluated_model(model, instructions.personalization)
    result = site.evaluate(model, instructions.eval_split)
    scalars, details = split_evaluation(result)
    if instructions.select_split:  # the score a round is chosen by (simulation: best_val)
        chosen_by = site.evaluate(model, instructions.select_split)
        scalars[SELECT_KEY] = float(chosen_by["soft_dice"])
    reply = SiteReply(
        site=site.name,
        num_raters=site.info.num_raters,
        heads_from_round=site.heads_round,
        num_examples=int(result["num_examples"]),
        metrics=scalars,
        details=details,
    )
    return RoundOutcome(reply=reply)


def run_message(
    kind: str,
    config: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    *,
    run_id: int,
    state_dir: str | Path | None = None,
    site: SiteRuntime | None = None,
    held: HeldWeights | None = None,
) -> RoundOutcome:
    """Run one ``train`` or ``evaluate`` message at the site whose state is in ``state_dir``
    (or on an already open ``site``). ``arrays``: the message's, by name: the packed shared
    weights or their float16 change since the ``held`` weights (``client/held_weights.py``;
    a site worker holds them, nothing else does), and with SCAFFOLD the server's packed
    control variate. A training message flagged ``keep-evaluation`` first evaluates its
    weights for the previous round (``client/kept_evaluation.py``). A site fault becomes
    :attr:`RoundOutcome.error`."""
    try:
        if site is None:
            site = SiteRuntime.from_state_dir(state_dir)  # type: ignore[arg-type]
        instructions = RoundInstructions.from_config(config)
        if kind == "train":
            return _train_message(site, instructions, config, arrays, run_id, held)
        if kind == "evaluate":
            packed, _ = received_weights(site.name, config, arrays)  # an evaluation's are kept
            return _evaluate(site, instructions, _site_model(site, instructions, packed)[0])
        raise ValueError(f"unknown message kind {kind!r}")
    except SITE_FAULTS as err:
        return RoundOutcome(error=str(err))
