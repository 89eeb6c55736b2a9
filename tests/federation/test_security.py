"""The documented secure deployment on 127.0.0.1: TLS with certificates made by
``python -m server.certs`` and SuperNode authentication with keys made by
``python -m client.keys``. Registered sites train; an unregistered key and a SuperNode that does
not trust the federation's CA are refused."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
from cryptography import x509

from client.keys import make_site_keys
from client.socket_paths import socket_folder, socket_path
from server.certs import make_certificates

from .deploy import PROJECT_ROOT, Deployment, history, toml_value, wait_for_round

TINY = ["data.splits.train=4", "data.splits.val=2", "data.splits.test=2", "data.image_size=32"]


def test_certificate_helper_names_loopback_and_refuses_to_replace_a_ca(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server.certs", str(tmp_path), "--host", "fl.example.org"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in names.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0  # private keys: owner only
    again = subprocess.run(
        [sys.executable, "-m", "server.certs", str(tmp_path)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    assert again.returncode == 2 and "ca.crt exists" in again.stderr


@pytest.fixture
def secure(tmp_path):
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"])
    deploy = Deployment(tmp_path, tls_dir=certs)
    yield deploy
    deploy.stop()


def _site_options(ca, key) -> list[str]:
    return [
        "supernode.insecure=false",
        f"supernode.root_certificates={ca}",
        f"supernode.auth_private_key={key}",
        "supernode.max_retries=2",
        *TINY,
    ]


def test_tls_and_authentication_admit_registered_sites_only(secure, tmp_path):
    keys = tmp_path / "keys"
    site_keys = {site: make_site_keys(keys, site) for site in ("synthetic_a", "synthetic_b")}
    rogue_key, _ = make_site_keys(keys, "rogue")  # made, never registered
    secure.start_superlink("--enable-supernode-auth", "--database", str(tmp_path / "link.db"))
    for _, public in site_keys.values():
        registered = secure.flwr("supernode", "register", str(public), "test")
        assert registered.returncode == 0, registered.stdout + registered.stderr

    ca = secure.tls_dir / "ca.crt"
    for site, (private, _) in site_keys.items():
        secure.start_site(site, *_site_options(ca, private))
    # an unregistered key is refused like a session that has not expired yet (the same Flower
    # error); the retries that wait out such a session have their own test below
    no_retry = "supernode.activation_wait_s=0"
    rogue = secure.start_site("synthetic_c", *_site_options(ca, rogue_key), no_retry, name="rogue")
    other_ca = make_certificates(tmp_path / "other-ca")
    stranger = secure.start_site(
        "synthetic_c", *_site_options(other_ca / "ca.crt", site_keys["synthetic_a"][0]),
        name="stranger",
    )  # fmt: skip

    # refused at once, with Flower's reason in the site's log
    assert rogue.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in secure.log("rogue"), secure.log("rogue")[-2000:]
    assert stranger.wait(timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in secure.log("stranger"), secure.log("stranger")[-2000:]

    secure.wait_online(2)
    out_dir = tmp_path / "out"
    result = secure.run(
        {"num-server-rounds": 1, "fraction-evaluate": 0.0, "out-dir": str(out_dir)}, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record["train_sites"]) == {"synthetic_a", "synthetic_b"}
    assert record["aggregated"] is True


def test_a_site_restarted_at_once_under_node_auth_waits_for_its_old_session_and_rejoins(
    secure, tmp_path
):
    """Flower refuses to activate a SuperNode whose previous session the SuperLink still holds
    (a crash and an immediate restart): ``python -m client`` retries with backoff, says why,
    and the site trains again in the next round."""
    keys = tmp_path / "keys"
    site_keys = {site: make_site_keys(keys, site) for site in ("synthetic_a", "synthetic_b")}
    secure.start_superlink("--enable-supernode-auth", "--database", str(tmp_path / "link.db"))
    for _, public in site_keys.values():
        registered = secure.flwr("supernode", "register", str(public), "test")
        assert registered.returncode == 0, registered.stdout + registered.stderr
    ca = secure.tls_dir / "ca.crt"
    options = {site: _site_options(ca, key)[:3] + TINY for site, (key, _) in site_keys.items()}
    # the killed site's old session ends two heartbeats after its last one: 10-20 s after the
    # kill at the default 10 s. The restart first asked to activate 7.8 s after the kill on an
    # idle machine; on a loaded one (three test workers on two cores) it came after the old
    # session had ended, so nothing was refused. At 30 s the session lasts 30-60 s.
    options["synthetic_a"].append("supernode.heartbeat_s=30")
    for site in site_keys:
        secure.start_site(site, *options[site])
    secure.wait_online(2)
    out_dir = tmp_path / "out"
    run = secure.submit(
        {"num-server-rounds": 3, "fraction-evaluate": 0.0, "min-train-replies": 1,
         "model-options": json.dumps({"recurrences": 1}), "out-dir": str(out_dir)}
    )  # fmt: skip
    wait_for_round(secure, out_dir, 1)
    secure.kill("synthetic_a")  # a power cut in round 2 ...
    time.sleep(2)
    secure.start_site("synthetic_a", *options["synthetic_a"])  # ... and an immediate restart

    assert run.wait(timeout=900) == 0, secure.log("flwr-run")[-4000:]
    rounds = history(out_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3], secure.log("flwr-run")[-4000:]
    assert "synthetic_a" not in rounds[1]["train_sites"]  # gone in the round it crashed in
    assert set(rounds[2]["train_sites"]) == {"synthetic_a", "synthetic_b"}  # back for round 3
    log = secure.log("synthetic_a")
    assert "Failed to activate SuperNode" in log and "its old session has not expired" in log


def test_a_site_refuses_an_app_that_is_not_its_own_code(tmp_path):
    """Whoever reaches the SuperLink can submit a run, and the run's app (FAB) is what a site's
    SuperNode executes: the site runs it only if its Python files are the site's own
    (``supernode.pin_app``, client/app_check.py). The same project with one comment added to
    one file is refused with Flower's own verification error, and nothing trains."""
    app = tmp_path / "app"
    app.mkdir()
    built = subprocess.run(
        [str(Path(sys.executable).with_name("flwr")), "build", "--app", str(PROJECT_ROOT)],
        cwd=app, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    [fab] = app.glob("*.fab")
    with zipfile.ZipFile(fab) as archive:
        archive.extractall(app)
    fab.unlink()
    tampered = app / "client" / "app.py"
    tampered.write_text(tampered.read_text() + "# anything at all could run here\n")

    deployment = Deployment(tmp_path / "deploy")
    try:
        deployment.start_superlink()
        deployment.start_site("synthetic_a", "data.splits.train=4", "data.splits.val=2")
        deployment.wait_online(1)
        out_dir = tmp_path / "out"
        config = {
            "num-server-rounds": 1, "fraction-evaluate": 0.0, "min-available-nodes": 1,
            "min-train-nodes": 1, "out-dir": str(out_dir), "round-timeout": 120,
        }  # fmt: skip
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
        result = deployment.flwr("run", str(app), "test", "--stream", "-c", overrides, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        record = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])
        assert record["aggregated"] is False and not record["train_sites"], record
        log = deployment.log("synthetic_a")
        assert "its app is not this site's code" in log and "client/app.py: differs" in log
        # Flower's own refusal, naming the failed verification (not an unsupported SuperLink)
        assert "FAB verification failed" in log and "not supported" not in log, log[-3000:]
        assert "could not be verified" in record["dropped"][0]["reason"], record["dropped"]
    finally:
        deployment.stop()


def test_a_site_binds_its_sockets_only_in_a_folder_no_one_else_may_enter(
    tmp_path, monkeypatch, capsys
):
    """A long state path puts a site's sockets in a folder named after it under the temporary
    directory. Another user can create that name first: a folder others may enter is not used
    (they could put their own socket where the ClientApp looks for the worker) and is left
    alone; an owner-only one is taken over, and both go once the site stops."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    state_dir = tmp_path / ("a_state_folder_too_deep_for_a_unix_socket_" + "x" * 80)
    expected = socket_folder(state_dir, tmp_path)

    with socket_path(state_dir, "worker.sock") as path:
        assert path == expected / "worker.sock"
        assert stat.S_IMODE(expected.stat().st_mode) == 0o700
        path.touch()  # as the worker's bind would
    assert not expected.exists()

    expected.mkdir(mode=0o755)  # made first by someone who wants to listen in
    planted = expected / "worker.sock"
    planted.touch()
    expected.chmod(0o755)  # mkdir applied the umask
    with socket_path(state_dir, "worker.sock") as path:
        assert path.parent != expected
        assert path.parent.name.startswith("mrprism-sockets-")
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        elsewhere = path.parent
    assert "is not an owner-only folder" in capsys.readouterr().err
    assert not elsewhere.exists()
    assert planted.exists()  # not ours to remove

    short = tmp_path / "site"
    with socket_path(short, "worker.sock") as path:
        assert path == short / "worker.sock"  # fits: in the state directory itself
