"""Onboarding: `python -m client --site X --adapt` trains only the site's rater heads."""

from __future__ import annotations

import torch

from client.__main__ import main
from client.state import SiteStore
from mrprism_core.checkpoint import save_checkpoint
from mrprism_core.data.factory import DatasetInfo
from mrprism_core.models import build_model_for_data, split_state
from server.config import RunConfig

from .conftest import SMALL

SITE_SEED = 101  # synthetic_a's seed: its heads start from it


def _global_model(path, in_channels: int = 3) -> dict[str, torch.Tensor]:
    """A federation's global_model.pt: the shared weights and the spec they belong to."""
    spec = {**RunConfig().model_spec(), "in_channels": in_channels}
    torch.manual_seed(7)
    shared, _ = split_state(build_model_for_data(spec, DatasetInfo(in_channels, 2, 4, 32)))
    save_checkpoint(path, {"model_spec": spec, "shared_state": shared, "round": 5})
    return shared


def test_adapt_changes_only_the_rater_heads(tmp_path, capsys):
    shared = _global_model(tmp_path / "global_model.pt")
    state_dir = tmp_path / "late_site"
    code = main(
        [
            "--site", "synthetic_a", "--adapt", "--cases", "4", "--epochs", "2",
            "--from", str(tmp_path / "global_model.pt"), f"state_dir={state_dir}", *SMALL,
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "adapted:     rater heads on 4 cases x 2 epochs" in capsys.readouterr().out
    snapshot = SiteStore(state_dir).load_snapshot()
    # the shared weights are the federation's, bit for bit
    assert set(snapshot["shared_state"]) == set(shared)
    assert all(torch.equal(snapshot["shared_state"][k], shared[k]) for k in shared)
    # the heads moved from where this site's seed starts them
    torch.manual_seed(SITE_SEED)
    fresh = build_model_for_data(RunConfig().model_spec(), DatasetInfo(3, 2, 3, 32))
    _, start = split_state(fresh)
    assert set(snapshot["local_state"]) == set(start)
    moved = [k for k in start if not torch.equal(snapshot["local_state"][k], start[k])]
    assert any(k.startswith("divp.heads.") for k in moved)


def test_adapt_from_another_architecture_is_refused(tmp_path, capsys):
    _global_model(tmp_path / "grey.pt", in_channels=1)
    code = main(
        ["--site", "synthetic_a", "--adapt", "--from", str(tmp_path / "grey.pt"),
         f"state_dir={tmp_path / 'site'}", *SMALL]
    )  # fmt: skip
    assert code == 2
    assert "in_channels=1" in capsys.readouterr().err


def test_adapt_without_a_model_says_what_to_pass(tmp_path, capsys):
    code = main(["--site", "synthetic_a", "--adapt", f"state_dir={tmp_path / 'site'}", *SMALL])
    assert code == 2
    assert "pass --from" in capsys.readouterr().err
