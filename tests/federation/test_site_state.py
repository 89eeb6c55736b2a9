"""The site worker's state written behind its reply: what is saved is what was handed over,
a read waits for the writes under way, and a write that failed is reported, naming its file."""

from __future__ import annotations

import threading

import pytest
import torch

from client.state import SiteStore


def _hold_writer(store: SiteStore) -> threading.Event:
    """Keep the store's background writer busy until the returned event is set, so that what
    follows happens while a write is still to come (as after a reply, before the disk)."""
    release = threading.Event()
    store._writer.submit(release.wait)  # noqa: SLF001 - the test needs the write to be pending
    return release


def test_a_write_behind_saves_the_tensors_as_they_were_handed_over(tmp_path):
    store = SiteStore(tmp_path, write_behind=True)
    moments = torch.ones(3)
    release = _hold_writer(store)
    store.save_optimizer({"state": {0: {"exp_avg": moments}}}, server_round=4)
    moments.mul_(5)  # the optimizer steps on after handing its state over
    assert not store.optimizer_path.exists()  # nothing on disk yet: the writer is held
    release.set()
    saved = store.load_optimizer()
    assert torch.equal(saved["state"][0]["exp_avg"], torch.ones(3))


def test_a_read_waits_for_the_write_under_way(tmp_path):
    SiteStore(tmp_path).save_optimizer({"state": {}, "version": "old"}, server_round=1)
    store = SiteStore(tmp_path, write_behind=True)
    release = _hold_writer(store)
    store.save_optimizer({"state": {}, "version": "new"}, server_round=2)
    read: list[dict] = []
    reader = threading.Thread(target=lambda: read.append(store.load_optimizer()))
    reader.start()
    reader.join(timeout=0.5)
    assert reader.is_alive()  # it waits rather than read the previous round's file
    release.set()
    reader.join(timeout=30)
    assert read == [{"state": {}, "version": "new"}]


def test_a_failed_write_behind_is_raised_at_the_next_flush_naming_the_file(tmp_path):
    (tmp_path / "taken").write_text("a file where the state folder should be")
    store = SiteStore(tmp_path / "taken" / "site", write_behind=True)
    store.save_optimizer({"state": {}}, server_round=1)  # returns at once
    with pytest.raises(OSError, match="taken/site"):
        store.flush()
    store.flush()  # reported once; nothing is left pending


def test_without_write_behind_a_save_is_on_disk_when_it_returns(tmp_path):
    store = SiteStore(tmp_path)
    store.save_optimizer({"state": {}}, server_round=1)
    assert store.optimizer_path.exists()


def test_what_the_worker_wrote_is_read_back_as_a_copy_until_another_process_replaces_it(
    tmp_path,
):
    store = SiteStore(tmp_path, write_behind=True)
    store.save_optimizer({"state": {0: {"exp_avg": torch.ones(2)}}}, server_round=1)
    first = store.load_optimizer()
    first["state"][0]["exp_avg"].add_(1)  # Adam steps on the moments it was given
    again = store.load_optimizer()
    assert torch.equal(again["state"][0]["exp_avg"], torch.ones(2))
    # `python -m client --adapt`, or a restore, replaces the file from another process
    SiteStore(tmp_path).save_optimizer({"state": {0: {"exp_avg": torch.zeros(2)}}}, server_round=2)
    assert torch.equal(store.load_optimizer()["state"][0]["exp_avg"], torch.zeros(2))


def test_a_worker_whose_last_write_failed_answers_the_next_message_with_the_reason(
    make_site, task_identity, tmp_path
):
    from client.held_weights import HeldWeights
    from client.site import SiteRuntime
    from client.worker import _run
    from server.config import RunConfig

    from .conftest import train_message

    site = SiteRuntime.from_state_dir(make_site("synthetic_a"), write_behind=True)
    (tmp_path / "taken").write_text("a file where a folder should be")
    # the previous reply's state went to a place that cannot be written (a full disk, say)
    site.store = SiteStore(tmp_path / "taken" / "site", write_behind=True)
    site.store.save_optimizer({"state": {}}, server_round=1)
    message, _ = train_message(RunConfig())
    config = dict(message.content["config"])
    arrays = {name: array.numpy() for name, array in message.content["arrays"].items()}
    outcome = _run(site, HeldWeights(), "train", config, arrays, run_id=1)
    assert outcome.error is not None and outcome.shared is None
    assert outcome.error.startswith("the site's state could not be written: ")
    assert "taken/site" in outcome.error
