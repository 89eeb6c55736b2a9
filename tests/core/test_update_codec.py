"""The float16 training reply: the change of the weights, scaled by a power of two, restored
to float32 by the server to within float16's relative precision of the change."""

from __future__ import annotations

import numpy as np
import pytest

from mrprism_core.update_codec import (
    UPDATE_KEY,
    UPDATE_SCALE_KEY,
    check_update_precision,
    decode_update,
    encode_update,
)

#: float16 keeps 11 significant bits: rounding to nearest is off by at most 2**-11 of a value
HALF_ULP = 2.0**-11


def _weights_and_change(scale: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weights near 1 (as a trained network's are) and a change whose entries span five
    decades below ``scale``, with either sign."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(1.0, 0.5, 10_000).astype(np.float32)
    magnitudes = scale * 10.0 ** rng.uniform(-5, 0, weights.size)
    change = (magnitudes * rng.choice([-1.0, 1.0], weights.size)).astype(np.float32)
    return weights, change


@pytest.mark.parametrize("scale", [1e-1, 1e-4, 1e-7])
def test_the_restored_weights_are_off_by_at_most_float16s_precision_of_the_change(scale):
    received, change = _weights_and_change(scale)
    trained = received + change
    encoded = encode_update(trained, received)
    assert encoded is not None and encoded[UPDATE_KEY].dtype == np.float16
    restored = decode_update(encoded, received)
    assert restored.dtype == np.float32
    exact_change = trained.astype(np.float64) - received  # what float32 stored
    error = np.abs(restored.astype(np.float64) - trained)
    # the change's rounding, plus float32's own rounding when it is added back to the weights
    bound = np.abs(exact_change) * HALF_ULP + np.abs(trained) * 2.0**-24
    assert (error <= bound * 1.0001).all(), float((error / bound).max())


def test_the_scale_keeps_small_changes_that_a_plain_float16_cast_loses():
    # a change of 1e-7: below float16's smallest normal (6e-5), a plain cast keeps 0-1 bits
    received, change = _weights_and_change(1e-7)
    trained = received + change
    exact_change = trained.astype(np.float64) - received
    plain = np.abs(change.astype(np.float16).astype(np.float64) - exact_change)
    restored = decode_update(encode_update(trained, received), received)
    scaled = np.abs(restored.astype(np.float64) - trained)
    assert plain.max() > 100 * scaled.max()
    # and the weights themselves in float16 lose the whole change: a step of 1e-4 near 1 is
    # below float16's spacing there (5e-4), where the encoded change keeps it to 1e-7
    received = np.array([0.9], dtype=np.float32)
    trained = received + np.float32(1e-4)
    assert trained.astype(np.float16)[0] == received.astype(np.float16)[0]
    assert abs(decode_update(encode_update(trained, received), received)[0] - trained[0]) < 1e-7


def test_half_the_bytes_and_an_exact_zero_change():
    received, _ = _weights_and_change(1e-2)
    encoded = encode_update(received.copy(), received)
    assert encoded is not None
    assert encoded[UPDATE_KEY].nbytes * 2 == received.nbytes
    assert np.array_equal(decode_update(encoded, received), received)


def test_a_change_that_cannot_be_encoded_goes_as_the_weights():
    received, change = _weights_and_change(1e-2)
    broken = received + change
    broken[7] = np.nan
    assert encode_update(broken, received) is None  # the server then rejects the NaN weights
    assert encode_update(received[:-1], received) is None
    assert encode_update(received.astype(np.float64), received) is None


def test_a_malformed_change_is_refused_with_the_reason():
    received, change = _weights_and_change(1e-2)
    encoded = encode_update(received + change, received)
    with pytest.raises(ValueError, match=f"expected float16 \\({received.size},\\)"):
        decode_update({**encoded, UPDATE_KEY: encoded[UPDATE_KEY][:-1]}, received)
    with pytest.raises(ValueError, match=f"without {UPDATE_SCALE_KEY}"):
        decode_update({UPDATE_KEY: encoded[UPDATE_KEY]}, received)
    with pytest.raises(ValueError, match="out of range"):
        decode_update({**encoded, UPDATE_SCALE_KEY: np.array([400], dtype=np.int32)}, received)


def test_the_precision_is_checked_by_name():
    assert check_update_precision("float16", "x") == "float16"
    with pytest.raises(ValueError, match="x=int8: unknown update precision; choose from float16"):
        check_update_precision("int8", "x")


def test_torchs_float16_cast_rounds_exactly_as_numpys():
    # the site encodes with torch's cast when torch is loaded, a torch-free process with
    # numpy's: both must give the server the same bits, ties and subnormals included
    import torch  # noqa: F401 - loaded: the codec takes torch's cast

    from mrprism_core import update_codec

    halves = np.arange(0, 2**15, dtype=np.uint16).view(np.float16)  # every non-negative one
    halves = halves[np.isfinite(halves)].astype(np.float32)
    ties = (halves[:-1] + halves[1:]) / 2  # exactly between two float16 values (float32 holds it)
    rng = np.random.default_rng(3)
    values = np.concatenate([halves, ties, rng.normal(0, 3e4, 50_000).astype(np.float32)])
    values = np.concatenate([values, -values])
    fast = update_codec._astype(values, np.float16)
    assert fast.dtype == np.float16
    assert np.array_equal(fast.view(np.uint16), values.astype(np.float16).view(np.uint16))
