"""The model card: every section, figures equal to the run record, well-formed Markdown,
a JSON twin that round-trips, atomic writes, and fixed wording that matches the data."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict

import pytest

from medfed.common.tasks import HEART_DISEASE_RISK
from medfed.server import model_card
from medfed.server.model_card import (
    MODEL_CARD_JSON,
    MODEL_CARD_MD,
    build_model_card,
    render_model_card_markdown,
    write_model_card,
)
from medfed.server.model_card_text import HEART_DISEASE_PROVENANCE, task_text
from medfed.server.run_record import RunRecord, RunRecordError
from medfed.simulations import heart_disease
from tests.server.run_records import DECLINE, FINAL, SUPPRESSION, realistic_record

ONE = {"round": "one", "status": "aggregated"}
SECTIONS = {
    "model_details": "## Model details",
    "intended_use": "## Intended use",
    "training_data": "## Training data",
    "privacy": "## Privacy guarantees",
    "metrics": "## Metrics",
    "limitations": "## Known limitations",
}


def _tables(markdown: str) -> list[list[str]]:
    """Each block of consecutive lines starting with '|'."""
    blocks, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks + ([current] if current else [])


def _cells(line: str) -> int:
    """Cells of a table row: pipes that are not escaped, minus the outer two."""
    unescaped = line.replace("\\|", "")
    return unescaped.count("|") - 1


def _by_site(card: dict, site: str) -> dict:
    return next(s for s in card["metrics"]["by_site"] if s["site_id"] == site)


@pytest.mark.parametrize("fairness", [False, True])
def test_every_section_is_in_the_json_and_the_markdown(tmp_path, fairness):
    card = build_model_card(realistic_record(tmp_path, fairness), tmp_path)
    markdown = render_model_card_markdown(card)
    for key, heading in SECTIONS.items():
        assert card[key], key
        assert heading in markdown.splitlines(), heading
    assert "### Overall" in markdown and "### By site" in markdown and "### By group" in markdown


def test_model_details_name_the_final_checkpoint_and_its_hashes(tmp_path):
    record = realistic_record(tmp_path)
    details = build_model_card(record, tmp_path)["model_details"]
    ckpt = details["final_checkpoint"]
    assert ckpt["round"] == 2 and ckpt["path"] == record.rounds[-1].checkpoint
    assert ckpt["model_sha256"] == record.rounds[-1].model_sha256
    assert ckpt["file_sha256"] == hashlib.sha256((tmp_path / ckpt["path"]).read_bytes()).hexdigest()
    assert details["task"] == "risk" and details["dataset"] == "heart-disease"
    assert details["rounds_aggregated"] == 2 and details["rounds_planned"] == 2
    assert details["inputs"]["features"] == HEART_DISEASE_RISK.feature_names()
    assert details["started"] == "2027-01-15T08:00:00Z"
    assert details["medfed_version"]


def test_training_data_per_site_matches_the_record(tmp_path):
    record = realistic_record(tmp_path)
    sites = {s["site_id"]: s for s in build_model_card(record, tmp_path)["training_data"]["sites"]}
    assert sites["cleveland"] == {
        "site_id": "cleveland",
        "records_used": 303,
        "records_skipped": 0,
        "test_records": 103,
        "train_records": 200,
        "test_released": True,
    }
    assert sites["hungarian"]["records_skipped"] == 4
    assert sites["switzerland"]["test_records"] is None  # suppressed: unknown, not zero
    assert not sites["switzerland"]["test_released"]


def test_privacy_per_site_matches_the_record_and_says_what_is_not_covered(tmp_path):
    record = realistic_record(tmp_path)
    privacy = build_model_card(record, tmp_path)["privacy"]
    sites = {s["site_id"]: s for s in privacy["sites"]}
    for site_id, summary in record.sites.items():
        assert sites[site_id]["epsilon_spent"] == summary.epsilon_spent
        assert sites[site_id]["noise_multiplier"] == summary.noise_multiplier
        assert sites[site_id]["rounds_trained"] == summary.rounds_trained
        assert sites[site_id]["rounds_declined"] == summary.rounds_declined
    assert privacy["delta"] == record.settings["delta"]
    assert "one patient" in privacy["unit_of_privacy"]
    assert privacy["secure_aggregation"]["protocol"] == "medfed"
    assert "earlier runs" in sites["switzerland"]["note"]  # 2.4 spent in a run of epsilon 1
    assert "did not train" in sites["va"]["note"]
    not_covered = " ".join(privacy["not_covered"])
    for phrase in ("without DP noise", "Malicious sites", "non-cryptographic", "colluding"):
        assert phrase in not_covered


def test_metrics_overall_and_by_site_with_suppressed_and_declined_sites(tmp_path):
    card = build_model_card(realistic_record(tmp_path), tmp_path)
    metrics = card["metrics"]
    assert metrics["overall"] == FINAL and metrics["evaluated_round"] == 2
    cleveland = _by_site(card, "cleveland")
    assert cleveland["status"] == "released" and cleveland["n"] == 103
    assert cleveland["metrics"] == {"loss": 0.5, "accuracy": 0.8, "auc": 0.86}
    switzerland = _by_site(card, "switzerland")
    assert switzerland["status"] == "suppressed" and switzerland["reason"] == SUPPRESSION
    assert switzerland["metrics"] == {}
    limitations = " ".join(card["limitations"])
    assert f"Site va declined 2 round(s) (last reason: {DECLINE})" in limitations
    assert "contributed nothing" in limitations
    assert "switzerland" in limitations and "hungarian (27)" in limitations  # small test split
    assert "not DP-protected" in limitations


def test_without_fairness_the_card_says_group_metrics_are_unknown(tmp_path):
    card = build_model_card(realistic_record(tmp_path), tmp_path)
    assert card["metrics"]["by_group"]["available"] is False
    assert any("No per-group" in x for x in card["limitations"])
    assert "This run record holds no per-group metrics." in render_model_card_markdown(card)


def test_with_fairness_groups_gaps_and_suppressed_groups_are_shown(tmp_path):
    record = realistic_record(tmp_path, fairness=True)
    card = build_model_card(record, tmp_path)
    groups = card["metrics"]["by_group"]
    assert groups["available"] and groups["groups"] == record.fairness["groups"]
    assert groups["gaps"]["sex"]["sensitivity"] == 0.25
    assert groups["suppressed"] == {"hungarian": ["sex=female"]}
    markdown = render_model_card_markdown(card)
    assert "| sex=female | cleveland | 31 | 9 | 0.8100 |" in markdown
    assert "| sex | sensitivity | 0.2500 | sex=female |" in markdown
    assert "- hungarian: sex=female" in markdown
    limitations = " ".join(card["limitations"])
    assert "n-weighted mean of per-site AUCs" in limitations
    assert "hungarian: sex=female" in limitations
    assert "switzerland" in limitations and "No per-group" not in limitations


def test_a_dict_from_run_json_gives_the_same_card_as_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(model_card.time, "time", lambda: 1_800_000_500.0)
    record = realistic_record(tmp_path, fairness=True)
    record.write(tmp_path)
    data = json.loads((tmp_path / "run.json").read_text())
    assert build_model_card(data, tmp_path) == build_model_card(record, tmp_path)


@pytest.mark.parametrize("fairness", [False, True])
def test_markdown_tables_are_well_formed(tmp_path, fairness):
    markdown = render_model_card_markdown(
        build_model_card(realistic_record(tmp_path, fairness), tmp_path)
    )
    tables = _tables(markdown)
    assert len(tables) >= 5
    for rows in tables:
        assert len(rows) >= 2 and set(rows[1].replace("|", "").split()) == {"---"}
        widths = {_cells(row) for row in rows}
        assert len(widths) == 1, rows
    assert "minimum cohort \\| policy min 20" in markdown  # a pipe in a cell is escaped


def test_written_json_round_trips_and_the_markdown_is_its_rendering(tmp_path):
    md_path, json_path = write_model_card(tmp_path, realistic_record(tmp_path, fairness=True))
    assert (md_path.name, json_path.name) == (MODEL_CARD_MD, MODEL_CARD_JSON)
    card = json.loads(json_path.read_text())
    assert json.loads(json.dumps(card)) == card
    assert render_model_card_markdown(card) == md_path.read_text()


def test_a_failed_write_leaves_the_previous_card_whole(tmp_path, monkeypatch):
    write_model_card(tmp_path, realistic_record(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.glob("model_card.*")}

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("medfed.common.atomic.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(tmp_path, realistic_record(tmp_path, fairness=True))
    assert {p.name: p.read_bytes() for p in tmp_path.glob("model_card.*")} == before
    assert not list(tmp_path.glob(".model_card*"))  # no temporary file left behind


def test_a_failed_run_without_rounds_still_gets_a_card(tmp_path):
    record = RunRecord(
        run_id="r",
        settings={"task": "risk", "dataset": "synthetic", "epsilon": 3.0, "delta": 1e-5},
        secure_aggregation={"protocol": "off"},
        status="failed",
        error="TimeoutError: only 1 of 3 sites connected",
    )
    card = build_model_card(record, tmp_path)
    assert card["model_details"]["final_checkpoint"] is None
    assert card["metrics"]["by_site"] == [] and card["metrics"]["evaluated_round"] is None
    limitations = " ".join(card["limitations"])
    assert "did not complete (status failed: TimeoutError" in limitations
    assert "Secure aggregation was off" in limitations
    assert "fictional" in limitations
    markdown = render_model_card_markdown(card)
    assert "| Final checkpoint | none |" in markdown


def test_group_privacy_is_stated_when_a_patient_may_give_several_samples(tmp_path):
    record = realistic_record(tmp_path)
    record.settings["samples_per_patient"] = 3
    card = build_model_card(record, tmp_path)
    assert "group of 3 samples" in card["privacy"]["unit_of_privacy"]
    assert any("group of 3 samples" in x for x in card["limitations"])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([1, 2], "expected a JSON object"),
        ({"run_id": "r"}, "missing field(s) settings, secure_aggregation"),
        (
            {"run_id": "r", "settings": {}, "secure_aggregation": {}, "rounds": [ONE]},
            "wrong type",
        ),
        (
            {"run_id": "r", "settings": {}, "secure_aggregation": {}, "sites": {"a": {"x": 1}}},
            "not a medfed run",
        ),
    ],
)
def test_a_dict_that_is_not_a_run_record_is_refused_naming_the_file(tmp_path, data, expected):
    with pytest.raises(RunRecordError, match=r"run\.json: ") as info:
        build_model_card(data, tmp_path)
    assert expected in str(info.value)


def test_every_task_has_its_own_intended_use():
    for task, dataset in [
        ("risk", "heart-disease"),
        ("risk", "synthetic"),
        ("rehab", "synthetic"),
        ("xray", "synthetic"),
        ("ct", "synthetic"),
    ]:
        text = task_text(task, dataset)
        assert text.intended and text.out_of_scope and text.limitations
        assert any("medical device" in x for x in text.out_of_scope)
    assert "fictional" in " ".join(task_text("risk", "synthetic").intended)
    assert "Task 'other'" in task_text("other", "x").purpose


def test_heart_disease_wording_matches_the_shipped_data():
    """The fixed sentences about the UCI files state what the files hold."""
    assert "doi:10.24432/C52P4X" in heart_disease.ATTRIBUTION
    assert "doi:10.24432/C52P4X" in HEART_DISEASE_PROVENANCE
    for hospital, count in heart_disease.RECORD_COUNTS.items():
        assert f"({count}" in HEART_DISEASE_PROVENANCE, hospital
    rows = {
        h: list(csv.DictReader(heart_disease.shipped_file(h).open()))
        for h in heart_disease.HOSPITALS
    }
    women = {h: sum(r["sex"] == "0" for r in rs) for h, rs in rows.items()}
    negatives_swiss = sum(r["num"] == "0" for r in rows["switzerland"])
    limitations = " ".join(task_text("risk", "heart-disease").limitations)
    assert f"{sum(women.values())} of {sum(map(len, rows.values()))} patients" in limitations
    assert f"{women['switzerland']} of 123 in Switzerland" in limitations
    assert f"{women['va']} of 200 at the V.A." in limitations
    assert f"{negatives_swiss} patients without disease among 123" in limitations


def test_the_record_dataclass_and_its_json_give_the_same_dict(tmp_path):
    record = realistic_record(tmp_path)
    assert model_card._as_dict(asdict(record), "run.json") == asdict(record)


def test_a_final_round_without_evaluation_is_named(tmp_path):
    record = realistic_record(tmp_path)
    record.rounds[-1].site_metrics = {}
    card = build_model_card(record, tmp_path)
    assert card["metrics"]["evaluated_round"] == 1
    assert any(
        "after round 1" in x and "round 2) was not evaluated" in x for x in card["limitations"]
    )
    usual = build_model_card(realistic_record(tmp_path), tmp_path)["limitations"]
    assert not any("was not evaluated by the sites" in x for x in usual)
