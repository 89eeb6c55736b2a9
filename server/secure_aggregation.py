"""Rounds under secure aggregation: Flower's SecAgg+ protocol, so the server learns only the
(example-weighted) sum of the sites' shared weights, never one site's update.

In Flower 1.41 SecAgg+ exists only as the legacy ``SecAggPlusWorkflow`` inside
``DefaultWorkflow`` with a legacy strategy; the ClientApp answers it through
``secaggplus_mod`` (see ``client/app.py``). This module wires that workflow to the same run
files as the plain loop: one global checkpoint and one ``metrics.jsonl`` line per round, resume
after the last completed round. Per-site weights are masked; the sites' metrics (loss, example
count, DP epsilon) are not secret and are logged as usual. Federated evaluation is not part of
a SecAgg+ run: evaluate the checkpoint afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid

from mrprism_core.drift_correction import updated_server_control
from mrprism_core.federated import PACKED_KEY
from mrprism_core.protocol import CONTROL_KEY, SiteReply

from .config import RunConfig
from .federation import (
    RunFiles,
    log,
    log_site_privacy,
    round_instructions,
    user_level_privacy,
)
from .grid import PromptGrid

__all__ = ["run_secure_federation"]


def run_secure_federation(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict:
    """Run (or resume) ``cfg.num_server_rounds`` rounds with SecAgg+; returns the summary."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow

    from .secagg_workflow import PipelinedSecAggPlus

    if cfg.dp_mode != "none" or cfg.strategy != "fedavg":
        raise ValueError(
            "secure-aggregation runs FedAvg on the masked sum; it cannot be combined with "
            f"strategy={cfg.strategy!r} or dp-mode={cfg.dp_mode!r} (use DP-SGD at the sites)"
        )
    files = RunFiles(cfg.out_dir)
    layout, done, arrays, history = files.start(cfg)
    packed = arrays[PACKED_KEY].numpy()
    # with SCAFFOLD the server's control variate travels beside the weights, and the sites'
    # changes of theirs are masked and summed with their weights
    server_control = arrays[CONTROL_KEY].numpy() if CONTROL_KEY in arrays else None
    initial = [packed] if server_control is None else [packed, server_control]
    if done >= cfg.num_server_rounds:
        return _summary(cfg, files, history)
    instructions = replace(round_instructions(cfg, layout), control_ledger=files.control_ledger)
    # the sites of each round that aggregated; a round SecAgg+ halted has none
    round_sites: dict[int, dict[str, dict[str, Any]]] = {}
    started = [time.time()]
    current = [0]  # the local round under way

    def fit_config(local_round: int) -> dict[str, Any]:
        started[0], current[0] = time.time(), local_round
        return replace(instructions, server_round=done + local_round).to_config()

    def site_metrics(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        replies = [SiteReply.from_records(m) for _, m in results]
        rows = {r.site: {**r.to_metrics(), **r.to_site()} for r in replies}
        round_sites[current[0]] = rows
        total = sum(n for n, _ in results) or 1
        loss = sum(r.num_examples * r.metrics["train-loss"] for r in replies)
        return {"train-loss": loss / total}

    def after_round(local_round: int, weights: list[np.ndarray], _config: dict) -> None:
        # Flower calls this with the new global weights after every round (0 = initial)
        if local_round == 0:
            return None
        server_round = done + local_round
        vectors = [torch.from_numpy(np.array(w, dtype=packed.dtype)) for w in weights]
        new = ArrayRecord(dict(zip((PACKED_KEY, CONTROL_KEY), vectors, strict=False)))
        aggregated = local_round in round_sites  # not when SecAgg+ halted the round
        sites = round_sites.get(local_round, {})
        record = {
            "round": server_round,
            "run_id": context.run_id,
            "seconds": round(time.time() - started[0], 3),
            "aggregated": aggregated,
            "secure_aggregation": True,
            # sites sent no setup message: their keys were made with the last unmasking
            "secagg_keys_made_ahead": len(secagg.setup_skipped),
            "user_level_dp": user_level_privacy(cfg, server_round),
            "train": {},
            "evaluate": {},
            "train_sites": sites,
            "evaluate_sites": {},
            "dropped": [],
            "evaluate_dropped": [],
        }
        log_site_privacy(sites)
        history.append(record)
        # written behind, as in the plain loop; _summary's write_summary waits for it
        files.save_round(cfg, layout, new, server_round, context.run_id, history, behind=True)
        if aggregated:
            log.info("round %d done under SecAgg+ (%d sites)", server_round, len(sites))
        else:
            log.warning("round %d under SecAgg+ aggregated nothing: the weights stay", server_round)
        if on_round is not None:
            on_round(record)
        return None

    class SecureFedAvg(LegacyFedAvg):
        """FedAvg of the unmasked sum, in the model's dtype; with SCAFFOLD, the mean change of
        the sites' control variates (the second array) is folded into the server's, as the
        plain loop does."""

        control = server_control

        def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN202
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is None:
                return parameters, metrics
            # dequantization yields float64: back to the model's dtype before it is sent out
            # again (float64 doubled what every later round sent each site)
            mean_packed, *mean_change = (
                np.asarray(a, dtype=packed.dtype) for a in parameters_to_ndarrays(parameters)
            )
            if self.control is None:
                return ndarrays_to_parameters([mean_packed]), metrics
            # SecAgg+ weighs each site by its example count before masking
            replied = {str(fit.metrics["site"]): float(fit.num_examples) for _, fit in results}
            control, files.control_weights = updated_server_control(
                torch.from_numpy(self.control),
                files.control_weights,
                replied,
                torch.from_numpy(mean_change[0]),
            )
            self.control = control.numpy()
            return ndarrays_to_parameters([mean_packed, self.control]), metrics

    strategy = SecureFedAvg(
        fraction_fit=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_fit_clients=cfg.min_train_nodes,
        min_available_clients=cfg.min_available_nodes,
        initial_parameters=ndarrays_to_parameters(initial),
        on_fit_config_fn=fit_config,
        evaluate_fn=after_round,
        fit_metrics_aggregation_fn=site_metrics,
    )
    secagg = PipelinedSecAggPlus(
        num_shares=_count(cfg.secagg_num_shares),
        reconstruction_threshold=_count(cfg.secagg_reconstruction_threshold),
        clipping_range=cfg.secagg_clipping_range,
        max_weight=cfg.secagg_max_weight,
        timeout=cfg.round_timeout,
        train_ahead=cfg.secagg_train_ahead,
        keys_ahead=cfg.secagg_keys_ahead,
    )
    workflow = DefaultWorkflow(fit_workflow=secagg)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(
            num_rounds=cfg.num_server_rounds - done, round_timeout=cfg.round_timeout
        ),
        strategy=strategy,
    )
    workflow(PromptGrid(grid), legacy)  # its stages look for replies every 0.2 s, not 3 s
    return _summary(cfg, files, history)


def _count(value: float) -> int | float:
    """Flower takes an int (a number of sites) or a float in (0, 1] (a share of them)."""
    return int(value) if float(value).is_integer() and value > 1 else float(value)


def _summary(cfg: RunConfig, files: RunFiles, history: list[dict]) -> dict:
    return files.write_summary(
        cfg,
        secure_aggregation=True,
        final_train_sites=history[-1]["train_sites"] if history else None,
    )
