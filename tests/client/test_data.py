"""Site CSV loading: validation, skipped rows, encoding, split and fingerprint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medfed.client.data import (
    DataError,
    decode_target,
    fingerprint,
    load_site_data,
    split_train_test,
)
from medfed.common.tasks import HEART_DISEASE_RISK, SYNTHETIC_REHAB, SYNTHETIC_RISK

from .conftest import GOOD_ROW, HEADER, csv_text, row

SWITZERLAND = (
    Path(__file__).resolve().parents[2] / "simulations" / "data" / "uci-heart-disease"
) / "switzerland.csv"

WriteCsv = Callable[..., Path]


def _balanced_rows(n: int, positive_every: int = 3) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    return [
        row(
            f"P{i:04d}",
            age=int(rng.integers(18, 101)),
            sex=int(rng.integers(0, 2)),
            bmi=f"{rng.uniform(12, 70):.1f}",
            systolic_bp=int(rng.integers(70, 251)),
            outcome=int(i % positive_every == 0),
            progress=f"{rng.uniform(0, 100):.1f}",
        )
        for i in range(n)
    ]


# -- valid files -------------------------------------------------------------------------


def test_valid_file_loads_with_scaled_features(write_csv: WriteCsv) -> None:
    path = write_csv(
        [
            row("P1", age=18, bmi="12.0", systolic_bp=70, outcome=0),
            row("P2", age=100, bmi="70.0", systolic_bp=250, sex=0),
            row("P3"),
        ]
    )
    data = load_site_data(path, SYNTHETIC_RISK)
    assert len(data) == 3
    assert data.total_rows == 3
    assert data.skipped == []
    assert data.ids == ["P1", "P2", "P3"]
    assert data.X.shape == (3, SYNTHETIC_RISK.num_features)
    assert data.X.dtype == np.float32
    assert np.all(data.X >= -1) and np.all(data.X <= 1)
    # age, sex, bmi, family_history, smoking, systolic_bp
    np.testing.assert_allclose(data.X[0], [-1, 1, -1, 0, 1, -1], atol=1e-6)
    np.testing.assert_allclose(data.X[1], [1, 0, 1, 0, 1, 1], atol=1e-6)
    # age 59 is the middle of [18, 100]; bmi 41 the middle of [12, 70]; sbp 160 of [70, 250].
    np.testing.assert_allclose(data.X[2], [0, 1, 0, 0, 1, 0], atol=1e-6)
    np.testing.assert_array_equal(data.y, [0, 1, 1])


def test_whitespace_around_cells_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    text = csv_text([row("P1"), row("P2")]).replace(",", ", ")
    path.write_text(text)
    data = load_site_data(path, SYNTHETIC_RISK)
    assert data.ids == ["P1", "P2"]


def test_column_order_does_not_matter(write_csv: WriteCsv) -> None:
    reordered = tuple(reversed(HEADER))
    a = load_site_data(write_csv([row("P1"), row("P2", age=30)]), SYNTHETIC_RISK)
    b = load_site_data(
        write_csv([row("P1"), row("P2", age=30)], name="r.csv", header=reordered), SYNTHETIC_RISK
    )
    np.testing.assert_array_equal(a.X, b.X)


# -- file-level errors -------------------------------------------------------------------


def test_missing_column_names_file_and_column(write_csv: WriteCsv) -> None:
    header = tuple(c for c in HEADER if c != "bmi")
    path = write_csv([row("P1")], header=header)
    with pytest.raises(DataError) as info:
        load_site_data(path, SYNTHETIC_RISK)
    assert str(path) in str(info.value)
    assert "bmi" in str(info.value)


def test_missing_id_column(write_csv: WriteCsv) -> None:
    path = write_csv([row("P1")], header=HEADER[1:])
    with pytest.raises(DataError, match="patient_id"):
        load_site_data(path, SYNTHETIC_RISK)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError, match="not found") as info:
        load_site_data(path, SYNTHETIC_RISK)
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        load_site_data(tmp_path, SYNTHETIC_RISK)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError) as info:
        load_site_data(path, SYNTHETIC_RISK)
    assert str(path) in str(info.value)


def test_header_only_file(write_csv: WriteCsv) -> None:
    path = write_csv([])
    with pytest.raises(DataError, match="no valid rows"):
        load_site_data(path, SYNTHETIC_RISK)


def test_binary_garbage_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "garbage.csv"
    path.write_bytes(b"\xff\xfe\xfa\x00\x81" * 50)
    with pytest.raises(DataError) as info:
        load_site_data(path, SYNTHETIC_RISK)
    assert str(path) in str(info.value)


def test_malformed_csv_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(csv_text([row("P1")]) + "P2,1,2,3,4,5,6,7,8,9,10,11,12,13,14\n")
    with pytest.raises(DataError, match="readable"):
        load_site_data(path, SYNTHETIC_RISK)


# -- row-level skips ---------------------------------------------------------------------


def _only_skip(data, line: int, column: str) -> str:  # type: ignore[no-untyped-def]
    assert len(data.skipped) == 1, data.skipped
    skip = data.skipped[0]
    assert (skip.line, skip.column) == (line, column)
    assert f"line {line}" in str(skip) and column in str(skip)
    return skip.reason


@pytest.mark.parametrize("empty", ["", "NaN", "nan", "NA"])
def test_missing_value_is_skipped_with_line(write_csv: WriteCsv, empty: str) -> None:
    path = write_csv([row("P1"), row("P2"), row("P3", bmi=empty), row("P4")])
    data = load_site_data(path, SYNTHETIC_RISK)
    assert data.ids == ["P1", "P2", "P4"]
    assert data.total_rows == 4
    # header is line 1, P1 line 2, P2 line 3, P3 line 4
    assert "missing" in _only_skip(data, 4, "bmi")


def test_non_numeric_is_skipped(write_csv: WriteCsv) -> None:
    path = write_csv([row("P1", systolic_bp="high"), row("P2")])
    data = load_site_data(path, SYNTHETIC_RISK)
    assert data.ids == ["P2"]
    assert "expected a number" in _only_skip(data, 2, "systolic_bp")


def test_infinite_value_is_skipped(write_csv: WriteCsv) -> None:
    data = load_site_data(write_csv([row("P1"), row("P2", bmi="inf")]), SYNTHETIC_RISK)
    assert "finite" in _only_skip(data, 3, "bmi")


@pytest.mark.parametrize(("column", "value"), [("age", 150), ("age", 5), ("bmi", "80.5")])
def test_out_of_range_is_skipped(write_csv: WriteCsv, column: str, value: object) -> None:
    path = write_csv([row("P1"), row("P2", **{column: value}), row("P3")])
    data = load_site_data(path, SYNTHETIC_RISK)
    assert data.ids == ["P1", "P3"]
    reason = _only_skip(data, 3, column)
    assert "outside" in reason and str(value) in reason  # the site-local report keeps it
    assert str(value) not in data.skipped[0].public()


@pytest.mark.parametrize(("column", "value"), [("sex", 2), ("smoking", "0.5"), ("outcome", 3)])
def test_binary_not_01_is_skipped(write_csv: WriteCsv, column: str, value: object) -> None:
    data = load_site_data(write_csv([row("P1"), row("P2", **{column: value})]), SYNTHETIC_RISK)
    assert data.ids == ["P1"]
    assert "0 or 1" in _only_skip(data, 3, column)


def test_binary_as_float_is_accepted(write_csv: WriteCsv) -> None:
    data = load_site_data(write_csv([row("P1", sex="1.0", outcome="0.0")]), SYNTHETIC_RISK)
    assert data.X[0, 1] == 1.0 and data.y[0] == 0.0


def test_duplicate_patient_id_is_skipped(write_csv: WriteCsv) -> None:
    path = write_csv([row("P1"), row("P2"), row("P1", age=30)])
    data = load_site_data(path, SYNTHETIC_RISK)
    assert data.ids == ["P1", "P2"]
    assert "duplicate" in _only_skip(data, 4, "patient_id")
    # The first record of the patient is the one kept.
    assert data.X[0, 0] == pytest.approx(0.0)


def test_empty_patient_id_is_skipped(write_csv: WriteCsv) -> None:
    data = load_site_data(write_csv([row("P1"), row("")]), SYNTHETIC_RISK)
    assert data.ids == ["P1"]
    _only_skip(data, 3, "patient_id")


def test_many_bad_rows_are_all_counted(write_csv: WriteCsv) -> None:
    path = write_csv(
        [row("P1"), row("P2", age=150), row("P3"), row("P4", sex=7), row("P1"), row("P5")]
    )
    data = load_site_data(path, SYNTHETIC_RISK)
    assert data.ids == ["P1", "P3", "P5"]
    assert [(s.line, s.column) for s in data.skipped] == [
        (3, "age"),
        (5, "sex"),
        (6, "patient_id"),
    ]
    assert data.total_rows == 6


def test_patient_whose_first_record_was_bad_keeps_a_valid_one(write_csv: WriteCsv) -> None:
    data = load_site_data(write_csv([row("P1", age=150), row("P1")]), SYNTHETIC_RISK)
    assert data.ids == ["P1"]
    assert [(s.line, s.column) for s in data.skipped] == [(2, "age")]


def test_unused_columns_are_not_validated(write_csv: WriteCsv) -> None:
    """A bad rehab column does not cost a risk row (only the task's columns count)."""
    data = load_site_data(write_csv([row("P1", progress="oops")]), SYNTHETIC_RISK)
    assert data.ids == ["P1"] and data.skipped == []


def test_strict_raises_naming_line_and_column(write_csv: WriteCsv) -> None:
    path = write_csv([row("P1"), row("P2"), row("P3", age=150)])
    with pytest.raises(DataError) as info:
        load_site_data(path, SYNTHETIC_RISK, strict=True)
    msg = str(info.value)
    assert str(path) in msg
    assert "line 4" in msg
    assert "age" in msg
    assert "150" not in msg  # the error can reach the coordinator: no patient value


def test_strict_accepts_clean_file(write_csv: WriteCsv) -> None:
    data = load_site_data(write_csv([row("P1"), row("P2")]), SYNTHETIC_RISK, strict=True)
    assert len(data) == 2


def test_all_rows_bad(write_csv: WriteCsv) -> None:
    path = write_csv([row("P1", age=150), row("P2", sex=3)])
    with pytest.raises(DataError) as info:
        load_site_data(path, SYNTHETIC_RISK)
    msg = str(info.value)
    assert str(path) in msg and "no valid rows" in msg and "2 skipped" in msg
    assert "150" not in msg


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    lines = csv_text([row("P1"), row("P2", age=150)]).splitlines()
    # header (1), P1 (2), blank (3), P2 (4)
    path.write_text("\n".join([lines[0], lines[1], "", lines[2]]) + "\n")
    data = load_site_data(path, SYNTHETIC_RISK)
    assert [(s.line, s.column) for s in data.skipped] == [(4, "age")]


# -- UCI heart disease -------------------------------------------------------------------


def test_switzerland_loads_every_row() -> None:
    data = load_site_data(SWITZERLAND, HEART_DISEASE_RISK)
    raw = pd.read_csv(SWITZERLAND, na_values=["?"])
    assert len(raw) == 123
    assert len(data) == 123
    assert data.skipped == []
    assert data.X.shape == (123, HEART_DISEASE_RISK.num_features)
    np.testing.assert_array_equal(data.y, (raw["num"] > 0).astype(np.float32))
    assert np.all(data.X >= -1) and np.all(data.X <= 1)


def test_switzerland_missing_values_become_indicators() -> None:
    data = load_site_data(SWITZERLAND, HEART_DISEASE_RISK)
    raw = pd.read_csv(SWITZERLAND, na_values=["?"])
    names = HEART_DISEASE_RISK.feature_names()
    col = {n: data.X[:, i] for i, n in enumerate(names)}
    # chol == 0 means "not measured": filled and flagged.
    chol_missing = raw["chol"].isna() | (raw["chol"] == 0)
    assert chol_missing.any()
    np.testing.assert_array_equal(col["chol_missing"], chol_missing.astype(np.float32))
    fill = 2 * (220 - 80) / (700 - 80) - 1
    np.testing.assert_allclose(col["chol"][chol_missing.to_numpy()], fill, atol=1e-6)
    for name in ("trestbps", "fbs", "thalach", "exang", "oldpeak", "ca"):
        missing = raw[name].isna()
        if name == "trestbps":
            missing |= raw[name] == 0
        np.testing.assert_array_equal(col[f"{name}_missing"], missing.astype(np.float32))
    # A missing categorical has no category set and its indicator on.
    thal_missing = raw["thal"].isna().to_numpy()
    assert thal_missing.any()
    onehot = np.stack([col["thal=3"], col["thal=6"], col["thal=7"]], axis=1)
    assert np.all(onehot[thal_missing] == 0)
    assert np.all(col["thal_missing"][thal_missing] == 1)
    np.testing.assert_array_equal(onehot[~thal_missing].sum(axis=1), 1)
    # Every row is its own patient.
    assert len(set(data.ids)) == 123


def test_heart_disease_labels_are_num_above_zero(write_csv: WriteCsv) -> None:
    header = tuple(HEART_DISEASE_RISK.required_columns())
    base = {
        "age": "50",
        "sex": "1",
        "cp": "4",
        "trestbps": "130",
        "chol": "0",
        "fbs": "",
        "restecg": "0",
        "thalach": "150",
        "exang": "0",
        "oldpeak": "1.0",
        "slope": "2",
        "ca": "?",
        "thal": "",
    }
    rows = [{**base, "num": str(k)} for k in range(5)]
    data = load_site_data(write_csv(rows, header=header), HEART_DISEASE_RISK)
    np.testing.assert_array_equal(data.y, [0, 1, 1, 1, 1])


# -- split and fingerprint ---------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete(write_csv: WriteCsv) -> None:
    data = load_site_data(write_csv(_balanced_rows(120)), SYNTHETIC_RISK)
    train, test = split_train_test(data, 0.25, seed=3)
    again_train, again_test = split_train_test(data, 0.25, seed=3)
    assert train.ids == again_train.ids and test.ids == again_test.ids
    assert set(train.ids).isdisjoint(test.ids)
    assert sorted(train.ids + test.ids) == sorted(data.ids)
    assert len(test) == 30
    other_train, _ = split_train_test(data, 0.25, seed=4)
    assert other_train.ids != train.ids
    # Features travel with their ids.
    index = {pid: i for i, pid in enumerate(data.ids)}
    for j, pid in enumerate(test.ids):
        np.testing.assert_array_equal(test.X[j], data.X[index[pid]])
        assert test.y[j] == data.y[index[pid]]


def test_split_is_stratified(write_csv: WriteCsv) -> None:
    data = load_site_data(write_csv(_balanced_rows(120, positive_every=4)), SYNTHETIC_RISK)
    assert data.y.sum() == 30
    for seed in range(3):
        train, test = split_train_test(data, 0.25, seed=seed)
        assert test.y.sum() == pytest.approx(30 * 0.25, abs=1)
        assert train.y.sum() + test.y.sum() == 30


def test_split_independent_of_row_order(write_csv: WriteCsv) -> None:
    rows = _balanced_rows(60)
    a = load_site_data(write_csv(rows), SYNTHETIC_RISK)
    b = load_site_data(write_csv(rows[::-1], name="rev.csv"), SYNTHETIC_RISK)
    assert sorted(split_train_test(a, 0.25, 1)[0].ids) == sorted(
        split_train_test(b, 0.25, 1)[0].ids
    )


def test_fingerprint_independent_of_row_order(write_csv: WriteCsv) -> None:
    rows = _balanced_rows(40)
    a = load_site_data(write_csv(rows), SYNTHETIC_RISK)
    b = load_site_data(write_csv(rows[::-1], name="rev.csv"), SYNTHETIC_RISK)
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64


def test_fingerprint_changes_when_one_value_changes(write_csv: WriteCsv) -> None:
    rows = _balanced_rows(40)
    base = fingerprint(load_site_data(write_csv(rows), SYNTHETIC_RISK))
    changed = [dict(r) for r in rows]
    changed[7]["bmi"] = "33.3" if changed[7]["bmi"] != "33.3" else "33.4"
    assert fingerprint(load_site_data(write_csv(changed, name="b.csv"), SYNTHETIC_RISK)) != base
    label = [dict(r) for r in rows]
    label[3]["outcome"] = "1" if label[3]["outcome"] == "0" else "0"
    assert fingerprint(load_site_data(write_csv(label, name="c.csv"), SYNTHETIC_RISK)) != base
    fewer = rows[:-1]
    assert fingerprint(load_site_data(write_csv(fewer, name="d.csv"), SYNTHETIC_RISK)) != base


def test_fingerprint_depends_on_task(write_csv: WriteCsv) -> None:
    path = write_csv(_balanced_rows(10))
    assert fingerprint(load_site_data(path, SYNTHETIC_RISK)) != fingerprint(
        load_site_data(path, SYNTHETIC_REHAB)
    )


# -- rehab target ------------------------------------------------------------------------


def test_rehab_target_scaled_and_decoded(write_csv: WriteCsv) -> None:
    rows = [row("P1", progress="0.0"), row("P2", progress="100.0"), row("P3", progress="37.5")]
    data = load_site_data(write_csv(rows), SYNTHETIC_REHAB)
    np.testing.assert_allclose(data.y, [0.0, 1.0, 0.375], atol=1e-6)
    assert np.all((data.y >= 0) & (data.y <= 1))
    np.testing.assert_allclose(decode_target(SYNTHETIC_REHAB, data.y), [0, 100, 37.5], atol=1e-4)
    assert data.X.shape == (3, SYNTHETIC_REHAB.num_features)
    # treatment_time 13 of [0, 52]; severity 5 of [1, 10]
    assert data.X[0, 2] == pytest.approx(2 * 13 / 52 - 1)
    assert data.X[0, 3] == pytest.approx(2 * 4 / 9 - 1)


def test_rehab_target_out_of_range_skipped(write_csv: WriteCsv) -> None:
    data = load_site_data(write_csv([row("P1"), row("P2", progress="120")]), SYNTHETIC_REHAB)
    assert data.ids == ["P1"]
    assert data.skipped[0].column == "progress"


def test_good_row_constant_matches_header() -> None:
    assert tuple(GOOD_ROW) == HEADER
