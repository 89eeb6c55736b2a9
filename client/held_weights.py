"""The shared weights a message brings, and the copy a site worker holds for the next one.

With ``download-precision=float16`` (``server/downloads.py``) a training message may bring,
instead of the float32 weights, their float16 change since the weights of the site's last
training message. The site worker keeps those in memory (the paper preset's 107 MiB), under
the id the server gave them, and says so in its reply (``holds-weights``); the server sends a
change only to a site that said it. A process that keeps nothing (a ClientApp without a
worker, the simulation) never says it, so it always gets the weights themselves. A worker
that started again since holds nothing: a change then gets an error reply naming the weights
it needs, and the server sends that site the float32 weights next round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mrprism_core.protocol import BASE_VERSION_KEY, PACKED_KEY, WEIGHTS_VERSION_KEY
from mrprism_core.update_codec import decode_update, is_encoded

__all__ = ["HeldWeights", "received_weights"]


class HeldWeights:
    """The weights of a worker's last training message and their id (nothing at first)."""

    def __init__(self) -> None:
        self.version = ""
        self.weights: np.ndarray | None = None


def received_weights(
    site: str,
    config: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    held: HeldWeights | None = None,
) -> tuple[np.ndarray, str]:
    """The float32 shared weights a message brings (``arrays``: the message's, by name):
    as they are, or rebuilt from their float16 change and the ``held`` weights it names. A
    training message's weights (those with an id) become the ``held`` ones. Returns them and
    the id now held ("" when nothing is held).

    Raises:
        ValueError: no weights in the message, or a change from weights ``held`` does not
            hold (the site sits the round out, and gets the weights themselves next round).
    """
    if is_encoded(arrays):
        base = str(config.get(BASE_VERSION_KEY, ""))
        if held is None or held.weights is None or held.version != base:
            holds = held.version if held is not None and held.version else "none"
            raise ValueError(
                f"site {site}: the message brings the change of the weights since {base!r}, "
                f"which this site does not hold (it holds {holds}; a site worker that started "
                "again holds none); the server sends it the whole weights next round"
            )
        weights = decode_update(arrays, held.weights)
    elif PACKED_KEY in arrays:
        weights = arrays[PACKED_KEY]
    else:
        raise ValueError(f"site {site}: the message carries no shared weights")
    version = str(config.get(WEIGHTS_VERSION_KEY, ""))
    if held is None or not version:
        return weights, ""
    held.version, held.weights = version, weights
    return weights, version
