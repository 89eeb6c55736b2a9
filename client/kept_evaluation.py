"""A round's evaluation done ahead, in the next round's training message, kept at the site.

In pipelined deployment rounds (``evaluate-in-training``) round r+1's training message
carries the global weights round r's evaluation would carry. The site evaluates them first,
with the rater heads of round r, and keeps the outcome here; round r's evaluation message,
sent after, carries no weights and is answered from this file. On the paper preset that is one
download of 107 MiB less per round and site, through the SuperLink, the SuperNode and the
ClientApp.

The file holds only what the evaluation reply sends anyway (metrics, the site's name, its
details), as JSON. Reading it is the ClientApp's job and imports neither torch nor the model
code; writing it is the round's (``client/rounds.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .worker_protocol import RoundOutcome, outcome_from_record, outcome_record

__all__ = ["KEPT_EVALUATION_FILE", "keep_evaluation", "kept_evaluation"]

KEPT_EVALUATION_FILE = "kept_evaluation.json"


def keep_evaluation(
    state_dir: str | Path, run_id: int, evaluated_round: int, outcome: RoundOutcome
) -> Path:
    """Atomically replace the site's kept evaluation with ``outcome`` (an error included: the
    evaluation message then answers with it)."""
    from mrprism_core.checkpoint import atomic_write_json  # torch: the writer's side only

    record = {"run_id": run_id, "round": evaluated_round, **outcome_record(outcome)}
    return atomic_write_json(Path(state_dir) / KEPT_EVALUATION_FILE, record)


def kept_evaluation(state_dir: str | Path, run_id: int, evaluated_round: int) -> RoundOutcome:
    """The evaluation of ``evaluated_round`` in run ``run_id`` kept by the next round's
    training message; an error outcome, saying why, when the site holds none for that round
    (that message failed or never reached the site, the file is damaged)."""
    path = Path(state_dir) / KEPT_EVALUATION_FILE
    missing = (
        f"no evaluation of round {evaluated_round} kept in {path}: the training message of "
        f"round {evaluated_round + 1}, which evaluates it, did not run here"
    )
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return RoundOutcome(error=missing)
    except (OSError, ValueError) as err:
        return RoundOutcome(error=f"{path} cannot be read: {err}")
    if record.get("run_id") != run_id or record.get("round") != evaluated_round:
        return RoundOutcome(error=f"{missing} (it holds round {record.get('round')})")
    try:
        kept = outcome_from_record(record)
    except (KeyError, TypeError, ValueError) as err:
        return RoundOutcome(error=f"{path} is not a kept evaluation: {err}")
    if kept.error is None and kept.reply is None:
        return RoundOutcome(error=f"{path} is not a kept evaluation: it holds no reply")
    return kept
