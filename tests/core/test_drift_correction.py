"""SCAFFOLD's control variates (mrprism_core/drift_correction.py): the step it corrects, the
control variate it records, and the fixed point it moves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mrprism_core.drift_correction import (
    GradientCorrection,
    check_drift_correction,
    local_correction,
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


def test_scaffold_reaches_the_federations_optimum_where_plain_averaging_drifts():
    """Two sites, f_i(w) = h_i/2 (w - a_i)^2, h = (1, 4), a = (0, 1): the optimum of their sum is
    0.8. Averaging five local SGD steps per round settles elsewhere (each site runs towards its
    own optimum at its own speed); with the control variates it settles on 0.8."""
    sites = [(1.0, 0.0), (4.0, 1.0)]

    def federate(scaffold: bool) -> float:
        w, site_controls, server = 0.0, [None, None], None
        for _ in range(80):
            results = []
            for i, (h, a) in enumerate(sites):
                correction = local_correction(server, site_controls[i]) if scaffold else None
                results.append(_local_round(w, h, a, correction))
            w = sum(r[0] for r in results) / 2
            site_controls = [{"w": r[1]} for r in results]
            server = {"w": sum(r[1] for r in results) / 2}
        return w

    assert abs(federate(scaffold=True) - 0.8) < 1e-4
    assert abs(federate(scaffold=False) - 0.8) > 0.02


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "x=bogus: unknown drift correction; choose from none, scaffold"),
        ({"strategy": "fedadam"}, "x=scaffold needs a strategy whose aggregate is a weighted mean"),
        ({"dp_mode": "server-fixed"}, "x=scaffold sends each site's mean gradient"),
        ({"secure": True}, "x=scaffold is not available under SecAgg+"),
    ],
)
def test_a_drift_correction_the_run_cannot_use_is_refused_naming_its_key(options, message):
    name = "bogus" if not options else "scaffold"
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        check_drift_correction(name, "x", **options)
    assert check_drift_correction("scaffold", "x", strategy="fedprox") == "scaffold"
