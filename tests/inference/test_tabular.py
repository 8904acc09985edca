"""Tabular predictions: recomputed independently, validated as in training, mismatches."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medfed.common.tasks import HEART_DISEASE_RISK, SYNTHETIC_REHAB, SYNTHETIC_RISK
from medfed.inference.errors import ModelInputMismatch, PredictError
from medfed.inference.input_kind import check_input_kind
from medfed.inference.model_file import load_model
from medfed.inference.tabular import Z_95, predict_tabular
from medfed.server.checkpoint import save_checkpoint
from tests.inference.helpers import encode_by_hand, mlp_forward, sigmoid, write_run

PATIENTS = [
    {"patient_id": "A1", "age": 72, "sex": 1, "bmi": 33.5, "family_history": 1, "smoking": 1,
     "systolic_bp": 165, "treatment_time": 10, "severity": 8},
    {"patient_id": "A2", "age": 31, "sex": 0, "bmi": 21.0, "family_history": 0, "smoking": 0,
     "systolic_bp": 112, "treatment_time": 30, "severity": 2},
    {"patient_id": "A3", "age": 55, "sex": 1, "bmi": 27.0, "family_history": 0, "smoking": 1,
     "systolic_bp": 140, "treatment_time": 16, "severity": 5},
]  # fmt: skip


def write_patients(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_risk_probability_equals_the_model_recomputed(tmp_path, trained_run, model):
    loaded = load_model(trained_run("risk", model))
    report = predict_tabular(loaded, write_patients(tmp_path / "p.csv", PATIENTS))
    assert [p.id for p in report.predictions] == ["A1", "A2", "A3"]
    for raw, pred in zip(PATIENTS, report.predictions, strict=True):
        x = encode_by_hand(SYNTHETIC_RISK, raw)
        if model == "logreg":
            w, b = loaded.weights
            logit = float(np.asarray(w, float)[0] @ x + b[0])
        else:
            logit = mlp_forward(loaded.weights, x)
        assert pred.probability == pytest.approx(sigmoid(logit), abs=1e-5)
        assert pred.label == int(pred.probability >= 0.5)
    assert len({p.label for p in report.predictions}) == 2  # a trained model separates them


@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_rehab_value_in_points_with_interval_from_run_rmse(tmp_path, trained_run, model):
    run = trained_run("rehab", model)
    loaded = load_model(run)
    report = predict_tabular(loaded, write_patients(tmp_path / "p.csv", PATIENTS))
    rmse = loaded.metrics["pooled_rmse"]
    assert rmse == pytest.approx(loaded.metrics["rmse"])  # one site: the same figure
    assert 3 < rmse < 20  # points on the 0-100 scale (site evaluate's span), not scaled
    for raw, pred in zip(PATIENTS, report.predictions, strict=True):
        x = encode_by_hand(SYNTHETIC_REHAB, raw)
        if model == "logreg":
            w, b = loaded.weights
            scaled = float(np.asarray(w, float)[0] @ x + b[0])
        else:
            scaled = mlp_forward(loaded.weights, x)
        assert pred.value == pytest.approx(scaled * 100.0, abs=1e-3)
        low, high = pred.interval
        assert low == pytest.approx(pred.value - Z_95 * rmse)
        assert high == pytest.approx(pred.value + Z_95 * rmse)
    assert report.interval["rmse"] == rmse and "homoscedastic" in report.interval["assumption"]
    # Longer treatment, lower severity: more progress (the synthetic truth).
    assert report.predictions[1].value > report.predictions[0].value


def test_rehab_without_run_json_has_no_interval_and_says_why(tmp_path, trained_run):
    lone = tmp_path / "model.npz"
    shutil.copy(trained_run("rehab", "logreg") / "checkpoints" / "round-0001.npz", lone)
    report = predict_tabular(load_model(lone), write_patients(tmp_path / "p.csv", PATIENTS))
    assert all(p.interval is None for p in report.predictions)
    assert report.interval is None
    assert any("no prediction interval" in n for n in report.notes)
    assert report.to_dict()["predictions"][0]["interval"] is None


def test_target_and_id_columns_are_optional(tmp_path, trained_run):
    columns = ["age", "sex", "bmi", "family_history", "smoking", "systolic_bp"]
    path = write_patients(tmp_path / "p.csv", PATIENTS[:2], columns)
    report = predict_tabular(load_model(trained_run("risk", "logreg")), path)
    assert [p.id for p in report.predictions] == ["row-2", "row-3"]


def test_invalid_rows_are_all_named_with_line_and_column(tmp_path, trained_run):
    rows = [PATIENTS[0], {**PATIENTS[1], "age": 7}, PATIENTS[2], {**PATIENTS[0], "smoking": "x"}]
    rows[2] = {**rows[2], "patient_id": "A3"}
    rows[3] = {**rows[3], "patient_id": "A4"}
    path = write_patients(tmp_path / "p.csv", rows)
    loaded = load_model(trained_run("risk", "mlp"))
    with pytest.raises(PredictError) as info:
        predict_tabular(loaded, path)
    message = str(info.value)
    assert "2 invalid row(s)" in message
    assert "line 3, column 'age': value outside [18, 100]" in message
    assert "line 5, column 'smoking': expected a number" in message
    assert "\n" not in message
    report = predict_tabular(loaded, path, skip_invalid=True)
    assert [p.id for p in report.predictions] == ["A1", "A3"]
    assert [(s.line, s.column) for s in report.invalid_rows] == [(3, "age"), (5, "smoking")]


def test_duplicate_patient_and_missing_value_rules_are_training_rules(tmp_path, trained_run):
    rows = [PATIENTS[0], {**PATIENTS[1], "patient_id": "A1"}, {**PATIENTS[2], "bmi": ""}]
    path = write_patients(tmp_path / "p.csv", rows)
    with pytest.raises(PredictError) as info:
        predict_tabular(load_model(trained_run("risk", "logreg")), path)
    assert "line 3, column 'patient_id': duplicate patient id" in str(info.value)
    assert "line 4, column 'bmi': missing value" in str(info.value)


def test_csv_of_another_task_names_the_missing_columns(tmp_path, trained_run):
    rehab_only = ["patient_id", "age", "sex", "treatment_time", "severity"]
    path = write_patients(tmp_path / "rehab.csv", PATIENTS, rehab_only)
    with pytest.raises(ModelInputMismatch) as info:
        predict_tabular(load_model(trained_run("risk", "logreg")), path)
    message = str(info.value)
    assert "missing column(s) bmi, family_history, smoking, systolic_bp" in message
    assert "logreg for risk on synthetic" in message


def test_csv_of_another_dataset_is_a_mismatch(tmp_path, trained_run):
    uci = tmp_path / "uci.csv"
    names = [c.name for c in HEART_DISEASE_RISK.columns] + ["num"]
    uci.write_text(",".join(names) + "\n" + ",".join(["1"] * len(names)) + "\n")
    with pytest.raises(ModelInputMismatch, match=r"missing column.*bmi.*risk on synthetic"):
        predict_tabular(load_model(trained_run("risk", "mlp")), uci)


def test_checkpoint_features_that_differ_from_the_schema(tmp_path, site_data):
    shuffled = list(reversed(SYNTHETIC_RISK.feature_names()))
    path = write_run(tmp_path, site_data("risk"), "logreg", meta_override={"features": shuffled})
    with pytest.raises(ModelInputMismatch, match="features differ from the risk on synthetic"):
        predict_tabular(load_model(path), write_patients(tmp_path / "p.csv", PATIENTS))


def test_arrays_that_do_not_fit_the_model(tmp_path, trained_run):
    loaded = load_model(trained_run("risk", "logreg"))
    path, _ = save_checkpoint(tmp_path, 1, [np.zeros((1, 3), np.float32)], loaded.meta)
    with pytest.raises(PredictError, match="do not fit a logreg over 6 features"):
        predict_tabular(load_model(path), write_patients(tmp_path / "p.csv", PATIENTS))


def test_dicom_given_to_a_tabular_model(tmp_path, trained_run):
    loaded = load_model(trained_run("risk", "logreg"))
    dicom = tmp_path / "image"
    dicom.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    with pytest.raises(ModelInputMismatch, match=r"a DICOM file.*expects a CSV file"):
        check_input_kind(loaded, dicom)
    series = tmp_path / "series"
    series.mkdir()
    shutil.copy(dicom, series / "1.dcm")
    with pytest.raises(ModelInputMismatch, match="a folder of DICOM files"):
        check_input_kind(loaded, series)
    assert check_input_kind(loaded, write_patients(tmp_path / "p.csv", PATIENTS)) == "csv"


def test_csv_given_to_an_imaging_model(tmp_path):
    from medfed.common.config import RunSettings
    from medfed.common.models import build_model
    from medfed.common.params import get_weights
    from medfed.server.app import model_meta

    settings = RunSettings(task="xray", model="cnn2d")
    net = build_model("cnn2d", (1, 64, 64), 0)
    path, _ = save_checkpoint(tmp_path, 1, get_weights(net), model_meta(settings))
    loaded = load_model(path)
    with pytest.raises(ModelInputMismatch, match=r"a CSV file.*imaging model.*expects a DICOM"):
        check_input_kind(loaded, write_patients(tmp_path / "p.csv", PATIENTS))
