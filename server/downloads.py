"""Half-precision downloads (run config ``download-precision``): a training message brings a
site the float16 change of the shared weights since the weights it already holds, instead of
the float32 weights themselves (107 MiB for the paper preset, pushed by the ServerApp, pulled
by the SuperNode and again by the ClientApp, handed to the site worker: every round).

The change goes through ``mrprism_core.update_codec``, as the sites' replies do, so the weights
a site rebuilds are not exactly the global model but its float16-rounded copy. To keep server
and sites on the very same weights, the server keeps that copy, the *sent weights*: each round
it encodes the change from the previous sent weights to the new global model, and the new sent
weights are the previous ones plus that change, decoded exactly as a site decodes it. Rounding
never accumulates (every change starts from the sent weights, so it also carries the last
round's rounding), and the global model, the checkpoint and the strategy stay float32.

Every training message carries the sent weights: as their change for a site that said, in its
last training reply, that it holds the previous ones (``holds-weights``: a site with a worker
keeps the weights of its last training message in memory), else in float32. A site's training
reply is then decoded against the sent weights. Evaluation messages carry the global model.
Off under ``dp-mode=client-fixed``: Flower's client-side clipping reads the float32 weights in
the message it clips against.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from mrprism_core.protocol import (
    BASE_VERSION_KEY,
    CONTROL_KEY,
    HOLDS_WEIGHTS_KEY,
    PACKED_KEY,
    WEIGHTS_VERSION_KEY,
)
from mrprism_core.update_codec import decode_update, encode_update

from .grid import readdressed

__all__ = ["DOWNLOAD_PRECISIONS", "WeightDownloads", "check_download_precision"]

#: ``download-precision`` values: float16 (the change since weights the site holds) or float32
DOWNLOAD_PRECISIONS = ("float16", "float32")


def check_download_precision(value: str, what: str) -> str:
    """``value`` if it names a download precision, else a ValueError naming ``what``."""
    if value not in DOWNLOAD_PRECISIONS:
        raise ValueError(
            f"{what}={value}: unknown download precision; choose from "
            f"{', '.join(DOWNLOAD_PRECISIONS)}"
        )
    return value


class WeightDownloads:
    """What the training messages of a run carry: the sent weights, as their change for the
    sites that hold the previous ones. One per ServerApp process: weights ids are unique to
    it, so after a restart every site first gets float32 weights again."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._run_tag = secrets.token_hex(4)
        self.sent: np.ndarray | None = None  # the weights the last training messages carried
        self.version = ""  # their id
        self._change: dict[str, np.ndarray] | None = None  # from the previous sent weights
        self._base = ""  # the previous sent weights' id
        self._holders: dict[int, str] = {}  # node -> id of the weights it said it holds

    def learn(self, sent_to: Iterable[int], replies: Iterable[Message]) -> None:
        """Note which weights each site holds, from its successful training replies; a site
        sent a training message that did not answer one (an error, no reply) gets float32
        weights next time."""
        for node in sent_to:
            self._holders.pop(node, None)
        for msg in replies:
            held = msg.content.config_records.get("site", {}).get(HOLDS_WEIGHTS_KEY)
            if held:
                self._holders[msg.metadata.src_node_id] = str(held)

    def advance(self, server_round: int, weights: np.ndarray) -> np.ndarray:
        """The weights the training messages of ``server_round`` carry for the global model
        ``weights``: the global model itself while no site holds weights to change from (or
        the change cannot be encoded), else the previous sent weights plus the decoded
        float16 change towards it."""
        self._change, self._base = None, self.version
        if self.enabled and self.sent is not None and self.version in self._holders.values():
            change = encode_update(weights, self.sent)
            if change is not None:
                self._change = change
                weights = decode_update(change, self.sent)  # what a site rebuilds, bit for bit
        self.sent = weights
        self.version = f"{self._run_tag}-{server_round}"
        return weights

    def messages(self, training: Iterable[Message]) -> list[Message]:
        """``training`` (the strategy's messages, all with the global model) with the sent
        weights of the last :meth:`advance`: their change for each site that holds the
        previous ones, float32 for the others."""
        assert self.sent is not None, "advance() first"
        if not self.enabled:
            return list(training)
        change = None if self._change is None else {k: Array(v) for k, v in self._change.items()}
        full: Array | None = None  # serialised once, for every float32 message
        out = []
        for msg in training:
            node = msg.metadata.dst_node_id
            config = {**msg.content["config"], WEIGHTS_VERSION_KEY: self.version}
            if change is not None and self._holders.get(node) == self._base:
                arrays = dict(change)
                config[BASE_VERSION_KEY] = self._base
            elif change is None:  # the sent weights are the global model the strategy packed
                arrays = {PACKED_KEY: msg.content["arrays"][PACKED_KEY]}
            else:
                full = full or Array(self.sent)
                arrays = {PACKED_KEY: full}
            if CONTROL_KEY in msg.content["arrays"]:  # SCAFFOLD's control variate, as it was
                arrays[CONTROL_KEY] = msg.content["arrays"][CONTROL_KEY]
            records = {"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)}
            out.append(readdressed(msg, {**dict(msg.content.items()), **records}))
        return out
