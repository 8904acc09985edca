import json

from medfed.server.run_record import RoundRecord, RunRecord, emit_event


def test_run_json_is_rewritten_whole(tmp_path):
    record = RunRecord(run_id="7", settings={"epsilon": 1.0}, secure_aggregation={})
    record.rounds.append(RoundRecord(round=1, status="aggregated", participants=["a"]))
    record.site("a").epsilon_spent = 0.4
    record.write(tmp_path)
    record.rounds.append(RoundRecord(round=2, status="skipped", declined={"b": "budget"}))
    record.write(tmp_path)
    data = json.loads((tmp_path / "run.json").read_text())
    assert [r["status"] for r in data["rounds"]] == ["aggregated", "skipped"]
    assert data["rounds"][1]["declined"] == {"b": "budget"}
    assert data["sites"]["a"]["epsilon_spent"] == 0.4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_events_are_json_lines(tmp_path):
    emit_event(tmp_path, "round-start", round=1)
    emit_event(tmp_path, "round-end", round=1, status="aggregated")
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["round-start", "round-end"]
