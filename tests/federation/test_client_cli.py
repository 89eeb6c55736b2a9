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
    # a value of the wrong type, or a misspelt key, is named before anything runs
    typed = _client("--site", "synthetic_a", "--check", "train.batch_size=abc")
    assert typed.returncode == 2 and "train.batch_size='abc' is refused" in typed.stderr
    assert "converted to Integer" in typed.stderr and "Traceback" not in typed.stderr
    typo = _client("--site", "synthetic_a", "--check", "+trian.batch_size=4")
    assert typo.returncode == 2 and "unknown key 'trian'" in typo.stderr
    # and so is a number out of range (a negative budget was accepted as the target)
    budget = _client(
        "--site", "synthetic_a", "--check", "privacy=dp_sgd", "privacy.target_epsilon=-3"
    )
    assert (
        budget.returncode == 2
        and "privacy.target_epsilon=-3.0 is refused: must be > 0" in budget.stderr
    )
    batch = _client("--site", "synthetic_a", "--check", "train.batch_size=0")
    assert batch.returncode == 2 and "train.batch_size=0 is refused: must be >= 1" in batch.stderr
    # the command's own numbers too (--cases 0 stopped in torch's sampler, --lr -1 in Adam)
    for flag, value, message in [
        ("--cases", "0", "must be >= 1, got 0"),
        ("--lr", "-1", "must be > 0"),
    ]:
        bad = _client("--site", "synthetic_a", "--adapt", flag, value)
        assert bad.returncode == 2 and f"argument {flag}: {message}" in bad.stderr, bad.stderr


def test_a_bad_site_name_or_value_is_refused_before_torch_is_imported():
    """A typo costs no torch import (1-2 s on a laptop): the config is resolved and checked
    first, and `--list` needs no torch at all."""
    probe = (
        "import sys\n"
        "from client.__main__ import main\n"
        "code = main(sys.argv[1:])\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
        "sys.exit(code)\n"
    )
    cases = [  # arguments, exit code, torch imported
        (["--site", "hospital_x"], 2, False),
        (["--site", "synthetic_a", "train.batch_size=abc"], 2, False),
        (["--site", "synthetic_a", "supernode.heartbeat_s=5"], 2, False),
        (["--list"], 0, False),
        # a good config goes on to the data, which needs torch (the probe sees it imported)
        (["--site", "synthetic_a", "--check", "data.splits.train=4"], 0, True),
    ]
    for args, code, torch_imported in cases:
        result = subprocess.run(
            [sys.executable, "-c", probe, *args],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == code, (args, result.stderr)
        assert f"torch imported: {torch_imported}" in result.stdout, (
            args,
            result.stdout,
            result.stderr,
        )


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


def test_a_hospitals_own_config_folder_overlays_the_packaged_one(tmp_path):
    import os

    from simulation.run import resolve_sites

    own = tmp_path / "our_configs"
    own.mkdir()
    packaged = (PROJECT_ROOT / "site_configs" / "synthetic_a.yaml").read_text()
    # a new hospital on the packaged data group, and our own version of synthetic_b
    (own / "st_mary.yaml").write_text(packaged.replace("synthetic_a", "st_mary"))
    (own / "synthetic_b.yaml").write_text(packaged.replace("synthetic_a", "synthetic_b"))

    listed = _client("--list", "--config-dir", str(own))
    assert listed.returncode == 0, listed.stderr
    rows = dict(line.split() for line in listed.stdout.splitlines())
    assert rows["st_mary"] == str(own) and rows["synthetic_b"] == str(own)
    assert rows["synthetic_c"] == str(PROJECT_ROOT / "site_configs")

    mine = _client("--site", "st_mary", "--config-dir", str(own), "--check", "privacy=dp_sgd")
    assert mine.returncode == 0, mine.stderr
    assert "site:        st_mary" in mine.stdout and "raters:      3" in mine.stdout
    assert "epsilon" in mine.stdout  # the packaged privacy group is there for it

    env = {**os.environ, "MRPRISM_SITE_CONFIGS": str(own)}
    shadowed = subprocess.run(
        [sys.executable, "-m", "client", "--site", "synthetic_b", "--check"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120, env=env,
    )  # fmt: skip
    assert shadowed.returncode == 0, shadowed.stderr
    assert "raters:      3" in shadowed.stdout  # ours (3 raters), not the packaged 4
    assert f"using {own / 'synthetic_b.yaml'}, not the packaged config" in shadowed.stderr
    assert _client("--site", "st_mary", "--check").returncode == 2  # not without the folder

    sites = resolve_sites(
        {"seed": 0, "partition": {"kind": "source", "sources": ["st_mary", "synthetic_c"],
                                  "config_dir": str(own)}}
    )  # fmt: skip
    assert [s.name for s in sites] == ["st_mary", "synthetic_c"]
