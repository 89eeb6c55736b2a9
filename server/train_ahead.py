"""SecAgg+ rounds whose training overlaps the key exchange (``secagg-train-ahead``).

Flower's ``SecAggPlusWorkflow`` sends a round's weights in its third stage (collect masked
vectors), after two stages that only exchange keys (setup, share keys), so in deployment a
site's training starts only once two more messages have gone out and back. Here the setup
stage's message already carries the round's fit instructions: a site whose worker takes them
starts training while the keys are exchanged, and says so in its setup reply; its collect
stage's message then carries the config without the weights (they went once, as before), and
the site masks what it trained. A site that does not answer so (no site worker, an older
ClientApp) gets the weights with the collect stage, as in Flower's protocol, and from then on
only there: its setup messages of the run's later rounds carry no weights it would not use.

What the server sees is unchanged: the round's global weights go to each site once, every
site's update still leaves it only masked, and a site that drops at any stage is handled by
SecAgg+ as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.server.workflow import SecAggPlusWorkflow

from mrprism_core.protocol import LEGACY_WEIGHTS_RECORD, TRAIN_AHEAD_KEY

from .grid import PromptGrid, readdressed

__all__ = ["TrainAheadSecAggPlus"]


class TrainAheadSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with each round's fit instructions sent at the setup stage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training_ahead: set[int] = set()  # this round's sites that train since setup
        self.declined: set[int] = set()  # sites that once did not: no weights at setup again

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        self.training_ahead = set()
        # the strategy's fit instructions exist by the time the stage sends its messages
        return super().setup_stage(_WithFitInstructions(grid, state, self), context, state)

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return super().collect_masked_vectors_stage(
            _WithoutSentWeights(grid, self.training_ahead), context, state
        )


class _WithFitInstructions(PromptGrid):
    """The setup stage's messages, each with its site's fit instructions added; notes the
    sites whose replies say they started training."""

    def __init__(self, grid: Any, state: Any, workflow: TrainAheadSecAggPlus) -> None:
        super().__init__(grid)
        self.state = state
        self.workflow = workflow

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        fit_instructions = self.state.nid_to_fitins
        declined = self.workflow.declined
        sent = [
            msg
            if msg.metadata.dst_node_id in declined
            else readdressed(
                msg, {**dict(fit_instructions[msg.metadata.dst_node_id]), **dict(msg.content)}
            )
            for msg in messages
        ]
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            if TRAIN_AHEAD_KEY in reply.content.config_records:
                self.workflow.training_ahead.add(node)
            else:
                declined.add(node)
        return replies


class _WithoutSentWeights(PromptGrid):
    """The collect stage's messages to sites that train since the setup stage: the config
    and key shares without the weights, marked so."""

    def __init__(self, grid: Any, training_ahead: set[int]) -> None:
        super().__init__(grid)
        self.training_ahead = training_ahead

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = []
        for msg in messages:
            if msg.metadata.dst_node_id in self.training_ahead:
                records = dict(msg.content)
                records[LEGACY_WEIGHTS_RECORD] = ArrayRecord()
                records[TRAIN_AHEAD_KEY] = ConfigRecord({"started": True})
                msg = readdressed(msg, records)
            sent.append(msg)
        return self.grid.send_and_receive(sent, timeout=timeout)
