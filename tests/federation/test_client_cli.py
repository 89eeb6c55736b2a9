"""`python -m client` as a hospital runs it."""

from __future__ import annotations

import subprocess
import sys

from .deploy import PROJECT_ROOT


def _client(*args: str, cwd=PROJECT_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_check_prints_a_summary_of_the_site(tmp_path):
    result = _client("--site", "synthetic_b", "--check", "data.splits.train=5")
    assert result.returncode == 0, result.stderr
    assert "raters:      4" in result.stdout
    assert "train 5, val 16, test 16" in result.stdout


def test_bad_sites_and_settings_give_clear_errors_not_tracebacks(tmp_path):
    unknown = _client("--site", "hospital_x", "--check")
    assert unknown.returncode == 2 and "unknown site 'hospital_x'" in unknown.stderr
    assert "synthetic_a" in unknown.stderr and "Traceback" not in unknown.stderr
    missing = _client("--site", "refuge", "--check")
    assert missing.returncode == 2 and "data.root must be set" in missing.stderr
    empty = _client("--site", "synthetic_a", "--check", "data.splits.train=0")
    assert empty.returncode == 2 and "no training cases" in empty.stderr
    no_site = _client("--check")
    assert no_site.returncode == 2 and "--site is required" in no_site.stderr


def test_dry_run_writes_the_resolved_config_and_shows_the_supernode_command(tmp_path):
    state = tmp_path / "state"
    result = _client(
        "--site", "synthetic_a", "--dry-run", f"state_dir={state}", "superlink=10.1.2.3:9092"
    )
    assert result.returncode == 0, result.stderr
    assert "--superlink 10.1.2.3:9092" in result.stdout
    assert f'state-dir="{state}"' in result.stdout
    assert "site: synthetic_a" in (state / "site_config.yaml").read_text()


def test_tls_without_a_ca_certificate_is_refused_before_start(tmp_path):
    result = _client(
        "--site", "synthetic_a", "--dry-run", f"state_dir={tmp_path}", "supernode.insecure=false"
    )
    assert result.returncode == 2 and "root_certificates" in result.stderr


def test_help_explains(tmp_path):
    result = _client("--help")
    assert result.returncode == 0
    for text in ("--site", "--check", "key=value", "flower-supernode"):
        assert text in result.stdout


def test_check_reports_the_snapshot_and_refuses_a_damaged_one(tmp_path):
    from client.state import SiteStore

    state = tmp_path / "state"
    fresh = _client("--site", "synthetic_a", "--check", f"state_dir={state}")
    assert fresh.returncode == 0 and "snapshot:    none yet" in fresh.stdout
    store = SiteStore(state)
    store.save_snapshot(
        site="synthetic_a", build_args={}, local_state={}, shared_state={}, server_round=4, run_id=9
    )
    saved = _client("--site", "synthetic_a", "--check", f"state_dir={state}")
    assert saved.returncode == 0 and "snapshot:    round 4 of run 9" in saved.stdout
    store.snapshot_path.write_bytes(store.snapshot_path.read_bytes()[:-3])  # torn by a crash
    damaged = _client("--site", "synthetic_a", "--check", f"state_dir={state}")
    assert damaged.returncode == 2 and "Traceback" not in damaged.stderr
    assert f"{store.snapshot_path}: checksum mismatch" in damaged.stderr
