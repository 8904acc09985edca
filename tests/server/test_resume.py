"""Resuming a run after a coordinator restart: what run.json and the checkpoints allow.

The workflow tests drive :class:`MedfedWorkflow` itself with a grid that has no sites and
a round that only moves the global model and checkpoints it, so the resume path
(run.json, checkpoints, initial parameters, events) is the real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import pytest
from flwr.common import Context, RecordDict, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid

from medfed.common.config import ConfigError, RunSettings
from medfed.server.checkpoint import checkpoint_path, save_checkpoint
from medfed.server.resume import ResumeError, resume_point, settings_differences
from medfed.server.run_record import RoundRecord, RunRecord, read_run_record
from medfed.server.strategy import SiteSelectingFedAvg
from medfed.server.workflow import MedfedWorkflow

RUN = "trial-7"


def _settings(out: Path, **changes: object) -> RunSettings:
    values = {"num_rounds": 3, "run_name": RUN, "out_dir": str(out), "epsilon": 2.0}
    return RunSettings(**{**values, **changes})  # type: ignore[arg-type]


def _weights(value: float) -> list[np.ndarray]:
    return [np.full((1, 6), value, np.float32), np.array([value], np.float32)]


def _recorded_run(out: Path, rounds: int, settings: RunSettings | None = None) -> RunRecord:
    """A run.json with ``rounds`` completed rounds, each with its checkpoint."""
    settings = settings or _settings(out)
    record = RunRecord(run_id=RUN, settings=settings.model_dump(), secure_aggregation={})
    for r in range(1, rounds + 1):
        path, digest = save_checkpoint(out, r, _weights(float(r)), {"task": "risk"})
        record.rounds.append(
            RoundRecord(
                round=r,
                status="aggregated",
                participants=["h0", "h1"],
                declined={"h2": "budget"},
                checkpoint=str(path.relative_to(out)),
                model_sha256=digest,
                aggregate_metrics={"auc": 0.5 + r / 10},
            )
        )
        for site in ("h0", "h1"):
            record.site(site).rounds_trained += 1
        record.site("h2").rounds_declined += 1
    record.status, record.error = "failed", "RuntimeError: killed"
    record.write(out)
    return record


# -- settings ---------------------------------------------------------------------------


def test_run_name_is_the_medfed_run_id_and_is_validated() -> None:
    assert RunSettings().medfed_run_id(12345) == "12345"
    assert RunSettings(run_name="trial-7.b_2").medfed_run_id(12345) == "trial-7.b_2"
    settings = RunSettings.from_flower({"run-name": "R", "resume": True})
    assert (settings.run_name, settings.resume) == ("R", True)
    assert settings.to_flower()["run-name"] == "R"
    for bad in ("has space", "x" * 65, "a/b"):
        with pytest.raises(ConfigError, match="run-name"):
            RunSettings.from_flower({"run-name": bad})
    with pytest.raises(ConfigError, match="'resume' needs the run's 'run-name'"):
        RunSettings.from_flower({"resume": True})


def test_only_num_rounds_and_resume_may_change() -> None:
    recorded = RunSettings(run_name=RUN).model_dump()
    assert settings_differences(recorded, RunSettings(run_name=RUN, num_rounds=2)) == []
    assert settings_differences(recorded, RunSettings(run_name=RUN, resume=True)) == []
    changed = RunSettings(run_name=RUN, epsilon=9.0, seed=1)
    assert settings_differences(recorded, changed) == ["epsilon", "seed"]


def test_settings_added_since_the_run_count_at_their_default() -> None:
    """A run.json from before a setting existed resumes only with that setting at its default."""
    recorded = RunSettings(run_name=RUN).model_dump()
    del recorded["fairness_groups"], recorded["age_bands"]
    assert settings_differences(recorded, RunSettings(run_name=RUN)) == []
    changed = RunSettings(run_name=RUN, fairness_groups="sex")
    assert settings_differences(recorded, changed) == ["fairness-groups"]


# -- resume_point ------------------------------------------------------------------------


def test_resume_continues_after_the_last_round_with_its_checkpoint(tmp_path: Path) -> None:
    _recorded_run(tmp_path, 2)
    point = resume_point(tmp_path, _settings(tmp_path, resume=True), RUN, 99)
    assert point.after_round == 2 and point.dropped == []
    for a, b in zip(point.weights or [], _weights(2.0), strict=True):
        np.testing.assert_array_equal(a, b)
    record = point.record
    assert [r.round for r in record.rounds] == [1, 2]
    assert (record.status, record.error, record.finished) == ("running", "", None)
    assert record.settings["resume"] is True
    (resume,) = record.resumes
    assert resume["after_round"] == 2 and resume["flower_run_id"] == "99"
    assert resume["previous_status"] == "failed" and resume["dropped_rounds"] == []
    assert record.final_metrics == {"auc": pytest.approx(0.7)}


def test_settings_mismatch_names_the_keys_and_writes_nothing(tmp_path: Path) -> None:
    _recorded_run(tmp_path, 2)
    before = (tmp_path / "run.json").read_bytes()
    changed = _settings(tmp_path, resume=True, epsilon=5.0, batch_size=32)
    with pytest.raises(ResumeError, match=r"settings differ.*batch-size.*epsilon \(run 2.0"):
        resume_point(tmp_path, changed, RUN, 99)
    assert (tmp_path / "run.json").read_bytes() == before


def test_more_rounds_than_planned_are_refused(tmp_path: Path) -> None:
    _recorded_run(tmp_path, 2)
    with pytest.raises(ResumeError, match="planned for 3"):
        resume_point(tmp_path, _settings(tmp_path, resume=True, num_rounds=4), RUN, 99)
    fewer = resume_point(tmp_path, _settings(tmp_path, resume=True, num_rounds=2), RUN, 99)
    assert fewer.after_round == 2 and fewer.record.settings["num_rounds"] == 2


def test_another_runs_record_is_refused(tmp_path: Path) -> None:
    _recorded_run(tmp_path, 1)
    other = _settings(tmp_path, resume=True, run_name="other")
    with pytest.raises(ResumeError, match="records run 'trial-7'"):
        resume_point(tmp_path, other, "other", 99)


def test_missing_or_unreadable_record_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="no run record"):
        resume_point(tmp_path, _settings(tmp_path, resume=True), RUN, 99)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ResumeError, match="cannot read the run record"):
        resume_point(tmp_path, _settings(tmp_path, resume=True), RUN, 99)


def test_replaced_checkpoint_is_refused(tmp_path: Path) -> None:
    _recorded_run(tmp_path, 2)
    # Another model, saved properly (its own hash is consistent), under round 2's name.
    save_checkpoint(tmp_path, 2, _weights(7.0), {"task": "risk"})
    with pytest.raises(ResumeError, match=r"round-0002\.npz.*recorded for this round"):
        resume_point(tmp_path, _settings(tmp_path, resume=True), RUN, 99)


def test_tampered_checkpoint_arrays_are_refused(tmp_path: Path) -> None:
    _recorded_run(tmp_path, 2)
    path = checkpoint_path(tmp_path, 2)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["param_000"] = arrays["param_000"] + 1
    np.savez(path, **arrays)
    with pytest.raises(ResumeError, match="hash does not match its parameters"):
        resume_point(tmp_path, _settings(tmp_path, resume=True), RUN, 99)


def test_rounds_after_the_last_checkpoint_are_dropped(tmp_path: Path) -> None:
    _recorded_run(tmp_path, 3)
    checkpoint_path(tmp_path, 3).unlink()  # round 3 is recorded but its model is gone
    point = resume_point(tmp_path, _settings(tmp_path, resume=True), RUN, 99)
    assert point.after_round == 2 and point.dropped == [3]
    assert [r.round for r in point.record.rounds] == [1, 2]
    (resume,) = point.record.resumes
    assert [r["round"] for r in resume["dropped_rounds"]] == [3]  # kept, not lost
    sites = point.record.sites
    assert sites["h0"].rounds_trained == 2 and sites["h2"].rounds_declined == 2


def test_no_completed_round_starts_from_the_initial_model(tmp_path: Path) -> None:
    _recorded_run(tmp_path, 0)
    point = resume_point(tmp_path, _settings(tmp_path, resume=True), RUN, 99)
    assert (point.after_round, point.weights, point.record.rounds) == (0, None, [])


# -- the workflow -----------------------------------------------------------------------


@dataclass
class _Run:
    run_id: int


class _NoSites:
    """A grid without nodes: enough for the workflow's client-manager thread."""

    def __init__(self, run_id: int) -> None:
        self.run = _Run(run_id)

    def get_node_ids(self) -> list[int]:
        return []


class _Rounds(MedfedWorkflow):
    """Each round adds 1 to the global model and checkpoints it; no site is asked."""

    def __init__(self, settings: RunSettings, crash_in: int | None = None) -> None:
        super().__init__(settings, Path(settings.out_dir), 2, {"task": "risk"})
        self.crash_in = crash_in
        self.seen: dict[int, list[np.ndarray]] = {}  # round -> global model it started from

    def _wait_for_sites(self, context: LegacyContext) -> None:
        return None

    def _round(
        self, grid: Grid, context: LegacyContext, server_round: int, record: RunRecord
    ) -> RoundRecord:
        weights = parameters_to_ndarrays(self._global_parameters(context))
        self.seen[server_round] = weights
        if server_round == self.crash_in:
            raise RuntimeError(f"coordinator killed in round {server_round}")
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([w + 1 for w in weights]), keep_input=True
        )
        rnd = RoundRecord(round=server_round, status="aggregated")
        rnd.checkpoint, rnd.model_sha256 = self._checkpoint(context, server_round)
        return rnd


def _workflow_run(
    settings: RunSettings, flower_run_id: int, crash_in: int | None = None
) -> _Rounds:
    context = LegacyContext(
        context=Context(flower_run_id, 0, {}, RecordDict(), {}),
        config=ServerConfig(num_rounds=settings.num_rounds),
        strategy=SiteSelectingFedAvg(2, ndarrays_to_parameters(_weights(0.0))),
    )
    workflow = _Rounds(settings, crash_in)
    workflow(_NoSites(flower_run_id), context)  # type: ignore[arg-type]
    return workflow


def test_workflow_resumes_at_the_next_round_with_the_checkpointed_model(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    with pytest.raises(RuntimeError, match="killed in round 3"):
        _workflow_run(settings, 11, crash_in=3)
    failed = read_run_record(tmp_path)
    assert failed.status == "failed" and [r.round for r in failed.rounds] == [1, 2]
    assert (failed.run_id, failed.flower_run_id) == (RUN, "11")

    resumed = _workflow_run(_settings(tmp_path, resume=True), 12)
    assert sorted(resumed.seen) == [3]
    # Round 3 starts from round 2's checkpoint (the initial model plus two rounds).
    for a, b in zip(resumed.seen[3], _weights(2.0), strict=True):
        np.testing.assert_array_equal(a, b)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "completed" and record["error"] == ""
    assert [r["round"] for r in record["rounds"]] == [1, 2, 3]
    assert (record["run_id"], record["flower_run_id"]) == (RUN, "11")
    (resume,) = record["resumes"]
    assert resume["after_round"] == 2 and resume["flower_run_id"] == "12"
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("run-resume") == 1
    assert kinds.index("run-resume") > kinds.index("run-end")  # after the first run ended


def test_refused_resume_leaves_run_json_untouched(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _workflow_run(_settings(tmp_path), 11, crash_in=2)
    before = (tmp_path / "run.json").read_bytes()
    with pytest.raises(ResumeError, match="seed"):
        _workflow_run(_settings(tmp_path, resume=True, seed=3), 12)
    assert (tmp_path / "run.json").read_bytes() == before


def test_without_resume_a_run_starts_at_round_one(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _workflow_run(_settings(tmp_path), 11, crash_in=3)
    fresh = _workflow_run(_settings(tmp_path), 12)
    assert sorted(fresh.seen) == [1, 2, 3]
    record = read_run_record(tmp_path)
    assert record.resumes == [] and record.flower_run_id == "12"
