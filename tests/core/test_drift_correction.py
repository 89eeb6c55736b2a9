"""SCAFFOLD's control variates (mrprism_core/drift_correction.py): the step it corrects, the
control variate it records, and the fixed point it moves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mrprism_core.drift_correction import (
    GradientCorrection,
    check_drift_correction,
    control_change,
    local_correction,
    updated_server_control,
)


class _Linear(nn.Module):
    """loss = w . x + v . x: the gradient of w (and v) is x."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.v = nn.Parameter(torch.tensor([0.5, -0.5]))

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
        optimizer.zero_grad()
        ((self.w * x).sum() + (self.v * x).sum()).backward()
        optimizer.step()


def test_each_step_adds_the_correction_to_the_named_parameters_and_records_the_plain_gradient():
    model = _Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    shift = torch.tensor([0.25, -1.0])
    x1, x2 = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 2.0])
    with GradientCorrection(model, optimizer, {"w"}, {"w": shift}) as drift:
        model.step(optimizer, x1)
        model.step(optimizer, x2)
    # w took both gradients plus the shift twice; v, not named, only its gradients
    assert torch.allclose(model.w, torch.tensor([1.0, 2.0]) - x1 - x2 - 2 * shift)
    assert torch.allclose(model.v, torch.tensor([0.5, -0.5]) - x1 - x2)
    assert set(drift.mean_gradients()) == {"w"}
    assert torch.allclose(drift.mean_gradients()["w"], (x1 + x2) / 2)  # uncorrected
    before = model.w.detach().clone()
    model.step(optimizer, x1)  # left: the hook is gone
    assert torch.allclose(model.w, before - x1)


def test_a_step_never_taken_is_not_counted_in_the_control_variate():
    model = _Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientCorrection(model, optimizer, {"w", "v"}) as drift:
        optimizer.zero_grad()
        (model.w.sum() * 100).backward()  # a step the training loop skipped (non-finite loss)
        model.step(optimizer, torch.tensor([2.0, 4.0]))
    assert torch.allclose(drift.mean_gradients()["w"], torch.tensor([2.0, 4.0]))


def test_the_correction_is_the_servers_control_minus_the_sites_once_both_exist():
    server = {"w": torch.tensor([1.0, 2.0]), "bn.running_mean": torch.zeros(3)}
    site = {"w": torch.tensor([0.5, 3.0])}
    assert torch.equal(local_correction(server, site)["w"], torch.tensor([0.5, -1.0]))
    assert local_correction(server, None) is None  # the site's first round: plain steps
    assert local_correction(None, site) is None
    zeros = {k: torch.zeros_like(v) for k, v in server.items()}
    assert local_correction(zeros, site) is None  # round 1: the server has no c yet
    assert local_correction(server, {"w": torch.zeros(3)}) is None  # another model's


def _local_round(w0: float, curvature: float, optimum: float, control, steps: int = 5):
    """``steps`` of SGD on 0.5 * curvature * (w - optimum)^2 from w0: (w, mean gradient)."""
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([w0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientCorrection(model, optimizer, {"w"}, control) as drift:
        for _ in range(steps):
            optimizer.zero_grad()
            (0.5 * curvature * (model.w - optimum) ** 2).sum().backward()
            optimizer.step()
    return float(model.w.detach()), drift.mean_gradients()["w"]


def _federate(sites, scaffold: bool, sampled, rounds: int = 150, repliers_mean: bool = False):
    """Federated SGD on sites f_i(w) = h_i/2 (w - a_i)^2 (``sites``: (h_i, a_i)), the sites
    ``sampled(round)`` training each round, each weighing 1; the server steps its control
    variate with :func:`updated_server_control` (``repliers_mean``: instead, the mean of the
    sampled sites' control variates alone). Returns the final global w."""
    w, own = 0.0, [None] * len(sites)
    server, weights = torch.zeros(1), {}
    for server_round in range(rounds):
        picked = sampled(server_round)
        results = {}
        for i in picked:
            correction = local_correction({"w": server}, own[i]) if scaffold else None
            results[i] = _local_round(w, *sites[i], correction)
        w = sum(results[i][0] for i in picked) / len(picked)
        changes = [control_change({"w": results[i][1]}, own[i])["w"] for i in picked]
        for i in picked:
            own[i] = {"w": results[i][1]}
        if repliers_mean:
            server = sum(own[i]["w"] for i in picked) / len(picked)
        else:
            replied = {f"site{i}": 1.0 for i in picked}
            server, weights = updated_server_control(
                server, weights, replied, sum(changes) / len(picked)
            )
    return w


def test_scaffold_reaches_the_federations_optimum_where_plain_averaging_drifts():
    """Two sites, f_i(w) = h_i/2 (w - a_i)^2, h = (1, 4), a = (0, 1): the optimum of their sum is
    0.8. Averaging five local SGD steps per round settles elsewhere (each site runs towards its
    own optimum at its own speed); with the control variates it settles on 0.8."""
    sites = [(1.0, 0.0), (4.0, 1.0)]
    both = lambda _: [0, 1]  # noqa: E731
    assert abs(_federate(sites, True, both, rounds=80) - 0.8) < 1e-4
    assert abs(_federate(sites, False, both, rounds=80) - 0.8) > 0.02


def test_with_two_of_three_sites_training_each_round_scaffold_still_finds_the_optimum():
    """Sites sampled in turns (two of three per round): the server's control variate must keep
    the resting site's share, as SCAFFOLD's server step does. The optimum of the sum is
    (0 * 1 + 1 * 4 + 3 * 2) / 7; averaging only the trained sites' control variates, or none,
    settles elsewhere."""
    sites = [(1.0, 0.0), (4.0, 1.0), (2.0, 3.0)]
    optimum = 10 / 7
    pairs = lambda r: [[0, 1], [1, 2], [0, 2]][r % 3]  # noqa: E731
    assert abs(_federate(sites, True, pairs) - optimum) < 1e-4
    assert abs(_federate(sites, True, pairs, repliers_mean=True) - optimum) > 0.05
    assert abs(_federate(sites, False, pairs) - optimum) > 0.05


def test_the_server_control_is_the_weighted_mean_of_every_sites_latest_control_variate():
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]), torch.tensor([4.0, 4.0])
    # round 1: all three train (weights 1, 2, 1), each change is its whole c_i
    mean_change = (1 * a + 2 * b + 1 * c) / 4
    control, weights = updated_server_control(
        torch.zeros(2), {}, {"a": 1.0, "b": 2.0, "c": 1.0}, mean_change
    )
    assert torch.allclose(control, torch.tensor([1.25, 2.5]))
    # round 2: b drops out; a moves to (3, 0), c to (0, 0); b's (0, 3) stays in the mean
    changes = {"a": torch.tensor([3.0, 0.0]) - a, "c": torch.zeros(2) - c}
    control, weights = updated_server_control(
        control, weights, {"a": 1.0, "c": 1.0}, (changes["a"] + changes["c"]) / 2
    )
    assert torch.allclose(control, torch.tensor([0.75, 1.5]))  # (3 + 0 + 0, 0 + 6 + 0) / 4
    # round 3: a new site d (weight 4, control variate (8, 8)) trains alone
    control, weights = updated_server_control(control, weights, {"d": 4.0}, torch.ones(2) * 8)
    assert torch.allclose(control, torch.tensor([35.0, 38.0]) / 8)
    assert weights == {"a": 1.0, "b": 2.0, "c": 1.0, "d": 4.0}


def test_a_site_sends_the_change_of_its_control_variate_or_all_of_it_the_first_time():
    new = {"w": torch.tensor([2.0, -1.0])}
    assert torch.equal(
        control_change(new, {"w": torch.tensor([0.5, 1.0])})["w"], torch.tensor([1.5, -2.0])
    )
    assert torch.equal(control_change(new, None)["w"], new["w"])
    assert torch.equal(control_change(new, {"w": torch.zeros(3)})["w"], new["w"])  # another model's


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "x=bogus: unknown drift correction; choose from none, scaffold"),
        ({"strategy": "fedadam"}, "x=scaffold needs a strategy whose aggregate is a weighted mean"),
        ({"dp_mode": "server-fixed"}, "x=scaffold sends each site's mean gradient"),
    ],
)
def test_a_drift_correction_the_run_cannot_use_is_refused_naming_its_key(options, message):
    name = "bogus" if not options else "scaffold"
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        check_drift_correction(name, "x", **options)
    assert check_drift_correction("scaffold", "x", strategy="fedprox") == "scaffold"
