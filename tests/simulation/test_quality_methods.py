"""The noisy_site preset's methods: quality-weighted FedAvg and the federation without a site."""

from __future__ import annotations

from benchmarks.common import simulation_config
from simulation.run import run_experiment


def test_quality_weighting_lowers_the_noisy_site_and_a_left_out_site_is_still_scored(tmp_path):
    cfg = simulation_config(
        [
            "preset=noisy_site",
            "methods=[federated_quality,federated_without_synthetic_noisy]",
            'partition.source_overrides=["data.image_size=32","data.splits.train=8",'
            '"data.splits.val=0","data.splits.test=4"]',
            "federation.rounds=2",
            "+federation.model_options.recurrences=1",
            f"out_dir={tmp_path}",
            "progress=false",
        ]
    )
    methods = run_experiment(cfg)["methods"]

    weights = methods["federated_quality"]["aggregation_weights"]
    assert set(weights) == {"synthetic_a", "synthetic_b", "synthetic_noisy"}
    assert all(row["quality-shared"] for row in weights.values())
    clean = [weights[s]["quality"] for s in ("synthetic_a", "synthetic_b")]
    assert weights["synthetic_noisy"]["quality"] < min(clean)  # its raters are the poor ones
    # all three train on 8 cases: by examples each would have a third of the weight
    assert weights["synthetic_noisy"]["weight-share"] < 1 / 3
    assert abs(sum(row["weight-share"] for row in weights.values()) - 1.0) < 1e-9

    without = methods["federated_without_synthetic_noisy"]
    assert set(without["sites"]) == {"synthetic_a", "synthetic_b", "synthetic_noisy"}
    assert len(without["history"]["synthetic_a"]) == 2  # it took part in both rounds
    assert len(without["history"]["synthetic_noisy"]) == 1  # scored once, after adapting
    assert 0.0 <= without["sites"]["synthetic_noisy"]["soft_dice"] <= 1.0
