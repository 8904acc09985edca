"""Resuming a run after the coordinator was stopped or crashed (``resume = true``).

A restarted coordinator submits a new Flower run; with the same ``run-name`` it is the
same medfed run, so the sites read its noise from their ledgers and refuse any round of
it they already trained. :func:`resume_point` reads ``<out_dir>/run.json`` and decides
where the run continues:

- the record must be of the same run (run id) and every setting except ``num_rounds``
  and ``resume`` must be the one the run was started with; ``num_rounds`` may stay or
  shrink, never grow (the sites calibrated their noise over the planned rounds);
- the run continues after the last recorded round whose checkpoint file exists; that
  checkpoint must hash to the ``model_sha256`` run.json recorded for it, else the resume
  is refused (a replaced or tampered checkpoint);
- rounds recorded after it are dropped from ``rounds`` (kept in the resume entry) and run
  again by number; a round that was interrupted before it was recorded is simply run
  again. Sites that trained it decline it ("already in the ledger").

Nothing is written here: a refused resume leaves run.json as it was.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.common.config import RunSettings
from medfed.server.checkpoint import load_checkpoint
from medfed.server.run_record import RUN_RECORD_NAME, RunRecord, RunRecordError, read_run_record

#: Settings a resumed run may change (``num_rounds`` only downwards).
RESUMABLE_CHANGES = frozenset({"num_rounds", "resume"})


class ResumeError(ValueError):
    """The run cannot be resumed; the message says why."""


@dataclass
class ResumePoint:
    """Where a resumed run continues.

    ``record`` is the run's record with the rounds after ``after_round`` removed and the
    resumption appended to ``record.resumes``; ``weights`` is the global model after
    ``after_round`` (None when no round completed: start from the initial model).
    """

    record: RunRecord
    after_round: int
    weights: list[np.ndarray] | None
    dropped: list[int] = field(default_factory=list)


def settings_differences(recorded: dict[str, Any], current: RunSettings) -> list[str]:
    """Run-config keys (hyphenated) whose value differs from the recorded settings.

    A setting that medfed added after the run was recorded counts as recorded at its
    default: a run.json from an older medfed resumes when the new settings are left at
    their defaults, and is refused when one of them is set to something else.
    """
    now = current.model_dump()
    defaults = {
        name: info.get_default(call_default_factory=True)
        for name, info in RunSettings.model_fields.items()
        if not info.is_required()
    }
    missing = object()
    keys = (recorded.keys() | now.keys()) - RESUMABLE_CHANGES
    return sorted(
        k.replace("_", "-")
        for k in keys
        if recorded.get(k, defaults.get(k, missing)) != now.get(k, missing)
    )


def resume_point(
    out_dir: Path, settings: RunSettings, run_id: str, flower_run_id: int | str
) -> ResumePoint:
    """Read ``out_dir``/run.json and return where run ``run_id`` continues.

    Raises ResumeError naming the file, key or checkpoint when the run cannot be resumed.
    """
    path = out_dir / RUN_RECORD_NAME
    try:
        record = read_run_record(out_dir)
    except RunRecordError as exc:
        raise ResumeError(f"cannot resume run {run_id!r}: {exc}") from None
    if record.run_id != run_id:
        raise ResumeError(
            f"cannot resume run {run_id!r}: {path} records run {record.run_id!r} "
            "(run-name must be the one the run was started with)"
        )
    differing = settings_differences(record.settings, settings)
    if differing:
        detail = ", ".join(
            f"{k} (run {record.settings.get(k.replace('-', '_'))!r}, "
            f"now {settings.model_dump().get(k.replace('-', '_'))!r})"
            for k in differing
        )
        raise ResumeError(
            f"cannot resume run {run_id!r}: settings differ from those in {path}: {detail}"
        )
    planned = record.settings.get("num_rounds")
    if isinstance(planned, int) and settings.num_rounds > planned:
        raise ResumeError(
            f"cannot resume run {run_id!r} with num-rounds {settings.num_rounds}: it was "
            f"planned for {planned}, and the sites calibrated their noise over those "
            "rounds (start a new run-name for more rounds)"
        )
    numbers = [r.round for r in record.rounds]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ResumeError(f"cannot resume run {run_id!r}: {path} holds rounds {numbers}")

    after, weights = 0, None
    for rnd in reversed(record.rounds):
        checkpoint = out_dir / rnd.checkpoint if rnd.checkpoint else None
        if checkpoint is None or not checkpoint.is_file():
            continue
        try:
            weights, meta = load_checkpoint(checkpoint, expected_sha256=rnd.model_sha256)
        except ValueError as exc:
            raise ResumeError(
                f"cannot resume run {run_id!r} after round {rnd.round}: {exc}"
            ) from None
        if meta.get("round") != rnd.round:
            raise ResumeError(
                f"cannot resume run {run_id!r}: {checkpoint} holds round {meta.get('round')}, "
                f"run.json lists it for round {rnd.round}"
            )
        after = rnd.round
        break

    dropped = record.rounds[after:]
    record.rounds = record.rounds[:after]
    record.resumes.append(
        {
            "after_round": after,
            "flower_run_id": str(flower_run_id),
            "at": time.time(),
            "previous_status": record.status,
            "previous_error": record.error,
            "num_rounds": settings.num_rounds,
            "dropped_rounds": [asdict(r) for r in dropped],
        }
    )
    record.settings = settings.model_dump()
    record.status, record.error, record.finished = "running", "", None
    record.final_metrics = next(
        (r.aggregate_metrics for r in reversed(record.rounds) if r.aggregate_metrics), {}
    )
    recount_sites(record)
    return ResumePoint(record, after, weights, [r.round for r in dropped])


def recount_sites(record: RunRecord) -> None:
    """Recount each site's trained and declined rounds from the rounds kept in the record.

    A crash mid-round leaves counts for a round that the record does not hold; the
    budget figures (epsilon spent, noise) are the sites' own and stay as reported.
    """
    for site in record.sites.values():
        site.rounds_trained = site.rounds_declined = 0
    for rnd in record.rounds:
        for site_id in rnd.participants:
            record.site(site_id).rounds_trained += 1
        for site_id in rnd.declined:
            record.site(site_id).rounds_declined += 1
