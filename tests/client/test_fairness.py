"""Per-subgroup evaluation at a site: metrics per group, suppression, groups from features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import confusion_matrix, mean_absolute_error, roc_auc_score

from medfed.client.data import load_site_data
from medfed.client.fairness import (
    binary_metrics,
    group_index,
    releasable,
    site_fairness,
)
from medfed.common.tasks import (
    HEART_DISEASE_RISK,
    SYNTHETIC_REHAB,
    SYNTHETIC_RISK,
)

from .conftest import csv_text, row

EDGES = (50, 65)


def _sites_rows(ages: list[int], sexes: list[int], outcomes: list[int]) -> list[dict[str, str]]:
    return [
        row(f"P{i:04d}", age=a, sex=s, outcome=o)
        for i, (a, s, o) in enumerate(zip(ages, sexes, outcomes, strict=True))
    ]


def _load(tmp_path: Path, rows: list[dict[str, str]], spec=SYNTHETIC_RISK):
    path = tmp_path / "clinical.csv"
    path.write_text(csv_text(rows), encoding="utf-8")
    return load_site_data(path, spec)


@pytest.fixture
def cohort(tmp_path: Path):
    """120 encoded patients (real CSV path): known sex, age and outcome; seeded logits."""
    rng = np.random.default_rng(5)
    n = 120
    ages = rng.integers(20, 90, n).tolist()
    sexes = rng.integers(0, 2, n).tolist()
    outcomes = rng.integers(0, 2, n).tolist()
    data = _load(tmp_path, _sites_rows(ages, sexes, outcomes))
    logits = rng.normal(size=n) + 1.5 * (data.y - 0.5)
    return data, np.asarray(ages), np.asarray(sexes), logits


def _ece(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Reference ECE: np.digitize over the 10 equal-width bins (1.0 in the last bin)."""
    which = np.minimum(np.digitize(prob, np.linspace(0, 1, bins + 1)[1:-1]), bins - 1)
    return sum(
        abs(prob[which == b].mean() - y[which == b].mean()) * np.mean(which == b)
        for b in range(bins)
        if np.any(which == b)
    )


def test_binary_group_metrics_match_sklearn(cohort) -> None:
    data, ages, sexes, logits = cohort
    payload = site_fairness(data.X, data.y, logits, SYNTHETIC_RISK, ("sex", "age"), EDGES, 1)
    assert payload["version"] == 1 and payload["threshold"] == 0.5
    prob = expit(logits)
    masks = {
        "sex=female": sexes == 0,
        "sex=male": sexes == 1,
        "age=<50": ages < 50,
        "age=50-64": (ages >= 50) & (ages < 65),
        "age=65+": ages >= 65,
    }
    assert list(payload["groups"]) == list(masks)
    for name, mask in masks.items():
        got, y, p = payload["groups"][name], data.y[mask], prob[mask]
        tn, fp, fn, tp = confusion_matrix(y, p >= 0.5, labels=[0, 1]).ravel()
        assert (got["n"], got["tp"], got["fp"], got["tn"], got["fn"]) == (
            mask.sum(),
            tp,
            fp,
            tn,
            fn,
        )
        assert got["positives"] == int(y.sum())
        assert got["auc"] == pytest.approx(roc_auc_score(y, p))
        assert got["mean_predicted"] == pytest.approx(p.mean())
        assert got["observed_rate"] == pytest.approx(y.mean())
        assert got["ece"] == pytest.approx(_ece(y, p))
    assert payload["suppressed"] == []


def test_auc_is_none_for_a_group_with_one_class() -> None:
    got = binary_metrics(np.zeros(30), np.linspace(0.1, 0.9, 30))
    assert got["auc"] is None and got["positives"] == 0 and got["fp"] + got["tn"] == 30


def test_groups_below_min_cohort_are_named_without_counts(tmp_path: Path) -> None:
    # 30 women, 30 men; ages: 40 under 50, 14 in 50-64, 6 aged 65+.
    ages = [30] * 40 + [55] * 14 + [70] * 6
    sexes = [0, 1] * 30
    data = _load(tmp_path, _sites_rows(ages, sexes, [0, 1, 1] * 20))
    logits = np.linspace(-2, 2, 60)
    payload = site_fairness(data.X, data.y, logits, SYNTHETIC_RISK, ("sex", "age"), EDGES, 20)
    assert set(payload["groups"]) == {"sex=female", "sex=male", "age=<50"}
    assert payload["suppressed"] == ["age=50-64", "age=65+"]
    # Withheld groups are names only: no size or figure of them anywhere in what leaves.
    assert set(payload) == {"version", "kind", "threshold", "groups", "suppressed"}
    text = json.dumps(payload, separators=(",", ":"))
    assert all(f'"n":{k}' not in text for k in (14, 6, 20))
    assert [g["n"] for g in payload["groups"].values()] == [30, 30, 40]


def test_a_small_group_is_not_recoverable_from_the_total(tmp_path: Path) -> None:
    """45 patients, 30 women and 15 men, cohort 20: releasing the women's count would
    reveal the men's (45 - 30), so both are withheld."""
    data = _load(tmp_path, _sites_rows([40] * 45, [0] * 30 + [1] * 15, [0, 1, 1] * 15))
    payload = site_fairness(data.X, data.y, np.zeros(45), SYNTHETIC_RISK, ("sex",), EDGES, 20)
    assert payload["groups"] == {} and payload["suppressed"] == ["sex=female", "sex=male"]


@pytest.mark.parametrize(
    ("sizes", "cohort", "expected"),
    [
        ([30, 30], 20, [True, True]),
        ([30, 15], 20, [False, False]),  # the men would be the total minus the women
        ([40, 25, 5], 20, [True, False, False]),  # 5 + the smallest released (25) >= 20
        ([40, 30, 0], 20, [True, True, False]),  # an empty group reveals no patient
        ([5, 5, 5, 50], 20, [False, False, False, False]),  # 15 < 20: the 50 goes too
        ([10, 10], 20, [False, False]),
    ],
)
def test_releasable_withholds_complements(sizes, cohort, expected) -> None:
    got = releasable(sizes, cohort)
    assert got == expected
    withheld = sum(n for n, r in zip(sizes, got, strict=True) if not r)
    assert withheld == 0 or withheld >= cohort


def test_age_band_boundaries_through_the_public_scaling(tmp_path: Path) -> None:
    ages = [18, 49, 50, 64, 65, 66, 100]
    data = _load(tmp_path, _sites_rows(ages, [0] * 7, [0] * 7))
    names, index = group_index(data.X, SYNTHETIC_RISK, "age", EDGES)
    assert names == ["age=<50", "age=50-64", "age=65+"]
    assert [names[i] for i in index] == [
        "age=<50", "age=<50", "age=50-64", "age=50-64", "age=65+", "age=65+", "age=65+"
    ]  # fmt: skip
    names, index = group_index(data.X, SYNTHETIC_RISK, "age", (40, 41, 70))
    assert names == ["age=<40", "age=40", "age=41-69", "age=70+"]


def test_categorical_and_nullable_columns_have_a_group_per_code(tmp_path: Path) -> None:
    header = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach",
              "exang", "oldpeak", "slope", "ca", "thal", "num")  # fmt: skip
    cells = ["60", "1", "{cp}", "130", "250", "{fbs}", "1", "150", "0", "1.0", "2", "0", "3", "0"]
    lines = [",".join(header)]
    for cp, fbs in [(1, "0"), (4, "1"), (2, ""), (4, "?")]:
        lines.append(",".join(cells).format(cp=cp, fbs=fbs))
    path = tmp_path / "hd.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = load_site_data(path, HEART_DISEASE_RISK)
    names, index = group_index(data.X, HEART_DISEASE_RISK, "cp", EDGES)
    assert names == ["cp=1", "cp=2", "cp=3", "cp=4"]
    assert [names[i] for i in index] == ["cp=1", "cp=4", "cp=2", "cp=4"]
    names, index = group_index(data.X, HEART_DISEASE_RISK, "fbs", EDGES)
    assert names == ["fbs=0", "fbs=1", "fbs=missing"]
    assert [names[i] for i in index] == ["fbs=0", "fbs=1", "fbs=missing", "fbs=missing"]
    names, _ = group_index(data.X, HEART_DISEASE_RISK, "sex", EDGES)
    assert names == ["sex=female", "sex=male"]


def test_regression_groups_in_clinical_units(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 60
    ages = rng.integers(20, 90, n).tolist()
    sexes = [0, 1] * 30
    rows = [
        row(f"P{i}", age=a, sex=s, progress=f"{p:.1f}")
        for i, (a, s, p) in enumerate(zip(ages, sexes, rng.uniform(0, 100, n), strict=True))
    ]
    data = _load(tmp_path, rows, SYNTHETIC_REHAB)
    out = np.clip(data.y + rng.normal(0, 0.1, n), 0, 1)
    payload = site_fairness(data.X, data.y, out, SYNTHETIC_REHAB, ("sex",), EDGES, 10)
    assert payload["kind"] == "regression" and "threshold" not in payload
    for code, name in ((0, "sex=female"), (1, "sex=male")):
        mask = np.asarray(sexes) == code
        truth, pred = data.y[mask] * 100, out[mask] * 100
        got = payload["groups"][name]
        assert got["n"] == mask.sum()
        assert got["mae"] == pytest.approx(mean_absolute_error(truth, pred))
        assert got["rmse"] == pytest.approx(np.sqrt(np.mean((pred - truth) ** 2)))
        assert got["bias"] == pytest.approx(np.mean(pred - truth))
