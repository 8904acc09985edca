"""run.json (what happened in a run) and events.jsonl (progress, for live displays).

run.json is rewritten atomically after every round, so a reader never sees half of it
and a crash leaves the record of the last completed round.
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


@dataclass
class RunRecord:
    """Everything the coordinator records about a run."""

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

    def site(self, site_id: str) -> SiteSummary:
        return self.sites.setdefault(site_id, SiteSummary(site_id))

    def write(self, out_dir: Path) -> None:
        atomic_write_json(out_dir / RUN_RECORD_NAME, asdict(self))


def emit_event(out_dir: Path, kind: str, **data: Any) -> None:
    """Append one progress event (a JSON line) for live displays."""
    out_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "event": kind, **data}, default=str)
    with (out_dir / EVENTS_NAME).open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
