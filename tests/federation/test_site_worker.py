"""The site worker: the ClientApp hands it the message and imports no torch; the round it runs
is the round the ClientApp would have run itself; killed mid-round, the ClientApp answers with
an error and the worker comes back; a connection without the site's key is refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from client import supervisor, worker_protocol
from client.app import create_client_app
from client.flower_env import FLOWER_OFFLINE_ENV
from client.supervisor import SiteWorker
from client.worker_protocol import COLLECT, KEY_FILE, TRAIN_AHEAD, WorkerUnavailable, ask_worker
from mrprism_core.checkpoint import load_checkpoint
from mrprism_core.federated import PACKED_KEY
from mrprism_core.protocol import CONTROL_KEY
from server.config import RunConfig

from .conftest import ENCODED_REPLY_KEYS, node_context, train_message
from .deploy import Deployment, command_lines, descendants, history, proc_stat, wait_for_round

# A fresh interpreter, like Flower's per-message ClientApp process: it rebuilds the server's
# message, calls our ClientApp with the worker's socket in its node config, and reports what it
# got back and whether torch was ever imported.
CLIENTAPP_PROCESS = """
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
from client.app import create_client_app

request = json.loads(open(sys.argv[1]).read())
packed = np.load(sys.argv[2])
content = RecordDict(
    {"arrays": ArrayRecord({"shared-weights": Array(packed)}),
     "config": ConfigRecord(request["config"])}
)
message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
node_config = {"state-dir": request["state_dir"], "worker-socket": request["socket"]}
context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
reply = create_client_app()(message, context)
torch_loaded = "torch" in sys.modules
if reply.has_error():
    print(json.dumps({"error": reply.error.reason, "torch": torch_loaded}))
else:
    np.savez(sys.argv[3], **{k: v.numpy() for k, v in reply.content["arrays"].items()})
    metrics = dict(reply.content["metrics"])
    print(json.dumps({"error": None, "torch": torch_loaded, "metrics": metrics}))
"""


def _socket(tmp_path: Path) -> Path:
    return tmp_path / "w.sock"


def _message_files(tmp_path: Path, cfg: RunConfig, state_dir: str, socket: Path) -> list[str]:
    message, _ = train_message(cfg)
    request = {
        "config": dict(message.content["config"]),
        "state_dir": state_dir,
        "socket": str(socket),
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    np.save(tmp_path / "packed.npy", message.content["arrays"][PACKED_KEY].numpy())
    return [str(tmp_path / "request.json"), str(tmp_path / "packed.npy")]


def test_the_worker_runs_the_same_round_and_the_clientapp_imports_no_torch(
    make_site, task_identity, tmp_path
):
    cfg = RunConfig(local_epochs=2)
    # the same site twice: one round in the ClientApp's own process, one through a worker
    in_process_dir = make_site("synthetic_a", name="site_in_process")
    worker_dir = make_site("synthetic_a", name="site_worker")
    message, _ = train_message(cfg)
    expected = create_client_app()(message, node_context(in_process_dir))
    assert not expected.has_error(), expected.error

    socket = _socket(tmp_path)
    out = io.StringIO()
    with SiteWorker(Path(worker_dir), socket, out=out) as worker:
        assert stat.S_IMODE(socket.stat().st_mode) == 0o600  # only the site's user may connect
        assert stat.S_IMODE((Path(worker_dir) / KEY_FILE).stat().st_mode) == 0o600
        files = _message_files(tmp_path, cfg, worker_dir, socket)
        done = subprocess.run(
            [sys.executable, "-c", CLIENTAPP_PROCESS, *files, str(tmp_path / "reply.npz")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        assert answer["error"] is None, answer["error"]
        assert answer["torch"] is False  # the ClientApp process never imported torch
        assert worker.restarts == 0
    sent = dict(np.load(tmp_path / "reply.npz"))
    # bit-identical to the round run in-process: the worker's warm state changes nothing
    assert set(sent) == set(expected.content["arrays"])
    for key, array in expected.content["arrays"].items():
        assert np.array_equal(sent[key], array.numpy()), key
    expected_metrics = dict(expected.content["metrics"])
    assert answer["metrics"] == pytest.approx(expected_metrics)
    assert Path(worker_dir, "site_model.pt").exists()  # the worker saved the site's heads
    assert "train message 1" in out.getvalue()


def test_scaffolds_control_variates_go_through_the_worker_as_they_do_in_process(
    make_site, task_identity, tmp_path
):
    """The server's control variate reaches the site and the site's new one comes back, the
    same bit for bit with or without the worker; the site keeps a copy of what it sent."""
    from client.state import SiteStore

    cfg = RunConfig(drift_correction="scaffold")
    message, layout = train_message(cfg)
    in_process_dir = make_site("synthetic_a", name="site_in_process")
    expected = create_client_app()(message, node_context(in_process_dir))
    assert not expected.has_error(), expected.error
    worker_dir = make_site("synthetic_a", name="site_worker")
    with SiteWorker(Path(worker_dir), _socket(tmp_path), out=io.StringIO()):
        got = create_client_app()(message, node_context(worker_dir, _socket(tmp_path)))
    assert not got.has_error(), got.error
    assert set(got.content["arrays"]) == {*ENCODED_REPLY_KEYS, CONTROL_KEY}
    for key in got.content["arrays"]:
        assert np.array_equal(
            got.content["arrays"][key].numpy(), expected.content["arrays"][key].numpy()
        ), key
    control = got.content["arrays"][CONTROL_KEY].numpy()
    assert np.abs(control).max() > 0  # the site's mean gradient of the round
    kept = SiteStore(worker_dir).load_control("")  # the ledger of a message built outside a run
    shared = layout.unpack(torch.from_numpy(control.copy()))
    assert all(torch.equal(kept[k], shared[k]) for k in kept)


def test_a_worker_killed_mid_round_gives_an_error_reply_and_is_started_again(
    make_site, task_identity, tmp_path
):
    state_dir = make_site("synthetic_b", "data.splits.train=16")
    socket = _socket(tmp_path)
    app = create_client_app()
    long_round, _ = train_message(RunConfig(local_epochs=200))
    with SiteWorker(Path(state_dir), socket, out=io.StringIO(), restart_delay_s=0.2) as worker:
        first = worker.process
        replies = []
        call = threading.Thread(
            target=lambda: replies.append(app(long_round, node_context(state_dir, socket)))
        )
        call.start()
        time.sleep(3)  # the worker is training
        first.send_signal(signal.SIGKILL)
        call.join(timeout=60)
        assert replies and replies[0].has_error()
        reason = replies[0].error.reason
        assert "site synthetic_b cannot take part" in reason and "did not answer" in reason

        deadline = time.monotonic() + 120
        while not (worker.process is not first and socket.exists()):
            assert time.monotonic() < deadline, "the worker was not started again"
            time.sleep(0.2)
        assert worker.restarts == 1
        short_round, _ = train_message(RunConfig(local_epochs=1))
        reply = app(short_round, node_context(state_dir, socket))
        assert not reply.has_error(), reply.error  # the site takes part again
    assert not socket.exists()  # stopped with the SuperNode, its socket removed


def test_a_training_begun_ahead_is_collected_once_and_only_for_its_round(
    make_site, task_identity, tmp_path
):
    """SecAgg+ with ``secagg-train-ahead``: the worker accepts the setup stage's weights with an
    empty answer, trains, and hands the result to the collect request of the same run and
    round, once; a collect with nothing kept for it (a worker started again, another round) is
    an error that says so."""
    state_dir = make_site("synthetic_a", "data.splits.train=4")
    socket = _socket(tmp_path)
    message, layout = train_message(RunConfig(update_precision="float32"), server_round=3)
    config = dict(message.content["config"])
    sent = {PACKED_KEY: message.content["arrays"][PACKED_KEY].numpy()}
    with SiteWorker(Path(state_dir), socket, out=io.StringIO()):
        nothing = ask_worker(socket, state_dir, COLLECT, config, {}, run_id=1)
        assert nothing.shared is None and "run 1 round 3" in str(nothing.error)

        def train_ahead() -> None:
            accepted = ask_worker(socket, state_dir, TRAIN_AHEAD, config, sent, run_id=1)
            assert (accepted.error, accepted.reply, accepted.shared) == (None, None, None)

        train_ahead()
        later = {**config, "server-round": 4}
        assert "run 1 round 4" in str(ask_worker(socket, state_dir, COLLECT, later, {}, 1).error)

        train_ahead()
        collected = ask_worker(socket, state_dir, COLLECT, config, {}, run_id=1)
        assert collected.error is None and collected.reply.num_examples == 4
        weights = collected.shared[PACKED_KEY]
        assert not np.array_equal(weights, sent[PACKED_KEY])  # trained
        again = ask_worker(socket, state_dir, COLLECT, config, {}, run_id=1)
        assert "run 1 round 3" in str(again.error)  # handed over once
    # what was collected is what the site trained and kept
    kept = load_checkpoint(Path(state_dir) / "site_model.pt")["shared_state"]
    assert np.array_equal(layout.pack(kept).numpy(), weights)


def test_a_connection_without_the_sites_key_is_refused(make_site, tmp_path):
    state_dir = make_site("synthetic_a")
    socket = _socket(tmp_path)
    with SiteWorker(Path(state_dir), socket, out=io.StringIO()):
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        (stranger / KEY_FILE).write_bytes(b"not the key")
        with pytest.raises(WorkerUnavailable, match="refused the connection"):
            ask_worker(socket, stranger, "train", {}, {"w": np.zeros(1, np.float32)}, run_id=1)


def test_no_worker_listening_is_a_clear_error_reply(
    make_site, task_identity, tmp_path, monkeypatch
):
    monkeypatch.setattr(worker_protocol, "WORKER_START_WAIT_S", 1.0)
    state_dir = make_site("synthetic_a")
    (Path(state_dir) / KEY_FILE).write_bytes(b"k" * 32)
    message, _ = train_message()
    reply = create_client_app()(message, node_context(state_dir, _socket(tmp_path)))
    assert reply.has_error()
    assert "its site worker" in reply.error.reason and "did not answer" in reply.error.reason
    assert not (Path(state_dir) / "site_model.pt").exists()


def test_a_message_waits_for_a_worker_that_is_starting(make_site, task_identity, tmp_path):
    """A message that arrives while ``python -m client`` starts the worker (again) is run by
    the new worker instead of being refused: the site does not sit out the round."""
    state_dir = make_site("synthetic_a")
    socket = _socket(tmp_path)
    message, _ = train_message(RunConfig(local_epochs=1))
    replies = []
    call = threading.Thread(
        target=lambda: replies.append(create_client_app()(message, node_context(state_dir, socket)))
    )
    call.start()  # no worker, no socket and no key yet
    time.sleep(1.0)
    assert call.is_alive() and not replies  # waiting, not answered with an error
    with SiteWorker(Path(state_dir), socket, out=io.StringIO()):
        call.join(timeout=worker_protocol.WORKER_START_WAIT_S + 60)
    assert replies and not replies[0].has_error(), replies and replies[0].error
    assert Path(state_dir, "site_model.pt").exists()  # the worker ran the round


def _worker_pid(log: str, site: str) -> int:
    match = re.findall(rf"site worker of {site} ready after [0-9.]+ s of CPU \(pid (\d+)", log)
    assert match, log[-2000:]
    return int(match[-1])


def _cpu_ticks(pid: int) -> int:
    fields = proc_stat(pid)
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_in_a_deployment_a_worker_killed_mid_round_drops_the_site_for_that_round_only(tmp_path):
    deployment = Deployment(tmp_path)
    tiny = ["data.splits.train=8", "data.splits.val=2", "data.image_size=32"]
    try:
        deployment.start_superlink()
        sites = {
            name: deployment.start_site("synthetic_a", *tiny, name=name)
            for name in ("site_a", "site_b")
        }
        deployment.wait_online(2, timeout=300)
        out_dir = tmp_path / "out"
        run = deployment.submit(
            {
                "num-server-rounds": 3,
                "min-available-nodes": 2,
                "min-train-replies": 1,
                "fraction-evaluate": 0.0,
                "local-epochs": 30,  # a round long enough to be caught in the middle
                "model-options": json.dumps({"recurrences": 1}),
                "out-dir": str(out_dir),
            }
        )
        wait_for_round(deployment, out_dir, 1, timeout=600)
        pid = _worker_pid(deployment.log("site_b"), "site_b")
        idle = _cpu_ticks(pid)
        deadline = time.monotonic() + 300
        while _cpu_ticks(pid) - idle < 100:  # a second of CPU: it is training round 2
            assert time.monotonic() < deadline, "site_b's worker never started round 2"
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        # its ClientApp fork server too: round 3's messages start Flower's own flwr-clientapp
        commands = command_lines(descendants(sites["site_b"].pid))
        forks = [p for p, c in commands.items() if "client.clientapp_fork" in c]
        # not one of its forks (a ClientApp), which share its command line
        [fork_server] = [p for p in forks if int(proc_stat(p)[1]) not in forks]
        os.kill(fork_server, signal.SIGKILL)
        assert run.wait(timeout=900) == 0, deployment.log("flwr-run")[-4000:]
    finally:
        deployment.stop()
    # until then each message's ClientApp was a fork of the fork server; after, Flower's own
    log_b = deployment.log("site_b")
    before, after = log_b.split("fork server unavailable", 1)
    assert before.count("started ClientApp process") >= 2, log_b[-3000:]
    assert "started ClientApp process" not in after
    rounds = history(out_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # round 2 went on with site_a; site_b answered with the reason
    assert set(rounds[1]["train_sites"]) == {"site_a"} and rounds[1]["aggregated"] is True
    [dropped] = rounds[1]["dropped"]
    assert dropped["site"] == "site_b" and "did not answer" in dropped["reason"]
    # its worker was started again and the site took part in round 3, from its round-1 heads
    assert "starting it again" in deployment.log("site_b")
    assert rounds[2]["train_sites"]["site_b"]["heads-from-round"] == 1


THREADS = """
import sys, tempfile, torch
from client.site import SiteRuntime
from client.site_config import compose_site_config
default = torch.get_num_threads()
SiteRuntime(compose_site_config("synthetic_a", sys.argv[1:]), tempfile.mkdtemp())
print(default, torch.get_num_threads())
"""


@pytest.mark.parametrize(("setting", "expected"), [("threads=7", 7), ("threads=null", None)])
def test_the_sites_thread_count_is_what_its_config_says(setting, expected):
    done = subprocess.run(
        [sys.executable, "-c", THREADS, setting], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    default, used = map(int, done.stdout.split())
    assert default != 7
    assert used == (expected or default)  # null leaves torch's default (a thread per core)


def test_dp_sgd_through_the_worker_spends_and_records_the_budget_round_after_round(
    make_site, task_identity, tmp_path
):
    # the worker lives across rounds: each round's noisy steps must still reach the ledger on
    # disk and the reported epsilon must grow, as in a fresh process per message
    state_dir = make_site("synthetic_a", "privacy.enabled=true", "privacy.noise_multiplier=1.0")
    socket = _socket(tmp_path)
    app = create_client_app()
    cfg = RunConfig(model_options=json.dumps({"recurrences": 1}), num_server_rounds=2)
    epsilons = []
    with SiteWorker(Path(state_dir), socket, out=io.StringIO()):
        for server_round in (1, 2):
            message, _ = train_message(cfg, server_round)
            reply = app(message, node_context(state_dir, socket))
            assert not reply.has_error(), reply.error
            epsilons.append(reply.content["metrics"]["dp-epsilon"])
    assert 0 < epsilons[0] < epsilons[1]
    ledger = json.loads((Path(state_dir) / "privacy_ledger.json").read_text())
    assert ledger["epsilon"] == epsilons[1]
    assert sum(steps for _, _, steps in ledger["history"]) == 2


def test_a_worker_that_keeps_dying_at_once_is_retried_ever_less_often(make_site, tmp_path, capsys):
    state_dir = make_site("synthetic_a")
    socket = _socket(tmp_path)
    with SiteWorker(Path(state_dir), socket, out=io.StringIO(), restart_delay_s=0.1) as worker:
        (Path(state_dir) / "site_config.yaml").unlink()  # every new worker now exits at once
        worker.process.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 120
        while worker.restarts < 4:
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.1)
    waits = [
        float(m) for m in re.findall(r"starting it again in ([0-9.]+) s", capsys.readouterr().err)
    ]
    assert waits[:4] == [0.1, 0.2, 0.4, 0.8]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_the_whole_site_is_not_reported_as_a_worker_crash(
    stop, make_site, tmp_path, capsys
):
    state_dir = make_site("synthetic_a")
    try:
        with SiteWorker(Path(state_dir), _socket(tmp_path), out=io.StringIO()) as worker:
            # Ctrl-C, systemd and `timeout` signal every process of the site, in no set order:
            # the worker first, then python -m client (whose handler sets the event)
            worker.process.send_signal(stop)
            time.sleep(0.3)
            supervisor._STOP_SIGNALLED.set()
            time.sleep(supervisor._SIGNAL_GRACE_S + 1)
            assert worker.restarts == 0
    finally:
        supervisor._STOP_SIGNALLED.clear()
    assert "starting it again" not in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        state = proc_stat(pid)[0]
    except OSError:
        return False
    return state != "Z"  # an orphan's zombie waits for whoever adopted it


def _start_site_without_superlink(
    deployment: Deployment, name: str = "synthetic_a"
) -> tuple[subprocess.Popen, dict]:
    """``python -m client`` for synthetic_a (as site ``name``) with no SuperLink to reach (its
    SuperNode keeps trying), once its SuperNode has started; (the process, {pid: command
    line} of every process under it)."""
    earlier_starts = deployment.log(name).count("Starting Flower SuperNode")  # its log appends
    site = deployment.start_site(
        "synthetic_a", "data.splits.train=4", "data.splits.val=2", "data.splits.test=2", name=name
    )
    deadline = time.monotonic() + 300
    while deployment.log(name).count("Starting Flower SuperNode") == earlier_starts:
        assert site.poll() is None, deployment.log(name)[-3000:]
        assert time.monotonic() < deadline, "the SuperNode never started"
        time.sleep(0.2)
    return site, command_lines(descendants(site.pid))


def _wait_gone(pids: list[int], commands: dict, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, {p: commands[p] for p in pids if _alive(p)}
        time.sleep(0.2)


def test_a_site_killed_outright_leaves_no_worker_or_supernode_behind(tmp_path):
    """Also checks, on the same real site, that Flower's telemetry and update check are off
    in the processes ``python -m client`` starts."""
    deployment = Deployment(tmp_path)
    helpers: list[int] = []
    try:
        site, commands = _start_site_without_superlink(deployment)
        [client_pid] = [p for p, c in commands.items() if " -m client --site " in c]
        helpers = [
            p
            for p, c in commands.items()
            if any(name in c for name in ("client.worker", "supernode_launch", "clientapp_fork"))
        ]
        assert len(helpers) == 3, commands  # worker, SuperNode, ClientApp fork server
        # started with no Flower variables set, the SuperNode and worker run with Flower's
        # telemetry and update check off: a hospital's site calls nowhere but its SuperLink
        for pid in helpers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for variable, value in FLOWER_OFFLINE_ENV.items():
                assert f"{variable}={value}".encode() in environ, commands[pid]
        os.kill(client_pid, signal.SIGKILL)  # no chance to stop its children itself
        _wait_gone(helpers, commands, 60)
    finally:
        for pid in helpers:  # orphans: deployment.stop no longer reaches them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deployment.stop()


def test_ctrl_c_to_the_whole_site_stops_it_cleanly(tmp_path):
    """Ctrl-C on `timeout ... python -m client`: the whole group gets SIGINT, and `timeout`
    passes it on to the group again. While Flower's SuperNode was in that group it saw the
    signal more than once and often hung in its exit handler until ``python -m client`` killed
    it after ``supernode.stop_wait_s`` (1 of 2 runs here, every run before the kill existed).
    In a session of its own it gets the one signal ``python -m client`` passes on and stops by
    itself (8 of 8 runs), leaving no process behind."""
    deployment = Deployment(tmp_path)
    try:
        site, commands = _start_site_without_superlink(deployment)
        time.sleep(1)  # the SuperExec has started too
        commands.update(
            command_lines([pid for pid in descendants(site.pid) if pid not in commands])
        )
        os.killpg(site.pid, signal.SIGINT)
        code = site.wait(timeout=90)
        # 0: Flower's SuperNode stopped by itself; 130: it hung and was killed
        assert code == 0, deployment.log("synthetic_a")[-3000:]
        assert "killed its SuperNode" not in deployment.log("synthetic_a")
        _wait_gone(list(commands), commands, 30)
        assert "starting it again" not in deployment.log("synthetic_a")
    finally:
        deployment.stop()


def test_the_socket_folder_of_a_site_with_a_long_state_path_goes_when_it_stops(
    tmp_path, monkeypatch
):
    """A socket path over ~107 bytes cannot be bound, so the worker's and the fork server's
    sockets then live in an owner-only temporary folder. A stopped site removes it; a site
    killed outright leaves it, and its restart takes the same folder over instead of making
    another (each run used to leave two random folders behind in /tmp)."""
    temp_root = Path(tempfile.mkdtemp(prefix="mrp-", dir="/tmp"))  # short: room for the sockets
    monkeypatch.setenv("TMPDIR", str(temp_root))  # the site's processes inherit it
    name = "a_hospital_whose_state_folder_is_too_deep_for_a_unix_socket_" + "x" * 40
    deployment = Deployment(tmp_path)

    def socket_folder() -> tuple[Path, dict[str, int]]:
        """The one folder under the temporary directory, and when its two sockets were made."""
        [folder] = list(temp_root.iterdir())
        assert folder.name.startswith("mrprism-sockets-"), folder
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        made = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
        assert set(made) == {"worker.sock", "clientapp_fork.sock"}
        return folder, made

    try:
        assert len(os.fsencode(deployment.site_dir(name) / "worker.sock")) > 107
        _start_site_without_superlink(deployment, name)
        folder, sockets = socket_folder()
        deployment.kill(name)  # a power cut: nothing of the site cleans up
        assert socket_folder() == (folder, sockets)  # the stale sockets are still there
        killed_at = time.time_ns()
        site, _ = _start_site_without_superlink(deployment, name)
        restarted_folder, restarted_sockets = socket_folder()
        assert restarted_folder == folder  # the same folder, no second one
        assert min(restarted_sockets.values()) > killed_at  # both sockets bound anew
        site.send_signal(signal.SIGTERM)  # to `timeout`, which passes it on
        # python -m client stops its SuperNode, worker and fork server and exits 128 + SIGTERM
        assert site.wait(timeout=90) == 128 + signal.SIGTERM, deployment.log(name)[-3000:]
        assert not any(temp_root.iterdir()), list(temp_root.iterdir())
    finally:
        deployment.stop()
        shutil.rmtree(temp_root, ignore_errors=True)
