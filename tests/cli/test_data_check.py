"""`medfed data check`: what a site's imaging data gives to training, in a table and JSON."""

import json

from typer.testing import CliRunner

from medfed.cli.main import app
from medfed.simulations.synthetic_imaging import generate_imaging_sites

runner = CliRunner()


def _site(tmp_path, modality="xray"):
    (site,) = generate_imaging_sites(
        modality, 1, tmp_path, seed=2, patients_per_site=5, image_size=32, slices=4
    )
    return site


def test_check_prints_used_and_quarantined_and_writes_json(tmp_path):
    site = _site(tmp_path)
    first = sorted((site / "dicom").rglob("*.dcm"))[0]
    first.write_bytes(first.read_bytes()[:-100])
    (site / "dicom" / "notes.txt").write_text("not an image")
    result = runner.invoke(app, ["data", "check", str(site)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "samples used" in result.output and "truncated" in result.output
    report = json.loads((site / "data_check.json").read_text())
    assert report["samples_used"] == 4 and report["files_quarantined"] == 2
    assert report["quarantined_by_reason"] == {"not DICOM": 1, "truncated": 1}
    assert {q["file"] for q in report["quarantined"]} == {
        str(first.relative_to(site)),
        "dicom/notes.txt",
    }


def test_check_json_guesses_ct_and_reports_volumes(tmp_path):
    site = _site(tmp_path, "ct")
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["data", "check", str(site), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["task"] == "ct" and printed["samples_used"] == 5
    assert json.loads(out.read_text()) == printed


def test_check_fails_with_one_line_when_nothing_is_usable(tmp_path):
    site = _site(tmp_path)
    result = runner.invoke(app, ["data", "check", str(site), "--task", "ct"])
    assert result.exit_code == 1
    assert "no usable labelled image" in result.output
    assert "inconsistent series 5" in " ".join(result.output.split())
    missing = runner.invoke(app, ["data", "check", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "not a folder" in missing.output


def test_simulate_rejects_a_model_that_does_not_fit_the_task(tmp_path):
    result = runner.invoke(
        app, ["simulate", "--task", "xray", "--model", "logreg", "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "model 'logreg' does not fit task 'xray'" in " ".join(result.output.split())
