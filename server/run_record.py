"""run.json (what happened in a run) and events.jsonl (progress, for live displays).

run.json is rewritten atomically after every round, so a reader never sees half of it
and a crash leaves the record of the last completed round; a restarted coordinator
reads it back (:func:`read_run_record`) to resume the run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medfed.common.atomic import atomic_write_json

RUN_RECORD_NAME = "run.json"
EVENTS_NAME = "events.jsonl"


@dataclass
class RoundRecord:
    """One federated round as the coordinator saw it."""

    round: int
    status: str  # "aggregated", "skipped" or "aborted"
    participants: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    no_reply: list[str] = field(default_factory=list)
    aggregate_metrics: dict[str, Any] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint: str = ""
    model_sha256: str = ""
    seconds: float = 0.0
    note: str = ""
    secure_aggregation: dict[str, Any] = field(default_factory=dict)


@dataclass
class SiteSummary:
    """A site's budget position at the end of the run (as the site reported it)."""

    site_id: str
    epsilon_spent: float = 0.0
    epsilon_budget: float = 0.0
    noise_multiplier: float = 0.0
    records_used: int = 0
    records_skipped: int = 0
    rounds_trained: int = 0
    rounds_declined: int = 0


class RunRecordError(ValueError):
    """run.json is missing, unreadable or not a medfed run record."""


@dataclass
class RunRecord:
    """Everything the coordinator records about a run.

    ``run_id`` is the medfed run id (the run name, else the Flower run id; the sites'
    ledgers use the same), ``flower_run_id`` the Flower run that started it, and
    ``resumes`` one entry per coordinator restart that continued the run (the round it
    continued after, the new Flower run id, the time, and any rounds it dropped).
    ``fairness`` is the per-subgroup evaluation of the latest round that evaluated
    (:func:`medfed.server.fairness.combine`); empty when fairness evaluation is off.
    """

    run_id: str
    settings: dict[str, Any]
    secure_aggregation: dict[str, Any]
    started: float = field(default_factory=time.time)
    finished: float | None = None
    status: str = "running"
    rounds: list[RoundRecord] = field(default_factory=list)
    sites: dict[str, SiteSummary] = field(default_factory=dict)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    flower_run_id: str = ""
    resumes: list[dict[str, Any]] = field(default_factory=list)
    fairness: dict[str, Any] = field(default_factory=dict)

    def site(self, site_id: str) -> SiteSummary:
        return self.sites.setdefault(site_id, SiteSummary(site_id))

    def write(self, out_dir: Path) -> None:
        atomic_write_json(out_dir / RUN_RECORD_NAME, asdict(self))

    @classmethod
    def from_dict(cls, data: Any, where: str = RUN_RECORD_NAME) -> RunRecord:
        """Rebuild a record written by :meth:`write`; RunRecordError names ``where``."""
        if not isinstance(data, dict):
            raise RunRecordError(f"{where}: expected a JSON object")
        try:
            rounds = [RoundRecord(**r) for r in data.get("rounds", [])]
            sites = {k: SiteSummary(**v) for k, v in data.get("sites", {}).items()}
            rest = {k: v for k, v in data.items() if k not in ("rounds", "sites")}
            record = cls(**rest, rounds=rounds, sites=sites)
        except (TypeError, AttributeError) as exc:
            raise RunRecordError(f"{where}: not a medfed run record ({exc})") from None
        if not isinstance(record.settings, dict) or not all(
            isinstance(r.round, int) and not isinstance(r.round, bool) for r in record.rounds
        ):
            raise RunRecordError(f"{where}: 'settings' or a round number has the wrong type")
        return record


def read_run_record(out_dir: Path) -> RunRecord:
    """Read ``out_dir``/run.json; RunRecordError names the file and what is wrong."""
    path = out_dir / RUN_RECORD_NAME
    if not path.is_file():
        raise RunRecordError(f"{path}: no run record")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunRecordError(f"{path}: cannot read the run record ({exc})") from None
    return RunRecord.from_dict(data, str(path))


def emit_event(out_dir: Path, kind: str, **data: Any) -> None:
    """Append one progress event (a JSON line) for live displays."""
    out_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "event": kind, **data}, default=str)
    with (out_dir / EVENTS_NAME).open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
