"""Our SecAgg+ rounds: Flower's ``SecAggPlusWorkflow``, four message round trips per round
(setup, share keys, collect masked vectors, unmask), with two things done ahead and the
unmasking of sites that drop mended.

**Training during the key exchange** (``secagg-train-ahead``). Flower sends a round's weights
in the third stage, so in deployment a site's training starts only once two more messages have
gone out and back. Here the round's fit instructions go with the first message the round sends
a site (the setup stage's, or the share-keys stage's when its keys were made ahead): a site
whose worker takes them starts training at once and says so in its reply; its collect stage's
message then carries the config without the weights (they went once, as before), and the site
masks what it trained. A site that does not answer so (no site worker, an older ClientApp) gets
the weights with the collect stage, as in Flower's protocol, and from then on only there.

**The next round's keys made with this round's unmasking** (``secagg-keys-ahead``). The setup
stage only hands each site the round's protocol parameters (how many sites, shares, the
quantization), which a site answers with two fresh public keys. Those parameters do not depend
on the round's weights, so this round's unmask messages carry the next round's expected setup
parameters; the site answers its unmask stage and then makes the next round's keys, as its
setup stage would, and sends the public keys with its unmask reply. When the next round's
setup stage has the same parameters (the same number of sites), a site whose keys were made so
is not sent a setup message: its reply is the one it already gave. A round then costs three
round trips, not four. A site that did not answer so, a changed number of sites, or a restarted
ServerApp gets a setup message as in Flower's protocol.

What the server sees is unchanged: the round's global weights go to each site once, every
site's update still leaves it only masked, and each round's keys are fresh and made after the
previous round was unmasked. A site gone since it made its keys ahead (its SuperNode started
again, say) fails the share-keys stage and sits that round out; the next round sends it a
setup message again.

**Sites that drop before the collect stage.** Flower 1.41's workflow counts every site sampled
at setup as either active or dropped at the unmask stage, and has the other sites reveal a
dropped site's key shares so that its pairwise masks come out of the sum. That is right for a
site that dropped at the collect stage; one that dropped at setup or share keys never sent key
shares (the other sites' unmask raises a ``KeyError``, and the round is lost) and no site
masked with it. Here a site that did not finish the share-keys stage is left out of the round's
sample, as if it had not been sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from mrprism_core.protocol import KEYS_AHEAD_KEY, LEGACY_WEIGHTS_RECORD, TRAIN_AHEAD_KEY

from .grid import PromptGrid, readdressed

__all__ = ["PipelinedSecAggPlus"]

log = logging.getLogger("flwr.mrprism")  # shown through Flower's log handler


class PipelinedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with training started at a round's first message to a site
    (``train_ahead``) and the next round's setup made during this round's unmasking
    (``keys_ahead``)."""

    def __init__(
        self, *args: Any, train_ahead: bool = True, keys_ahead: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_ahead = train_ahead
        self.keys_ahead = keys_ahead
        self.training_ahead: set[int] = set()  # this round's sites that train since its start
        self.declined: set[int] = set()  # sites that once did not: no weights ahead again
        self.setup_parameters: dict[str, Any] = {}  # the setup stage's, last sent
        # node -> (the setup parameters its keys were made for, its setup reply's config)
        self.made_ahead: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        self.setup_skipped: set[int] = set()  # this round's sites whose setup reply came ahead

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        self.training_ahead = set()
        self.setup_skipped = set()
        # the strategy's fit instructions exist by the time the stage sends its messages
        return super().setup_stage(_SetupStage(grid, state, self), context, state)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        carry_on = super().share_keys_stage(_ShareKeysStage(grid, state, self), context, state)
        # only the sites that sent their key shares can be unmasked or masked with
        state.sampled_node_ids = set(state.active_node_ids)
        return carry_on

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return super().collect_masked_vectors_stage(
            _WithoutSentWeights(grid, self.training_ahead), context, state
        )

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        current_round = int(
            context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]
        )
        next_setup = (
            self.setup_parameters
            if self.keys_ahead and current_round < context.config.num_rounds
            else None
        )
        return super().unmask_stage(_UnmaskStage(grid, self, next_setup), context, state)

    def with_fit_instructions(self, msg: Message, state: Any) -> Message:
        """``msg`` with its site's fit instructions added, unless the site once declined."""
        node = msg.metadata.dst_node_id
        if not self.train_ahead or node in self.declined:
            return msg
        return readdressed(msg, {**dict(state.nid_to_fitins[node]), **dict(msg.content)})

    def note_training(self, replies: Iterable[Message], asked: set[int]) -> None:
        """Of the sites ``asked`` to train ahead, those whose replies say they started."""
        if not self.train_ahead:
            return
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or node not in asked:
                continue
            if TRAIN_AHEAD_KEY in reply.content.config_records:
                self.training_ahead.add(node)
            else:
                self.declined.add(node)


class _WorkflowStage(PromptGrid):
    """A stage's grid that reads the round's state and the workflow's notes."""

    def __init__(self, grid: Any, state: Any, workflow: PipelinedSecAggPlus) -> None:
        super().__init__(grid)
        self.state = state
        self.workflow = workflow


class _SetupStage(_WorkflowStage):
    """The setup stage: a site whose keys were made ahead for these parameters is answered by
    its earlier reply; the others are sent the stage's message with their fit instructions."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        workflow = self.workflow
        messages = list(messages)
        made_ahead, workflow.made_ahead = workflow.made_ahead, {}  # each reply answers once
        answered, sent = [], []
        for msg in messages:
            parameters = dict(msg.content.config_records[RECORD_KEY_CONFIGS])
            workflow.setup_parameters = parameters
            node = msg.metadata.dst_node_id
            if node in made_ahead and made_ahead[node][0] == parameters:
                keys = ConfigRecord(made_ahead[node][1])
                answered.append(Message(RecordDict({RECORD_KEY_CONFIGS: keys}), reply_to=msg))
                workflow.setup_skipped.add(node)
            else:
                sent.append(workflow.with_fit_instructions(msg, self.state))
        if answered:
            log.info("SecAgg+ setup: %d of %d sites' keys made ahead", len(answered), len(messages))
        replies = list(self.grid.send_and_receive(sent, timeout=timeout)) if sent else []
        workflow.note_training(replies, {msg.metadata.dst_node_id for msg in sent})
        return answered + replies


class _ShareKeysStage(_WorkflowStage):
    """The share-keys stage: the sites whose setup was skipped get their fit instructions
    here, their first message of the round."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        skipped = self.workflow.setup_skipped
        sent = [
            self.workflow.with_fit_instructions(msg, self.state)
            if msg.metadata.dst_node_id in skipped
            else msg
            for msg in messages
        ]
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.workflow.note_training(replies, skipped)
        return replies


class _WithoutSentWeights(PromptGrid):
    """The collect stage's messages to sites that train since the round's first message: the
    config and key shares without the weights, marked so."""

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


class _UnmaskStage(PromptGrid):
    """The unmask stage, each message with the next round's expected setup parameters; the
    keys a site made for them are taken out of its reply and kept for that setup stage."""

    def __init__(
        self, grid: Any, workflow: PipelinedSecAggPlus, next_setup: dict[str, Any] | None
    ) -> None:
        super().__init__(grid)
        self.workflow = workflow
        self.next_setup = next_setup

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        if not self.next_setup:
            return self.grid.send_and_receive(messages, timeout=timeout)
        sent = [
            readdressed(msg, {**dict(msg.content), KEYS_AHEAD_KEY: ConfigRecord(self.next_setup)})
            for msg in messages
        ]
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        for reply in replies:
            if reply.has_error() or KEYS_AHEAD_KEY not in reply.content.config_records:
                continue
            keys = reply.content.config_records.pop(KEYS_AHEAD_KEY)
            self.workflow.made_ahead[reply.metadata.src_node_id] = (self.next_setup, dict(keys))
        return replies
