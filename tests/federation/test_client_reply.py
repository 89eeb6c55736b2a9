"""What a ClientApp sends back: the shared weights only, never a rater head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import create_client_app
from mrprism_core.checkpoint import CorruptCheckpointError, load_checkpoint
from mrprism_core.federated import PACKED_KEY
from mrprism_core.update_codec import encode_update
from server.config import RunConfig

from .conftest import ENCODED_REPLY_KEYS, node_context, reply_weights, train_message


def _contains_run(haystack: np.ndarray, needle: np.ndarray) -> bool:
    """True if ``needle`` appears as a contiguous run inside ``haystack``."""
    starts = np.flatnonzero(haystack[: len(haystack) - len(needle) + 1] == needle[0])
    return any(np.array_equal(haystack[s : s + len(needle)], needle) for s in starts)


@pytest.mark.parametrize("model", ["mrprism", "multihead_unet", "mrnet", "dpersona"])
def test_reply_holds_only_shared_weights_whatever_the_rater_count(model, make_site, task_identity):
    app = create_client_app()
    sizes = {}
    for site, raters in (("synthetic_a", 3), ("synthetic_c", 5)):
        state_dir = make_site(site, name=f"{site}_{model}")
        message, layout = train_message(RunConfig(model=model))
        reply = app(message, node_context(state_dir))
        assert not reply.has_error(), reply.error
        records = reply.content.array_records
        assert list(records) == ["arrays"] and list(records["arrays"]) == ENCODED_REPLY_KEYS
        sent = reply_weights(reply, message)
        sizes[site] = sent.shape
        assert sent.shape == (layout.size,)

        snapshot = load_checkpoint(f"{state_dir}/site_model.pt")
        local = snapshot["local_state"]
        assert local, "every model here has per-rater parts that stay at the site"
        if model == "mrprism":
            assert local["confidence.rater_identity.weight"].shape[0] == raters
        # the trained shared weights are what was sent (their float16 change) ...
        trained = layout.pack(snapshot["shared_state"]).numpy()
        received = message.content["arrays"][PACKED_KEY].numpy()
        encoded = encode_update(trained, received)
        for name, array in records["arrays"].items():
            assert np.array_equal(array.numpy(), encoded[name]), name
        # ... and no rater-head tensor appears anywhere inside the reply
        for name, tensor in local.items():
            assert not _contains_run(sent, tensor.flatten().numpy()[:16]), name
        assert reply.content.metric_records["metrics"]["num-examples"] == 4
    assert sizes["synthetic_a"] == sizes["synthetic_c"]


@pytest.mark.parametrize(
    "setting", [{"update-precision": "float32"}, {"clipping_norm": 1e9}], ids=["float32", "clip"]
)
def test_float32_or_flowers_clipping_gets_the_trained_weights_themselves(
    setting, make_site, task_identity
):
    # asked for float32, or under Flower's client-side clipping (which clips the weights it
    # finds in the reply; a norm of 1e9 leaves them as they are), the site sends its weights
    state_dir = make_site("synthetic_a")
    message, layout = train_message()
    message.content["config"].update(setting)
    reply = create_client_app()(message, node_context(state_dir))
    assert not reply.has_error(), reply.error
    assert list(reply.content["arrays"]) == [PACKED_KEY]
    sent = reply.content["arrays"][PACKED_KEY].numpy()
    trained = layout.pack(load_checkpoint(f"{state_dir}/site_model.pt")["shared_state"]).numpy()
    assert sent.dtype == np.float32 and np.allclose(sent, trained, rtol=0, atol=1e-6)


def test_a_site_with_the_wrong_channel_count_answers_with_a_clear_error(make_site, task_identity):
    # the server logs this reason and leaves the site out; the round goes on without it
    state_dir = make_site("synthetic_a", "data.style.channels=1")
    message, _ = train_message()
    reply = create_client_app()(message, node_context(state_dir))
    assert reply.has_error()
    assert "in_channels=1 but the federation trains" in reply.error.reason
    assert not (Path(state_dir) / "site_model.pt").exists()  # nothing was trained or saved


def test_heads_persist_between_rounds(make_site, task_identity):
    app = create_client_app()
    state_dir = make_site("synthetic_b")
    first, _ = train_message(server_round=1)
    app(first, node_context(state_dir))
    heads_round1 = load_checkpoint(f"{state_dir}/site_model.pt")["local_state"]
    second, _ = train_message(server_round=2)
    app(second, node_context(state_dir))
    snapshot = load_checkpoint(f"{state_dir}/site_model.pt")
    assert snapshot["round"] == 2
    # round 2 started from round 1's heads (trained further, so changed but close), not afresh
    for name, before in heads_round1.items():
        after = snapshot["local_state"][name]
        assert after.shape == before.shape
        assert (after - before).abs().max() < 0.1 * (before.abs().max() + 1e-3) + 0.05, name


def test_local_norms_stay_at_the_site_and_carry_over_to_the_next_round(make_site, task_identity):
    # FedBN-style: with local_norms every normalisation layer is site-local like the heads
    app = create_client_app()
    state_dir = make_site("synthetic_a")
    cfg = RunConfig(model_options=json.dumps({"local_norms": True}))
    first, layout = train_message(cfg, server_round=1)
    _, plain_layout = train_message(RunConfig())
    norm = "encoder.stem.1.weight"  # the stem's GroupNorm scale, starts at ones
    names = lambda lay: {name for name, _ in lay.entries}  # noqa: E731
    assert norm in names(plain_layout) and norm not in names(layout)  # the option moves it
    assert not app(first, node_context(state_dir)).has_error()
    trained = load_checkpoint(f"{state_dir}/site_model.pt")["local_state"][norm]
    assert not torch.equal(trained, torch.ones_like(trained))  # the site trained it
    second, _ = train_message(cfg, server_round=2)
    reply = app(second, node_context(state_dir))
    assert reply_weights(reply, second).shape == (layout.size,)
    after = load_checkpoint(f"{state_dir}/site_model.pt")["local_state"][norm]
    # round 2 went on from the site's own scale: further from the initial ones than one
    # round of Adam steps (each at most about lr) could move it from there
    assert (after - 1).abs().max() > 1.5 * (trained - 1).abs().max()


def test_scaffold_sends_the_change_of_the_sites_control_variate_within_one_ledger(
    make_site, task_identity
):
    """The server's control variate holds the c_i a site sent last in the same ledger (run), so
    the site sends its new c_i minus that one; the first time in a ledger (a new run, or a state
    directory from another run), all of it."""
    from flwr.app import Array

    from client.state import SiteStore
    from mrprism_core.protocol import CONTROL_KEY

    app = create_client_app()
    state_dir = make_site("synthetic_a")
    store = SiteStore(state_dir)

    def train(server_round: int, ledger: str, server_control: np.ndarray | None = None):
        message, layout = train_message(RunConfig(drift_correction="scaffold"), server_round)
        message.content["config"]["control-ledger"] = ledger
        if server_control is not None:
            message.content["arrays"][CONTROL_KEY] = Array(server_control)
        reply = app(message, node_context(state_dir))
        assert not reply.has_error(), reply.error
        sent = reply.content["arrays"][CONTROL_KEY].numpy()
        # the site's new c_i, packed with zeros for the buffers as the reply is
        return sent, layout.pack_padded(store.load_control(ledger)).numpy()

    sent1, kept1 = train(1, "run-a")
    assert np.abs(kept1).max() > 0 and np.array_equal(sent1, kept1)
    sent2, kept2 = train(2, "run-a", server_control=sent1)
    assert np.allclose(sent2, kept2 - kept1, atol=1e-7)
    assert not np.allclose(sent2, kept2)
    assert store.load_control("run-a") is not None and store.load_control("run-b") is None
    sent3, kept3 = train(3, "run-b", server_control=sent1)  # another run: nothing of it held
    assert np.array_equal(sent3, kept3)


def test_a_corrupt_site_state_is_reported_not_replaced(make_site, task_identity):
    app = create_client_app()
    state_dir = make_site("synthetic_a")
    message, _ = train_message()
    app(message, node_context(state_dir))
    path = Path(state_dir) / "site_model.pt"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # one flipped byte, as a failing disk would leave it
    path.write_bytes(bytes(raw))
    for message in (train_message()[0], train_message()[0]):
        reply = app(message, node_context(state_dir))
        assert reply.has_error()
        assert f"{path}: checksum mismatch" in reply.error.reason
    assert path.read_bytes() == bytes(raw)  # left for the operator, not overwritten
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
