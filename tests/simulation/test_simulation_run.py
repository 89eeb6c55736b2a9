"""`python -m simulation.run preset=smoke`: the report contract, and reproducibility."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from simulation.run import run_experiment

from ..federation.deploy import PROJECT_ROOT, free_port


def test_smoke_run_writes_the_contracted_report(tmp_path):
    out = tmp_path / "smoke"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulation.run",
            "preset=smoke",
            "methods=[federated,federated_shared,local,centralized]",  # all three targets
            f"out_dir={out}",  # with its progress bar, as a user runs it
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the console has the bar and the summary; Flower's round log went to run.log
    console = result.stdout + result.stderr
    assert "round 1 done" not in console and "alembic" not in console
    assert "`run_simulation` function is deprecated" not in console
    assert "FutureWarning" not in console  # Ray's tip about a future GPU default
    assert "federated_shared  mean soft Dice" in result.stdout
    run_log = (out / "run.log").read_text()
    assert "method federated_shared" in run_log and "round 2 done" in run_log
    assert "alembic" not in run_log
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"federated", "federated_shared", "local", "centralized"}
    assert results["seed"] == results["config"]["seed"] == 0
    raters = {s["name"]: s["num_raters"] for s in results["sites"]}
    assert raters == {"synthetic_a": 3, "synthetic_b": 4, "synthetic_hard": 3}
    for name, method in results["methods"].items():
        assert set(method["sites"]) == set(raters), name
        assert 0.0 <= method["mean"]["soft_dice"] <= 1.0
        for site, row in method["sites"].items():
            assert 0.0 <= row["soft_dice"] <= 1.0
            assert len(row["per_rater_dice"]) == raters[site], (name, site)
            assert all(0.0 <= x <= 1.0 for x in row["per_rater_dice"])
            assert row["dice_vs_truth"] is None or 0.0 <= row["dice_vs_truth"] <= 1.0
            assert len(method["history"][site]) == 2  # one score per round
            # rec0 ... rec3 of MrPrism, the last one being the reported calibrated mask
            recs = row["recurrences"]
            assert len(recs) == 4, (name, site)
            assert recs[-1]["soft_dice"] == pytest.approx(row["soft_dice"])
            assert recs[-1]["dice_vs_truth"] == pytest.approx(row["dice_vs_truth"])
            assert all(0.0 <= r["per_rater_dice"] <= 1.0 for r in recs)
    assert len(results["targets"]) == 3
    markdown = (out / "results.md").read_text()
    assert "| federated |" in markdown and "## Targets" in markdown
    assert "| federated | rec3 |" in markdown  # the per-recurrence table
    assert "masks) through `federated`'s final models" in markdown  # what cases.png draws
    for plot in ("rounds.png", "methods.png", "cases.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def _tiny_config(out_dir) -> dict:
    return {
        "out_dir": str(out_dir),
        "seed": 5,
        "methods": ["federated"],
        "progress": False,
        "partition": {
            "kind": "iid",
            "num_sites": 2,
            "data": {
                "kind": "synthetic",
                "name": "pool",
                "num_raters": 3,
                "num_classes": 2,
                "image_size": 32,
                "seed": 1,
                "splits": {"train": 8, "val": 0, "test": 4},
            },  # fmt: skip
        },
        "federation": {
            "rounds": 1,
            "local_epochs": 1,
            "strategy": "fedavg",
            "lr": 0.001,
            "preset": "tiny",
            "model_options": {"recurrences": 1},
            "batch_size": 4,
            "device": "cpu",
            "eval_split": "test",
            "ray_num_cpus": None,
            "client_num_gpus": 0.0,
        },  # fmt: skip
    }


def test_same_seed_gives_identical_partitions_and_metrics(tmp_path):
    # three sites over two rounds: a float sum of three updates depends on their order, and
    # the replies arrive in any order, so the server aggregates them in site order
    config = _tiny_config(tmp_path / "a")
    config["partition"]["num_sites"] = 3
    config["partition"]["data"]["splits"]["train"] = 12
    config["federation"]["rounds"] = 2
    first = run_experiment(config)
    # into the same out_dir: the first run's site state (heads, optimizer) must not carry over
    second = run_experiment(config)
    assert first["sites"] == second["sites"]
    timing = {"seconds", "round_seconds", "state_dirs"}
    scores = lambda run: {  # noqa: E731
        k: v for k, v in run["methods"]["federated"].items() if k not in timing
    }
    assert scores(first) == scores(second)  # bit for bit, every site, metric and round


def test_every_method_steps_at_the_rate_the_schedule_gives_its_round(tmp_path):
    from client.state import SiteStore

    config = _tiny_config(tmp_path)
    config["methods"] = ["federated", "local"]
    config["federation"].update(rounds=2, lr=0.01, lr_schedule="cosine")
    results = run_experiment(config)
    server_log = tmp_path / "work" / "federated" / "server" / "metrics.jsonl"
    rounds = [json.loads(line) for line in server_log.read_text().splitlines()]
    assert [r["lr"] for r in rounds] == pytest.approx([0.01, 0.005])  # (1 + cos(pi / 2)) / 2
    for method in ("federated", "local"):  # the rate each site's Adam took its last steps at
        for site, state_dir in results["methods"][method]["state_dirs"].items():
            saved = SiteStore(state_dir).load_optimizer()["param_groups"][0]["lr"]
            assert saved == pytest.approx(0.005), (method, site)


def test_scaffold_corrects_the_rounds_after_the_first_with_the_sites_mean_gradients(tmp_path):
    """Round 1 has no server control variate yet, so it is the plain run's bit for bit; round 2
    is corrected and differs. The server's control variate is the example-weighted mean of the
    sites' own, which each keeps (the heads have none) and whose changes it sent."""
    from client.state import SiteStore
    from mrprism_core.checkpoint import load_checkpoint
    from mrprism_core.federated import StateLayout

    runs = {}
    for drift in ("none", "scaffold"):
        config = _tiny_config(tmp_path / drift)
        config["federation"].update(rounds=2, lr=0.01, drift_correction=drift)
        runs[drift] = run_experiment(config)["methods"]["federated"]
    for site, plain in runs["none"]["history"].items():
        corrected = runs["scaffold"]["history"][site]
        assert corrected[0] == plain[0] and corrected[1] != plain[1], site
    server_dir = tmp_path / "scaffold" / "work" / "federated" / "server"
    server = load_checkpoint(server_dir / "global_model.pt")
    shared = server["shared_state"]
    layout = StateLayout.of(shared)
    last = json.loads(server_dir.joinpath("metrics.jsonl").read_text().splitlines()[-1])
    weighted, examples = torch.zeros(layout.size), 0
    for site, state_dir in runs["scaffold"]["state_dirs"].items():
        own = SiteStore(state_dir).load_control(server["control_ledger"])
        assert own and set(own) <= set(shared)  # shared parameters only: no rater head
        count = int(last["train_sites"][site]["num-examples"])
        weighted += count * layout.pack_padded(own)  # zeros for the buffers
        examples += count
    assert server["control_variate"].abs().max() > 0
    assert torch.allclose(server["control_variate"], weighted / examples, atol=1e-6)


def test_privacy_methods_report_their_cost_and_budget(tmp_path):
    cfg = _tiny_config(tmp_path / "private")
    cfg["partition"]["num_sites"] = 3  # SecAgg+ needs three sites
    cfg["federation"]["rounds"] = 2
    cfg["methods"] = ["federated_dp_eps4", "federated_secagg"]
    results = run_experiment(cfg)
    dp = results["methods"]["federated_dp_eps4"]
    assert set(dp["privacy"]) == set(dp["sites"])
    for spent in dp["privacy"].values():
        # calibrated to the budget over both rounds, and never over it
        assert 3.0 < spent["epsilon"] <= 4.0 + 1e-6 and spent["delta"] == 1e-5
    secure = results["methods"]["federated_secagg"]
    assert set(secure["sites"]) == set(dp["sites"])
    for row in secure["sites"].values():
        # two steps at lr 1e-3 barely move the model from its 5 % foreground start, so the
        # mask may still be empty (soft Dice 0); what SecAgg+ must deliver is a finite score
        assert 0.0 <= row["soft_dice"] <= 1.0 and math.isfinite(row["ged"])
    markdown = (tmp_path / "private" / "results.md").read_text()
    assert "## Privacy spent" in markdown and "| federated_dp_eps4 |" in markdown


def test_baselines_join_the_grid_and_the_report_compares_them(tmp_path):
    cfg = _tiny_config(tmp_path / "baselines")
    cfg["methods"] = ["local", "multihead_unet:local", "unet_staple:centralized"]
    results = run_experiment(cfg)
    assert results["methods"]["multihead_unet:local"]["model"] == "multihead_unet"
    for site, row in results["methods"]["multihead_unet:local"]["sites"].items():
        assert len(row["per_rater_dice"]) == 3, site  # one personal head per rater
    for row in results["methods"]["unet_staple:centralized"]["sites"].values():
        assert row["per_rater_dice"] == [] and row["ged"] is None  # one fused output only
    # each model keeps its own state folders
    assert (tmp_path / "baselines" / "work" / "multihead_unet" / "local" / "sites").is_dir()
    markdown = (tmp_path / "baselines" / "results.md").read_text()
    assert "## Models compared" in markdown
    assert "| multihead_unet | local | **mean** |" in markdown
    assert "| unet_staple | centralized | **mean** |" in markdown
    assert "Where MrPrism does not win:" in markdown


def test_unknown_models_and_methods_are_named():
    from simulation.methods import check_methods

    with pytest.raises(ValueError, match=r"\['unet_x:local', 'mrnet:sideways'\]"):
        check_methods(["federated", "unet_x:local", "mrnet:sideways", "dpersona:federated"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("methods=[bogus]", "unknown method(s) ['bogus']"),
        ("partition.sources=[nope]", "unknown site 'nope'"),
        ("federation.rounds=ten", "federation.rounds='ten' is refused"),
        ("+federation.round=3", "unknown key 'federation.round' (a typo?)"),
        # out of range: before, -1 rounds ran every method and ended in a traceback
        ("federation.rounds=-1", "federation.rounds=-1 is refused: must be >= 1"),
        ("federation.lr=0", "federation.lr=0.0 is refused: must be > 0"),
        (
            "federation.drift_correction=bogus",
            "federation.drift_correction=bogus: unknown drift correction; choose from none, "
            "scaffold",
        ),
        (
            "federation.update_precision=int8",
            "federation.update_precision=int8: unknown update precision; choose from float16, "
            "float32",
        ),
        ("partition.alpha=-0.5", "partition.alpha=-0.5 is refused: must be > 0"),
        ("federation.select=best", "federation.select='best' is refused: choose from"),
        # the default preset's sites have no validation cases to choose a round by
        (
            "federation.select=best_val",
            "federation.select=best_val chooses each method's round by the sites' val split, "
            "but ['synthetic_a', 'synthetic_b', 'synthetic_hard'] have no val cases",
        ),
        # the default methods train MrPrism: refused before the first of them starts
        (
            "federation.model_options={bank_size: 4}",
            "federation.model_options {'bank_size': 4} apply to every method: "
            "model 'mrprism' has no option(s) ['bank_size']",
        ),
    ],
)
def test_a_bad_method_or_site_is_one_message_not_a_traceback(override, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "simulation.run", override, f"out_dir={tmp_path}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "auto"])
def test_a_ray_cluster_that_does_not_answer_is_one_message_at_once(address, tmp_path):
    # before the check, ray.init waited for such a cluster forever and ignored SIGTERM
    port = free_port()  # nothing listens there
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}  # what "auto" resolves to
    result = subprocess.run(
        [sys.executable, "-m", "simulation.run", f"out_dir={tmp_path}",
         f"federation.ray_address={address.format(port=port)}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
    assert result.stderr.startswith("error: federation.ray_address=") and "Traceback" not in (
        result.stderr
    )


def test_a_simulation_runtime_that_cannot_start_ends_the_run_with_its_cause(tmp_path):
    # Ray cannot start when its temporary folder cannot be made; Flower's ServerApp thread
    # then outlived the crashed runtime and kept the process alive forever after the error
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    env = {**os.environ, "RAY_TMPDIR": str(blocker / "ray")}
    result = subprocess.run(
        [sys.executable, "-m", "simulation.run", "preset=smoke", "methods=[federated]",
         f"out_dir={tmp_path / 'run'}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: the simulation stopped: NotADirectoryError: "
        f"[Errno 20] Not a directory: '{blocker / 'ray'}'"
    )


def test_ctrl_c_mid_federation_ends_the_run_at_once(tmp_path):
    # Flower's ServerApp thread (not a daemon) used to keep the interrupted process alive
    out = tmp_path / "run"
    console = tmp_path / "console.txt"  # a file: an unread pipe could fill with the bar
    with console.open("w") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "simulation.run", "preset=smoke", "methods=[federated]",
             "federation.rounds=100", f"out_dir={out}"],
            cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,  # its own group, as a terminal's foreground job
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "round 2 done" not in _read(out / "run.log"):
            assert run.poll() is None and time.monotonic() < deadline, _read(out / "run.log")
            time.sleep(0.5)
        os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            run.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running 120 s after Ctrl-C; console: {console.read_text()[-2000:]}\n"
                f"run.log: {_read(out / 'run.log')[-3000:]}"
            )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    err = console.read_text()
    assert run.returncode == 130, err[-2000:]
    # at once, or (a clean-up that hung) after ends_on_error's grace time
    assert err.strip().splitlines()[-1].startswith("error: the simulation stopped: interrupted")


def test_a_shut_down_that_hangs_after_ctrl_c_is_ended_after_the_grace_time():
    code = (
        "import time\n"
        "from simulation.run import ends_on_error\n"
        "with ends_on_error(interrupt_grace_s=1):\n"
        "    try:\n"
        "        print('ready', flush=True)\n"
        "        time.sleep(600)\n"
        "    finally:\n"
        "        time.sleep(600)  # a clean-up that never ends\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert run.stdout.readline().strip() == "ready"
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, err
    assert "the simulation stopped: interrupted (its shut-down took over 1 s)" in err


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (PROJECT_ROOT / "site_configs" / "preset").glob("*.yaml"))
)
def test_every_preset_passes_the_typed_schema_with_its_values(preset):
    from benchmarks.common import simulation_config
    from mrprism_core.config_schema import SimulationSchema, checked

    composed = simulation_config([f"preset={preset}"])
    typed = checked(SimulationSchema, composed, "the simulation config")
    # the schema fills nothing in over the preset's values and drops none of them
    assert OmegaConf.to_container(typed) == composed


def test_tracking_writes_each_methods_rounds_under_the_out_dir(tmp_path):
    from ..core.test_tracking import scalars

    cfg = _tiny_config(tmp_path / "tracked")
    cfg["methods"], cfg["tracking"] = ["local"], "tensorboard"
    cfg["federation"]["rounds"] = 2
    results = run_experiment(cfg)
    logged = scalars(tmp_path / "tracked" / "tensorboard" / "local")
    for site, values in results["methods"]["local"]["history"].items():
        assert [v for _, v in logged[f"evaluate/soft-dice/{site}"]] == pytest.approx(values)


def test_model_options_take_the_documented_mapping_override():
    from benchmarks.common import simulation_config
    from mrprism_core.config_schema import SimulationSchema, checked

    # the form simulation.yaml's comment shows; an empty mapping there refused it
    composed = simulation_config(
        ["federation.model_options={recurrences: 2, divp_pixel_context: true}"]
    )
    typed = checked(SimulationSchema, composed, "the simulation config")
    assert dict(typed.federation.model_options) == {"recurrences": 2, "divp_pixel_context": True}


def test_several_seeds_give_each_run_and_the_mean_and_spread_of_every_score(tmp_path):
    from simulation.run import run_seeds

    cfg = _tiny_config(tmp_path / "seeds")
    cfg["methods"], cfg["seeds"] = ["local", "centralized"], 2
    summary = run_seeds(cfg)
    runs = [
        json.loads((tmp_path / "seeds" / f"seed{s}" / "results.json").read_text()) for s in (5, 6)
    ]
    assert [run["seed"] for run in runs] == summary["seeds"] == [5, 6]
    for name in cfg["methods"]:
        for site, row in summary["methods"][name]["sites"].items():
            scores = [run["methods"][name]["sites"][site]["soft_dice"] for run in runs]
            assert scores[0] != scores[1], (name, site)  # the seeds really differ
            assert row["soft_dice"]["mean"] == pytest.approx((scores[0] + scores[1]) / 2)
            assert row["soft_dice"]["std"] == pytest.approx(abs(scores[0] - scores[1]) / 2**0.5)
        # rec0 .. rec1 of the site means, each over the seeds
        last = summary["methods"][name]["recurrences"][-1]["soft_dice"]["mean"]
        assert last == pytest.approx(summary["methods"][name]["mean"]["soft_dice"]["mean"])
    on_disk = json.loads((tmp_path / "seeds" / "results.json").read_text())
    assert on_disk["methods"] == summary["methods"]
    markdown = (tmp_path / "seeds" / "results.md").read_text()
    assert "Seeds 5, 6" in markdown and "| local | rec1 |" in markdown and " ± " in markdown


def test_over_seeds_judges_a_target_on_the_mean_and_keeps_each_seed():
    from simulation.report import console_summary, over_seeds

    def run(seed: int, federated: float, centralized: float) -> dict:
        def method(score: float) -> dict:
            row = {"soft_dice": score, "per_rater_dice": [score], "dice_vs_truth": None}
            return {"sites": {"a": row}, "mean": {"soft_dice": score}, "seconds": 1.0}

        return {
            "seed": seed,
            "sites": [{"name": "a", "num_raters": 1, "cases": {"train": 4}}],
            "methods": {"federated": method(federated), "centralized": method(centralized)},
            "targets": [{"measured_points": round(100 * (federated - centralized), 2)}],
        }

    # seed 0 is within one point of centralized, seed 1 is not: on the mean (-1.1) it fails
    summary = over_seeds([run(0, 0.850, 0.855), run(1, 0.840, 0.857)])
    [target] = summary["targets"]
    assert target["per_seed"] == [-0.5, -1.7]
    assert target["measured_points"]["mean"] == pytest.approx(-1.1)
    assert target["met"] is False
    summary = over_seeds([run(0, 0.850, 0.855), run(1, 0.845, 0.852)])  # mean -0.6: met
    assert summary["targets"][0]["met"] is True
    lines = console_summary(summary)
    assert lines[0].startswith("federated         mean soft Dice 0.8475 ± 0.0035 over seeds 0, 1")
    assert lines[-1].endswith("-0.60 ± 0.14 points on the mean (met)")


def test_best_val_reports_each_method_at_its_best_validation_round(tmp_path):
    cfg = _tiny_config(tmp_path / "best")
    cfg["partition"]["data"]["splits"]["val"] = 4
    cfg["methods"] = ["federated", "local", "centralized"]
    # at this learning rate the scores jump about: local-only training peaked before its
    # last round (rounds 2 and 3 of 4 when this test was written, by 0.02-0.09 soft Dice)
    cfg["federation"].update(rounds=4, lr=0.1, select="best_val")
    results = run_experiment(cfg)
    earlier = []
    for name, method in results["methods"].items():
        for site, row in method["sites"].items():
            chosen = method["selected"][site]
            assert chosen["by"] == "best val soft Dice" and len(chosen["scores"]) == 4, name
            best = chosen["scores"].index(max(chosen["scores"])) + 1  # the first best round
            assert chosen["round"] == best, (name, site)
            # the test scores reported are that round's, not the last one's
            assert row["soft_dice"] == method["history"][site][best - 1], (name, site)
            if method["history"][site][best - 1] != method["history"][site][-1]:
                earlier.append((name, site))
    assert earlier  # a round other than the last was reported somewhere: the choice mattered
    # one global model, one pooled model: one round for all their sites
    for name in ("federated", "centralized"):
        assert len({r["round"] for r in results["methods"][name]["selected"].values()}) == 1
    markdown = (tmp_path / "best" / "results.md").read_text()
    assert "of the round with the best validation soft Dice" in markdown
    assert "## Round reported (best validation soft Dice)" in markdown


def test_a_round_is_chosen_by_its_validation_score_or_is_the_last():
    from simulation.methods import RoundChoice

    best = RoundChoice("val")
    for server_round, score in enumerate([0.5, 0.7, 0.6, 0.7], start=1):
        best.offer(server_round, score)
    assert best.report() == {"by": "best val soft Dice", "round": 2, "scores": [0.5, 0.7, 0.6, 0.7]}
    last = RoundChoice("")
    assert all(last.offer(server_round, None) for server_round in (1, 2, 3))
    assert last.report()["round"] == 3


def test_best_val_without_validation_cases_is_refused_before_training(tmp_path):
    cfg = _tiny_config(tmp_path / "noval")
    cfg["federation"]["select"] = "best_val"
    with pytest.raises(ValueError, match=r"\['site00', 'site01'\] have no val cases"):
        run_experiment(cfg)
    assert not (tmp_path / "noval" / "work").exists()


def test_the_seeds_report_names_each_seeds_reported_round(tmp_path):
    from simulation.report import over_seeds, write_seed_report

    def run(seed: int, chosen: int) -> dict:
        row = {"soft_dice": 0.8, "per_rater_dice": [0.8], "dice_vs_truth": None}
        selected = {"a": {"by": "best val soft Dice", "round": chosen, "scores": []}}
        method = {"sites": {"a": row}, "mean": {"soft_dice": 0.8}, "seconds": 1.0}
        return {
            "seed": seed,
            "config": {"federation": {"rounds": 20, "local_epochs": 1, "strategy": "fedavg",
                                      "preset": "tiny", "select": "best_val"}},
            "sites": [{"name": "a", "num_raters": 1, "cases": {"train": 4}}],
            "methods": {"federated": {**method, "selected": selected}},
            "targets": [],
        }  # fmt: skip

    runs = [run(0, 17), run(1, 20), run(2, 18)]
    summary = {"config": runs[0]["config"], **over_seeds(runs)}  # as run_seeds writes it
    assert summary["methods"]["federated"]["selected"]["a"]["rounds"] == [17, 20, 18]
    write_seed_report(tmp_path, summary)
    markdown = (tmp_path / "results.md").read_text()
    assert "## Round reported (best validation soft Dice)" in markdown
    assert "| federated | 17 / 20 / 18 |" in markdown
