"""Personalization at a site: FedBABU's heads stay put in the rounds, Ditto's personal model
stays at the site, FedRep trains both parts."""

from __future__ import annotations

import numpy as np
import torch

from client.app import create_client_app
from client.site import SiteRuntime
from client.state import SiteStore
from mrprism_core.models import split_state
from server.config import RunConfig

from .conftest import ENCODED_REPLY_KEYS, node_context, reply_weights, train_message


def _train(state_dir: str, personalization: str):
    site = SiteRuntime.from_state_dir(state_dir)
    model = site.build_model(RunConfig().model_spec())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    site.train(model, local_epochs=1, lr=1e-2, seed=0, personalization=personalization)
    shared, local = split_state(model)
    moved = lambda part: [k for k in part if not torch.equal(part[k], before[k])]  # noqa: E731
    return moved(shared), moved(local)


def test_fedbabu_rounds_leave_the_heads_bit_identical(make_site):
    shared_moved, local_moved = _train(make_site("synthetic_a"), "fedbabu")
    assert shared_moved and not local_moved


def test_fedrep_trains_heads_and_body(make_site):
    shared_moved, local_moved = _train(make_site("synthetic_a"), "fedrep")
    assert shared_moved and local_moved


def test_ditto_personal_model_differs_from_the_global_one_and_is_never_sent(
    make_site, task_identity
):
    state_dir = make_site("synthetic_a")
    message, layout = train_message(RunConfig(personalization="ditto"))
    reply = create_client_app()(message, node_context(state_dir))
    assert not reply.has_error(), reply.error
    records = reply.content.array_records
    assert list(records) == ["arrays"] and list(records["arrays"]) == ENCODED_REPLY_KEYS
    sent = reply_weights(reply, message)

    personal = SiteStore(state_dir).load_personal()["model_state"]
    shared_keys = set(layout.unpack(torch.from_numpy(sent)))
    personal_shared = {k: v for k, v in personal.items() if k in shared_keys}
    packed_personal = layout.pack(personal_shared).numpy()
    assert not np.array_equal(packed_personal, sent)  # its own weights ...
    assert not np.isin(packed_personal[:64], sent).all()  # ... and none of them in the reply
    # the site scores (and predicts with) its personal model
    site = SiteRuntime.from_state_dir(state_dir)
    model = site.build_model(RunConfig().model_spec())
    scored = site.evaluated_model(model, "ditto")
    assert scored is not model
    assert all(torch.equal(scored.state_dict()[k].cpu(), v) for k, v in personal.items())
