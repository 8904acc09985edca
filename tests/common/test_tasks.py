"""Task schemas: feature layout per (task, dataset) and lookup errors."""

from __future__ import annotations

import pytest

from medfed.common.tasks import (
    DATASETS,
    HEART_DISEASE_RISK,
    SYNTHETIC_REHAB,
    SYNTHETIC_RISK,
    TASKS,
    Column,
    get_task_spec,
)


def test_synthetic_risk_features() -> None:
    assert SYNTHETIC_RISK.feature_names() == [
        "age",
        "sex",
        "bmi",
        "family_history",
        "smoking",
        "systolic_bp",
    ]
    assert SYNTHETIC_RISK.num_features == 6
    assert SYNTHETIC_RISK.is_binary
    assert SYNTHETIC_RISK.target.name == "outcome"
    assert SYNTHETIC_RISK.required_columns()[0] == "patient_id"
    assert "outcome" in SYNTHETIC_RISK.required_columns()


def test_synthetic_rehab_features() -> None:
    assert SYNTHETIC_REHAB.feature_names() == ["age", "sex", "treatment_time", "severity"]
    assert SYNTHETIC_REHAB.num_features == 4
    assert not SYNTHETIC_REHAB.is_binary
    assert SYNTHETIC_REHAB.target.name == "progress"
    assert (SYNTHETIC_REHAB.target.low, SYNTHETIC_REHAB.target.high) == (0, 100)


def test_heart_disease_features_expand_categories_and_missing_indicators() -> None:
    names = HEART_DISEASE_RISK.feature_names()
    assert HEART_DISEASE_RISK.num_features == len(names) == 32
    assert names[:6] == ["age", "sex", "cp=1", "cp=2", "cp=3", "cp=4"]
    for nullable in ("trestbps", "chol", "fbs", "restecg", "thalach", "oldpeak", "ca", "thal"):
        assert f"{nullable}_missing" in names
    assert "age_missing" not in names and "cp_missing" not in names
    assert [n for n in names if n.startswith("thal=")] == ["thal=3", "thal=6", "thal=7"]
    assert HEART_DISEASE_RISK.id_column is None
    assert HEART_DISEASE_RISK.required_columns()[0] == "age"
    assert HEART_DISEASE_RISK.required_columns()[-1] == "num"
    assert HEART_DISEASE_RISK.positive_above == 0


def test_column_feature_names() -> None:
    assert Column("x", 0, 1).feature_names() == ["x"]
    assert Column("x", 0, 1, nullable=True).feature_names() == ["x", "x_missing"]
    cat = Column("c", 1, 2, kind="categorical", categories=(1, 2), nullable=True)
    assert cat.feature_names() == ["c=1", "c=2", "c_missing"]


@pytest.mark.parametrize(
    ("task", "dataset", "spec"),
    [
        ("risk", "synthetic", SYNTHETIC_RISK),
        ("rehab", "synthetic", SYNTHETIC_REHAB),
        ("risk", "heart-disease", HEART_DISEASE_RISK),
    ],
)
def test_get_task_spec_known(task: str, dataset: str, spec: object) -> None:
    assert get_task_spec(task, dataset) is spec
    assert task in TASKS and dataset in DATASETS


@pytest.mark.parametrize(
    ("task", "dataset"),
    [("rehab", "heart-disease"), ("survival", "synthetic"), ("risk", "mimic")],
)
def test_get_task_spec_unknown_names_both(task: str, dataset: str) -> None:
    with pytest.raises(ValueError) as info:
        get_task_spec(task, dataset)
    assert repr(task) in str(info.value)
    assert repr(dataset) in str(info.value)


def test_imaging_specs_give_the_model_input_shape():
    from medfed.common.tasks import SYNTHETIC_CT, SYNTHETIC_XRAY, ImagingSpec

    assert get_task_spec("xray", "synthetic") is SYNTHETIC_XRAY
    assert SYNTHETIC_XRAY.model_input == (1, 64, 64) and SYNTHETIC_XRAY.models == ("cnn2d",)
    assert SYNTHETIC_CT.model_input == (1, 16, 64, 64) and SYNTHETIC_CT.is_volume
    assert not isinstance(get_task_spec("risk", "synthetic"), ImagingSpec)
    with pytest.raises(ValueError, match="task='xray', dataset='heart-disease'"):
        get_task_spec("xray", "heart-disease")


def test_target_span_turns_scaled_targets_into_clinical_units():
    from medfed.common.tasks import SYNTHETIC_REHAB, SYNTHETIC_RISK, SYNTHETIC_XRAY

    assert SYNTHETIC_RISK.target_span == 1.0 and SYNTHETIC_XRAY.target_span == 1.0
    assert SYNTHETIC_REHAB.target_span == 100.0
