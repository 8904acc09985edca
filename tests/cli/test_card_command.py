"""`medfed card OUT`: rebuilds the model card from run.json; exit 2 on a bad record."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from typer.testing import CliRunner

from medfed.cli.main import app
from tests.server.run_records import realistic_record

runner = CliRunner()


@pytest.fixture
def run_dir(tmp_path):
    realistic_record(tmp_path, fairness=True).write(tmp_path)
    return tmp_path


def test_card_writes_both_files_and_prints_the_markdown(run_dir):
    result = runner.invoke(app, ["card", str(run_dir)])
    assert result.exit_code == 0, result.output
    markdown = (run_dir / "model_card.md").read_text()
    assert result.stdout == markdown
    assert markdown.startswith("# Model card: risk on heart-disease, run heart-run")
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["training_data"]["sites"][0]["site_id"] == "cleveland"
    assert "model card written" in result.stderr


def test_card_prints_json_on_request(run_dir):
    result = runner.invoke(app, ["card", str(run_dir), "--format", "json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)
    assert card["schema"] == "medfed-model-card/1"
    assert card["metrics"]["by_group"]["groups"]["sex=female"]["n"] == 31
    assert card == json.loads((run_dir / "model_card.json").read_text())


def test_card_rebuilds_a_card_for_an_older_run_without_fairness(tmp_path):
    data = asdict(realistic_record(tmp_path))
    data.pop("fairness", None)  # written before run records had per-group metrics
    (tmp_path / "run.json").write_text(json.dumps(data))
    result = runner.invoke(app, ["card", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["by_group"]["available"] is False


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no run record"),
        ("{not json", "cannot read the run record"),
        ("[1, 2]", "expected a JSON object"),
        ('{"run_id": "r"}', "missing field(s) settings"),
    ],
)
def test_a_missing_or_bad_run_json_exits_2_naming_the_file(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "run.json").write_text(content)
    result = runner.invoke(app, ["card", str(tmp_path)], terminal_width=400)
    assert result.exit_code == 2
    assert expected in result.stderr and str(tmp_path / "run.json") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "model_card.md").exists()
    assert not (tmp_path / "model_card.json").exists()


def test_card_is_listed_in_the_help():
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert "card" in result.stdout
    assert runner.invoke(app, ["card", "--help"]).exit_code == 0
