"""Annotation quality across sites: the rater report at a site (it stays there), the one
score a site may send, and the server weighting updates by it through Flower's strategies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client.app import create_client_app
from client.site import SiteRuntime
from mrprism_core.federated import PACKED_KEY, QUALITY_KEY
from server.config import RunConfig
from server.federation import weigh_by_examples, weigh_updates
from server.strategies import build_strategy

from .conftest import ENCODED_REPLY_KEYS, node_context, train_message
from .deploy import PROJECT_ROOT


def _reply(vector: torch.Tensor, examples: int, node: int, quality: float | None) -> Message:
    instruction = Message(
        RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN
    )
    metrics = {"train-loss": 1.0, "num-examples": examples}
    if quality is not None:
        metrics[QUALITY_KEY] = quality
    content = RecordDict(
        {
            "arrays": ArrayRecord({PACKED_KEY: vector}),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": f"site{node}"}),
        }
    )
    return Message(content, reply_to=instruction)


def _aggregate(mode: str, qualities: tuple, examples=(3, 9)) -> torch.Tensor:
    vectors = (torch.zeros(4), torch.ones(4))
    replies = [
        _reply(v, n, node, q)
        for node, (v, n, q) in enumerate(zip(vectors, examples, qualities), start=1)
    ]
    cfg = RunConfig(aggregation_weight=mode)
    if mode != "examples":
        weigh_updates(replies, mode)
    arrays, _ = build_strategy(cfg).aggregate_train(1, replies)
    return arrays.to_torch_state_dict()[PACKED_KEY]


def test_quality_weighting_with_equal_scores_is_fedavg_and_a_poor_site_weighs_less(
    task_identity,
):
    fedavg = _aggregate("examples", (0.7, 0.7))
    assert torch.allclose(fedavg, torch.full((4,), 9 / 12))  # site 2 (all ones) has 9 of 12
    assert torch.allclose(_aggregate("examples*quality", (0.7, 0.7)), fedavg)
    assert torch.allclose(_aggregate("quality", (0.7, 0.7), examples=(5, 5)), torch.full((4,), 0.5))
    # site 2's raters are poor: 9 x 0.2 against 3 x 1.0
    assert torch.allclose(_aggregate("examples*quality", (1.0, 0.2)), torch.full((4,), 1.8 / 4.8))
    # a site claiming more than the bound gets the bound, not the federation
    assert torch.allclose(_aggregate("quality", (0.5, 1e6)), torch.full((4,), 1.0 / 1.5))


def test_evaluation_stays_averaged_by_test_cases_under_quality_weighting(task_identity):
    cfg = RunConfig(aggregation_weight="quality")
    replies = []
    for node, (dice, cases) in enumerate(((0.2, 1), (0.8, 3)), start=1):
        instruction = Message(
            RecordDict({"config": ConfigRecord()}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        metrics = MetricRecord({"soft-dice": dice, "num-examples": cases})
        replies.append(Message(RecordDict({"metrics": metrics}), reply_to=instruction))
    weigh_by_examples(replies)
    metrics = build_strategy(cfg).aggregate_evaluate(1, replies)
    assert metrics["soft-dice"] == pytest.approx((0.2 * 1 + 0.8 * 3) / 4)


def test_quality_weighting_is_refused_where_it_would_be_ignored():
    with pytest.raises(ValueError, match="fedmedian ignores the weights"):
        build_strategy(RunConfig(aggregation_weight="quality", strategy="fedmedian"))
    with pytest.raises(ValueError, match="not available under SecAgg"):
        build_strategy(RunConfig(aggregation_weight="examples*quality", secure_aggregation=True))
    with pytest.raises(ValueError, match="unknown aggregation-weight 'size'"):
        build_strategy(RunConfig(aggregation_weight="size"))


def test_a_site_sends_one_quality_number_and_only_when_it_opted_in(make_site, task_identity):
    app = create_client_app()
    silent = make_site("synthetic_a", name="silent")
    reply = app(train_message()[0], node_context(silent))
    assert not reply.has_error(), reply.error
    assert set(reply.content["metrics"]) == {"train-loss", "skipped-steps", "num-examples"}

    sharing = make_site("synthetic_a", "share_quality=true", name="sharing")
    reply = app(train_message()[0], node_context(sharing))
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"train-loss", "skipped-steps", "num-examples", QUALITY_KEY}
    site = SiteRuntime.from_state_dir(sharing)
    model = site.personal_model()
    assert metrics[QUALITY_KEY] == pytest.approx(site.annotation_quality(model), abs=1e-6)
    assert 0.1 <= metrics[QUALITY_KEY] <= 1.0
    # the report's per-rater numbers are nowhere in the reply: not as metrics, not as details
    report = site.assess_raters(model, "val")
    sent = [*metrics.values(), *reply.content["site"].values()]
    for row in report.rows:
        for value in (row.agreement_dice, row.area_bias, row.sensitivity, row.specificity):
            assert all(not isinstance(v, float) or v != pytest.approx(value) for v in sent)
    assert list(reply.content.array_records["arrays"]) == ENCODED_REPLY_KEYS


def test_the_rater_report_cli_finds_the_generous_rater_of_synthetic_a(trained_site, tmp_path):
    out = tmp_path / "report"
    data = ["data.splits.train=32", "data.splits.val=4", "data.image_size=32"]
    overrides = [*data, f"state_dir={trained_site}"]
    result = subprocess.run(
        [sys.executable, "-m", "client", "--site", "synthetic_a", "--raters", "--out", str(out),
         *overrides],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "raters.json").read_text())
    assert report["consensus"] == "divp_fusion" and report["cases"] == 32 + 4 + 16
    rows = {(r["rater"], r["class"]): r for r in report["raters"]}
    assert set(rows) == {(m, f"class {k}") for m in range(3) for k in range(2)}
    keys = {"agreement_dice", "area_bias", "sensitivity", "specificity", "empty_rate"}
    assert all(keys <= set(row) for row in rows.values())
    # synthetic_a's rater 1 dilates by 12 % of the radius, rater 2 erodes by 8 %
    for k in ("class 0", "class 1"):
        assert rows[(1, k)]["area_bias"] > 0 > rows[(2, k)]["area_bias"], rows
    assert {"raters.md", "disagreement.png", "difficulty.png", "departures_rater1.png"} <= {
        p.name for p in out.iterdir()
    }
    assert "Traceback" not in result.stderr
