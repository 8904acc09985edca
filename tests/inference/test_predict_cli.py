"""`medfed predict` and `medfed explain` through the CLI: JSON output, tables, exit codes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli.main import app
from tests.inference.test_tabular import PATIENTS, write_patients

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def test_predict_json_for_systems(tmp_path, trained_run):
    run = trained_run("risk", "mlp")
    csv = write_patients(tmp_path / "p.csv", PATIENTS)
    result = runner.invoke(app, ["predict", str(run), str(csv), "--format", "json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= {"model", "task", "predictions", "invalid_rows", "notes"}
    assert payload["task"] == "risk" and len(payload["model"]["sha256"]) == 64
    assert [p["id"] for p in payload["predictions"]] == ["A1", "A2", "A3"]
    assert all(0 <= p["probability"] <= 1 and p["label"] in (0, 1) for p in payload["predictions"])


def test_predict_rehab_explain_json_has_interval_and_contributions(tmp_path, trained_run):
    run = trained_run("rehab", "logreg")
    csv = write_patients(tmp_path / "p.csv", PATIENTS)
    result = runner.invoke(app, ["predict", str(run), str(csv), "--format", "json", "--explain"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    first = payload["predictions"][0]
    low, high = first["interval"]
    assert low < first["value"] < high
    assert set(first["explanation"]["contributions"]) == {
        "age", "sex", "treatment_time", "severity"
    }  # fmt: skip
    assert payload["interval"]["level"] == 0.95


def test_predict_table_for_people(tmp_path, trained_run):
    csv = write_patients(tmp_path / "p.csv", PATIENTS)
    run = trained_run("risk", "logreg")
    result = runner.invoke(app, ["predict", str(run), str(csv), "--explain"])
    assert result.exit_code == 0, result.output
    assert "probability" in result.stdout and "A2" in result.stdout
    assert "A1: contributions" in result.stdout and "baseline output" in result.stdout


def test_invalid_rows_exit_2_with_one_line_naming_them(tmp_path, trained_run):
    csv = write_patients(tmp_path / "p.csv", [PATIENTS[0], {**PATIENTS[1], "age": 150}])
    run = trained_run("risk", "logreg")
    result = runner.invoke(app, ["predict", str(run), str(csv)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "line 3, column 'age'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    skipped = runner.invoke(
        app, ["predict", str(run), str(csv), "--skip-invalid", "--format", "json"]
    )
    assert skipped.exit_code == 0
    payload = json.loads(skipped.stdout)
    assert [p["id"] for p in payload["predictions"]] == ["A1"]
    assert payload["invalid_rows"][0]["line"] == 3


def test_mismatch_and_bad_model_exit_2(tmp_path, trained_run):
    run = trained_run("risk", "logreg")
    rehab = write_patients(tmp_path / "r.csv", PATIENTS, ["age", "treatment_time", "severity"])
    dicom = tmp_path / "image.dcm"
    dicom.write_bytes(b"\0" * 128 + b"DICM")
    junk = tmp_path / "junk.npz"
    junk.write_text("not a model")
    csv = write_patients(tmp_path / "p.csv", PATIENTS)
    for args, expected in (
        ([str(run), str(rehab)], "missing column(s) sex, bmi"),
        ([str(run), str(dicom)], "a DICOM file"),
        ([str(junk), str(csv)], "not a medfed checkpoint"),
        ([str(run), str(csv), "--saliency-dir", str(tmp_path)], "for imaging models"),
    ):
        result = runner.invoke(app, ["predict", *args])
        assert result.exit_code == 2, result.output
        assert expected in result.stderr


def test_explain_at_the_site_json_and_written_file(trained_run, synthetic_site):
    run = trained_run("risk", "logreg")
    result = runner.invoke(
        app,
        ["explain", str(run), "--site", str(synthetic_site), "--format", "json", "--repeats", "3"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert Path(payload["written"]).is_file()
    assert payload["site_id"] == "hospital-a" and payload["score"] == "auc"
    assert {c["column"] for c in payload["permutation"]} == {
        "age", "sex", "bmi", "family_history", "smoking", "systolic_bp"
    }  # fmt: skip
    table = runner.invoke(app, ["explain", str(run), "--site", str(synthetic_site)])
    assert table.exit_code == 0 and "permutation importance" in table.stdout


def test_explain_refusal_exits_2(tmp_path, trained_run, synthetic_site):
    run = trained_run("risk", "mlp")
    result = runner.invoke(app, ["explain", str(run), "--site", str(tmp_path)])
    assert result.exit_code == 2
    assert "site policy not found" in result.stderr


def test_cli_start_up_imports_no_heavy_module():
    code = (
        "import sys, medfed.cli.main\n"
        "print([m for m in ('torch', 'pandas', 'pydicom', 'sklearn') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(
    importlib.util.find_spec("medfed.inference.imaging") is None,
    reason="imaging prediction module not present",
)
def test_predict_imaging_on_a_generated_dicom(tmp_path):
    from medfed.common.config import RunSettings
    from medfed.common.models import build_model
    from medfed.common.params import get_weights
    from medfed.server.app import model_meta
    from medfed.server.checkpoint import save_checkpoint
    from medfed.simulations.synthetic_imaging import generate_imaging_sites

    [site] = generate_imaging_sites("xray", 1, tmp_path / "sites", patients_per_site=2)
    settings = RunSettings(task="xray", model="cnn2d")
    weights = get_weights(build_model("cnn2d", (1, 64, 64), 0))
    checkpoint, digest = save_checkpoint(tmp_path / "run", 1, weights, model_meta(settings))
    image = sorted((site / "dicom").rglob("*.dcm"))[0]
    saliency = tmp_path / "saliency"
    result = runner.invoke(
        app,
        [
            "predict",
            str(checkpoint),
            str(image),
            "--format",
            "json",
            "--saliency-dir",
            str(saliency),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["model"]["sha256"] == digest and payload["task"] == "xray"
    [prediction] = payload["predictions"]
    assert 0 <= prediction["probability"] <= 1
    assert Path(prediction["saliency_png"]).is_file()
    wrong = runner.invoke(app, ["predict", str(checkpoint), str(site / "labels.csv")])
    assert wrong.exit_code == 2 and "expects a DICOM" in wrong.stderr
