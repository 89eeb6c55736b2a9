"""Half-precision weight changes: a site sends the change of its shared weights over a round
in float16 and the server adds it back; the server sends a site the change of the weights
since those the site holds the same way, and the site adds it back (``server/downloads.py``).

A training reply used to carry the site's whole float32 weights; the paper preset's are
107 MiB, and in deployment every byte of them is hashed, copied and sent three times (ClientApp
to SuperNode to SuperLink to ServerApp). The change a round makes is small next to the weights,
so it keeps its precision in float16 where the weights would not (a weight near 1 in float16
moves in steps of 1e-3; a learning rate of 1e-4 would round to nothing). Before the cast the
change is scaled by a power of two, chosen so its largest entry sits near 2**15: every entry
down to 2**-29 of the largest keeps float16's full relative precision (2**-11), the scale is
exact both ways, and nothing overflows. The server adds the change back to the float32 weights
it sent, so the aggregate and the global model stay float32.

Numpy in and out, used by the site's round code (``client/rounds.py``, in the site worker or
the ClientApp) and the server alike. Where torch is already loaded, its float16 cast does the
rounding: the same round-to-nearest-even as numpy's, several times faster (0.04 s against
0.2 s for the paper preset's 28 M weights).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping

import numpy as np

__all__ = [
    "UPDATE_KEY",
    "UPDATE_PRECISIONS",
    "UPDATE_SCALE_KEY",
    "check_update_precision",
    "decode_update",
    "encode_update",
    "is_encoded",
]

#: The arrays of an encoded reply: the scaled change (float16) and the power of two it was
#: scaled by (int32, one element).
UPDATE_KEY = "shared-update-f16"
UPDATE_SCALE_KEY = "shared-update-exponent"
#: ``update-precision`` values: float16 (the change, half the bytes) or float32 (the weights)
UPDATE_PRECISIONS = ("float16", "float32")
#: the scaled change's largest magnitude stays at or below this (float16's largest is 65504)
_PEAK = 2.0**15
#: scale exponents beyond this would mean a change of ~1e-30 or ~1e30: send the weights instead
_MAX_EXPONENT = 100


def check_update_precision(value: str, what: str) -> str:
    """``value`` if it names an update precision, else a ValueError naming ``what``."""
    if value not in UPDATE_PRECISIONS:
        raise ValueError(
            f"{what}={value}: unknown update precision; choose from {', '.join(UPDATE_PRECISIONS)}"
        )
    return value


def encode_update(trained: np.ndarray, received: np.ndarray) -> dict[str, np.ndarray] | None:
    """The change ``trained - received`` as float16 scaled by a power of two, or None when it
    cannot be (a non-finite entry, a shape or dtype that is not the weights'): then the site
    sends its float32 weights, and the server judges them as before."""
    if trained.shape != received.shape or trained.dtype != np.float32:
        return None
    change = trained - received.astype(np.float32, copy=False)
    # the largest magnitude without a temporary |change| (a NaN makes both NaN)
    peak = max(float(change.max()), -float(change.min())) if change.size else 0.0
    if not np.isfinite(peak):
        return None
    exponent = 0 if peak == 0.0 else int(np.floor(np.log2(_PEAK / peak)))
    if abs(exponent) > _MAX_EXPONENT:
        return None
    change *= np.float32(2.0**exponent)  # a power of two: exact
    return {
        UPDATE_KEY: _astype(change, np.float16),
        UPDATE_SCALE_KEY: np.array([exponent], dtype=np.int32),
    }


def _astype(values: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    """A new array: ``values`` cast to ``dtype`` (float16 or float32), by torch when this
    process has loaded it (no import here: the server and a torch-free process use numpy's
    identical, slower cast). A received array may be read-only; torch warns that it shares
    it, but the cast only reads it."""
    torch = sys.modules.get("torch")
    if torch is None:
        return values.astype(dtype)
    to = torch.float16 if dtype is np.float16 else torch.float32
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(values)).to(to).numpy()


def is_encoded(arrays: Mapping[str, object]) -> bool:
    """Does a reply's array record hold an encoded change (rather than the weights)?"""
    return UPDATE_KEY in arrays


def decode_update(arrays: Mapping[str, np.ndarray], sent: np.ndarray) -> np.ndarray:
    """The site's float32 weights from its encoded change and the weights ``sent`` to it.

    Raises:
        ValueError: naming what is wrong (missing scale, shape or dtype), so the server can
            leave that site's update out with the reason.
    """
    if UPDATE_SCALE_KEY not in arrays:
        raise ValueError(f"{UPDATE_KEY} without {UPDATE_SCALE_KEY}")
    change, exponent = arrays[UPDATE_KEY], arrays[UPDATE_SCALE_KEY]
    if change.dtype != np.float16 or change.shape != sent.shape:
        raise ValueError(
            f"{UPDATE_KEY} is {change.dtype} {tuple(change.shape)}, "
            f"expected float16 {tuple(sent.shape)}"
        )
    if exponent.shape != (1,) or not np.issubdtype(exponent.dtype, np.integer):
        raise ValueError(f"{UPDATE_SCALE_KEY} must be one integer, got {exponent!r}")
    if abs(int(exponent[0])) > _MAX_EXPONENT:
        raise ValueError(f"{UPDATE_SCALE_KEY} {int(exponent[0])} is out of range")
    weights = _astype(change, np.float32)
    weights *= np.float32(2.0 ** -int(exponent[0]))  # a power of two: exact
    weights += sent
    return weights
