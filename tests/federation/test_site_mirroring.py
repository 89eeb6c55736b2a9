"""A site scores its test split under test-time mirroring when its config says
``train.test_mirroring: true`` (off by default); validation, which chooses rounds, never is."""

from __future__ import annotations

from client.site import SiteRuntime
from mrprism_core.train import evaluate
from server.config import RunConfig


def test_a_site_mirrors_its_test_scores_only_when_its_config_says_so(make_site):
    mirrored = SiteRuntime.from_state_dir(
        make_site("synthetic_a", "train.test_mirroring=true", name="mirrored")
    )
    plain = SiteRuntime.from_state_dir(make_site("synthetic_a", name="plain"))
    model = mirrored.build_model(RunConfig(model_options='{"recurrences": 1}').model_spec())
    mirrored.train(model, local_epochs=1, lr=1e-2, seed=7, server_round=1, persist_optimizer=False)

    test_cases = mirrored.loader("test", shuffle=False)
    assert mirrored.evaluate(model, "test") == evaluate(model, test_cases, mirror=True)
    assert plain.evaluate(model, "test") == evaluate(model, test_cases)
    assert mirrored.evaluate(model, "test")["ece"] != plain.evaluate(model, "test")["ece"]
    assert mirrored.evaluate(model, "val") == plain.evaluate(model, "val")
