"""The round protocol's two records survive the trip through plain config mappings, and a
server that forgets a required field is named, not guessed around."""

from __future__ import annotations

from dataclasses import fields

import pytest

from mrprism_core.protocol import RoundInstructions, SiteReply

SPEC = {"name": "mrprism", "preset": "tiny", "in_channels": 3, "num_classes": 2, "options": {}}


def _instructions(**changes) -> RoundInstructions:
    values = dict(model_spec=SPEC, layout="abc123", lr=5e-3, seed=7, num_server_rounds=4)
    return RoundInstructions(**{**values, **changes})


def test_instructions_round_trip_every_field():
    sent = _instructions(
        persist_optimizer=False,
        personalization="ditto",
        ditto_lambda=0.3,
        local_epochs=3,
        eval_split="test",
        select_split="val",
        server_round=2,
        proximal_mu=0.05,
        lr_schedule="cosine",
        drift_correction="scaffold",
        control_ledger="0123abcd",
        update_precision="float16",
    )
    config = sent.to_config()
    assert all(isinstance(v, (str, int, float, bool)) for v in config.values())  # record-safe
    assert RoundInstructions.from_config(config) == sent
    # every field differs from its default, so a field that is dropped on the way fails here
    defaults = RoundInstructions(**{f.name: getattr(sent, f.name) for f in fields(sent)[:5]})
    assert all(getattr(sent, f.name) != getattr(defaults, f.name) for f in fields(sent)[5:])


def test_flower_written_keys_are_read_and_foreign_keys_ignored():
    config = _instructions().to_config()
    config.update({"server-round": 5, "proximal-mu": 0.1, "clipping_norm": 1.0})
    got = RoundInstructions.from_config(config)
    assert (got.server_round, got.proximal_mu) == (5, 0.1)


def test_missing_required_instruction_is_named():
    config = _instructions().to_config()
    del config["layout"]
    with pytest.raises(ValueError, match=r"\['layout'\]"):
        RoundInstructions.from_config(config)


def test_site_reply_round_trips_through_both_record_forms():
    reply = SiteReply(
        site="synthetic_a",
        num_raters=3,
        heads_from_round=4,
        num_examples=48,
        metrics={"soft-dice": 0.8, "ged": 0.2},
        details={"per-rater-dice-list": [0.7, 0.9, 0.8], "dice-vs-truth": 0.85},
    )
    assert reply.to_metrics()["num-examples"] == 48
    assert "name" not in reply.to_metrics() and reply.to_site()["name"] == "synthetic_a"
    assert SiteReply.from_records(reply.to_metrics(), reply.to_site()) == reply
    flat = SiteReply.from_records(reply.to_config())  # SecAgg+'s legacy FitRes.metrics
    assert (flat.site, flat.num_raters, flat.heads_from_round) == ("synthetic_a", 3, 4)
    assert flat.num_examples == 48 and flat.metrics["soft-dice"] == 0.8
    with pytest.raises(ValueError, match="site's name"):
        SiteReply.from_records({"num-examples": 3})
