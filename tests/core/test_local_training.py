"""The one epoch driver and its local-update strategies: each does what its name says, shown
by what changes (or stays bit-identical) in the weights."""

from __future__ import annotations

import pytest
import torch

from mrprism_core.data.synthetic import make_dataset
from mrprism_core.local_training import (
    DPSGD,
    FedProx,
    HeadsOnly,
    LocalStrategy,
    Personalized,
    local_strategy,
    run_epochs,
)
from mrprism_core.models import build_model, split_state
from mrprism_core.personalization import head_names
from mrprism_core.train import make_loader

DATA = make_dataset(4, 3, 32, seed=3)


def _model():
    torch.manual_seed(0)
    return build_model(
        "mrprism", in_channels=3, num_classes=2, num_raters=3, image_size=32, preset="tiny",
        recurrences=1,
    )  # fmt: skip


def _train(model, strategy, epochs=1, **kwargs):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    return run_epochs(
        model,
        optimizer,
        lambda epoch: make_loader(DATA, 2, shuffle=True, seed=epoch),
        "cpu",
        epochs,
        strategy,
        **kwargs,
    )


def test_epochs_are_numbered_across_phases_and_reported():
    seen, loaders = [], []
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loader(epoch):
        loaders.append(epoch)
        return make_loader(DATA, 2, shuffle=True, seed=epoch)

    totals = run_epochs(
        model, optimizer, loader, "cpu", 2, Personalized("fedrep"), first_epoch=5,
        on_epoch=lambda epoch, result: seen.append((epoch, result["num_examples"])),
    )  # fmt: skip
    # fedrep: one heads epoch, then the two body epochs, each with its own loader
    assert loaders == [5, 6, 7] and seen == [(5, 4), (6, 4), (7, 4)]
    assert totals["epochs"] == 3 and totals["skipped_steps"] == 0 and totals["loss"] > 0


def test_heads_only_leaves_every_shared_weight_bit_identical():
    model = _model()
    shared_before, heads_before = (
        {k: v.clone() for k, v in part.items()} for part in split_state(model)
    )
    _train(model, HeadsOnly(), epochs=2)
    shared_after, heads_after = split_state(model)
    assert all(torch.equal(shared_after[k], v) for k, v in shared_before.items())
    heads = head_names(model)
    assert any(not torch.equal(heads_after[k], heads_before[k]) for k in heads)


def test_fedprox_pulls_toward_its_reference():
    reference = {k: v.clone() for k, v in split_state(_model())[0].items()}

    def distance(model):
        shared = split_state(model)[0]
        return sum(float((shared[k] - reference[k]).pow(2).sum()) for k in reference)

    plain, prox = _model(), _model()
    _train(plain, LocalStrategy(), epochs=2)
    _train(prox, FedProx(mu=50.0, reference=reference), epochs=2)
    assert distance(prox) < 0.8 * distance(plain)


def test_strategy_for_a_round_is_composed_from_its_settings():
    assert local_strategy().phases(2) == [("all", 2)]
    prox = local_strategy("fedrep", proximal_mu=0.1, reference={})
    assert prox.phases(2) == [("heads", 1), ("body", 2)]
    assert prox.epoch_options()["proximal_mu"] == 0.1
    private = local_strategy(private=True)
    assert private.epoch_options() == {"backward_once": True}


@pytest.mark.parametrize(
    ("inner", "message"),
    [
        (FedProx(mu=0.1), "FedProx"),
        (Personalized("fedrep"), "personalization=fedrep"),
        (Personalized("fedper", FedProx(mu=0.1)), "FedProx"),
    ],
)
def test_dp_sgd_refuses_what_would_bypass_its_clipping_or_accounting(inner, message):
    with pytest.raises(ValueError, match=message):
        DPSGD(inner)
