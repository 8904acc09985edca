"""Synthetic hospitals: schema, ranges, determinism, site differences, true model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import train_test_split

from medfed.common.tasks import SYNTHETIC_REHAB, SYNTHETIC_RISK
from medfed.simulations.synthetic import (
    COLUMNS,
    RISK_FEATURE_SCALING,
    TRUE_REHAB_MODEL,
    TRUE_RISK_MODEL,
    SiteProfile,
    generate_risk_sites,
    site_profiles,
)

RISK_FEATURES = [c.name for c in SYNTHETIC_RISK.columns]


def _read_all(site_dirs: list[Path]) -> list[pd.DataFrame]:
    return [pd.read_csv(d / "clinical.csv", dtype={"patient_id": str}) for d in site_dirs]


def _file_bytes(out_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out_dir)): p.read_bytes()
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def default_sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("synthetic-default")
    return out, generate_risk_sites(3, out)


@pytest.fixture(scope="module")
def default_frames(default_sites: tuple[Path, list[Path]]) -> list[pd.DataFrame]:
    return _read_all(default_sites[1])


def test_layout_and_columns(
    default_sites: tuple[Path, list[Path]], default_frames: list[pd.DataFrame]
) -> None:
    out, site_dirs = default_sites
    assert site_dirs == [out / f"site-{i}" for i in range(3)]
    for d, frame in zip(site_dirs, default_frames, strict=True):
        header = (d / "clinical.csv").read_text().splitlines()[0]
        assert header.split(",") == list(COLUMNS)
        assert list(frame.columns) == list(COLUMNS)
        assert not frame.isna().any().any()
    # The schema's required columns are all present, for both tasks.
    for spec in (SYNTHETIC_RISK, SYNTHETIC_REHAB):
        assert set(spec.required_columns()) <= set(COLUMNS)


def test_values_within_public_ranges(default_frames: list[pd.DataFrame]) -> None:
    pooled = pd.concat(default_frames)
    for spec in (SYNTHETIC_RISK, SYNTHETIC_REHAB):
        for col in (*spec.columns, spec.target):
            values = pooled[col.name]
            assert values.min() >= col.low, col.name
            assert values.max() <= col.high, col.name
            if col.kind == "binary":
                assert set(values.unique()) <= {0, 1}, col.name
    for name in ("age", "sex", "family_history", "smoking", "systolic_bp", "outcome"):
        assert pd.api.types.is_integer_dtype(pooled[name]), name
    assert pd.api.types.is_integer_dtype(pooled["severity"])
    for name in ("bmi", "treatment_time", "progress"):
        # one decimal place at most
        assert np.allclose(pooled[name] * 10, np.round(pooled[name] * 10)), name
    assert set(pooled["outcome"].unique()) == {0, 1}


def test_patient_ids_unique_across_sites(default_frames: list[pd.DataFrame]) -> None:
    ids = pd.concat(default_frames)["patient_id"]
    assert ids.is_unique
    assert ids.str.fullmatch(r"MRN-[A-Z]\d{6}").all()
    per_site = [set(f["patient_id"]) for f in default_frames]
    assert not per_site[0] & per_site[1]
    assert not per_site[1] & per_site[2]


def test_sites_differ(default_frames: list[pd.DataFrame]) -> None:
    sizes = [len(f) for f in default_frames]
    prevalence = [f["outcome"].mean() for f in default_frames]
    mean_age = [f["age"].mean() for f in default_frames]
    assert sizes == [1500, 2500, 4000]
    assert len(set(sizes)) == 3
    # young urban -> general -> elderly regional
    assert mean_age[0] + 8 < mean_age[1] and mean_age[1] + 8 < mean_age[2]
    assert prevalence[0] < prevalence[1] < prevalence[2]
    assert min(prevalence) >= 0.10
    assert max(prevalence) <= 0.45
    assert max(prevalence) - min(prevalence) > 0.15


def test_model_json(default_sites: tuple[Path, list[Path]]) -> None:
    out, _ = default_sites
    meta = json.loads((out / "synthetic_model.json").read_text())
    assert meta["seed"] == 42
    assert meta["num_sites"] == 3
    assert meta["risk_model"]["coefficients"] == TRUE_RISK_MODEL
    assert meta["rehab_model"]["noise_sd"] == TRUE_REHAB_MODEL["noise_sd"]
    assert [s["site"] for s in meta["sites"]] == ["site-0", "site-1", "site-2"]
    assert [s["patients"] for s in meta["sites"]] == [1500, 2500, 4000]
    assert all("age_mean" in s["profile"] for s in meta["sites"])


def test_logistic_regression_recovers_true_model(
    default_frames: list[pd.DataFrame],
) -> None:
    pooled = pd.concat(default_frames, ignore_index=True)
    X = np.column_stack(
        [(pooled[name] - centre) / scale for name, (centre, scale) in RISK_FEATURE_SCALING.items()]
    )
    y = pooled["outcome"].to_numpy()
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, random_state=0, stratify=y
    )
    model = LogisticRegression(C=1e6, max_iter=1000).fit(X_train, y_train)
    auc = roc_auc_score(y_test, model.predict_proba(X_test)[:, 1])
    assert auc > 0.7
    assert auc < 0.9  # the task is not trivially separable
    for name, coef in zip(RISK_FEATURE_SCALING, model.coef_[0], strict=True):
        assert np.sign(coef) == np.sign(TRUE_RISK_MODEL[name]), name
        assert abs(coef - TRUE_RISK_MODEL[name]) < 0.25, name


def test_rehab_progress_is_linear_with_noise(default_frames: list[pd.DataFrame]) -> None:
    pooled = pd.concat(default_frames, ignore_index=True)
    X = pooled[["treatment_time", "severity", "age", "sex"]].to_numpy(dtype=float)
    y = pooled["progress"].to_numpy()
    fit = LinearRegression().fit(X, y)
    r2 = r2_score(y, fit.predict(X))
    assert 0.6 <= r2 <= 0.85
    for name, coef in zip(["treatment_time", "severity", "age"], fit.coef_, strict=False):
        assert np.sign(coef) == np.sign(TRUE_REHAB_MODEL[name]), name


def test_same_seed_identical_bytes_different_seed_differs(tmp_path: Path) -> None:
    generate_risk_sites(4, tmp_path / "a", seed=7, size_scale=0.2)
    generate_risk_sites(4, tmp_path / "b", seed=7, size_scale=0.2)
    generate_risk_sites(4, tmp_path / "c", seed=8, size_scale=0.2)
    a, b, c = (_file_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    for name in a:
        if name.endswith("clinical.csv"):
            assert a[name] != c[name], name


def test_size_scale(tmp_path: Path) -> None:
    site_dirs = generate_risk_sites(3, tmp_path, size_scale=0.1)
    assert [len(f) for f in _read_all(site_dirs)] == [150, 250, 400]


@pytest.mark.parametrize("num_sites", [1, 2, 5, 20])
def test_any_number_of_sites(tmp_path: Path, num_sites: int) -> None:
    site_dirs = generate_risk_sites(num_sites, tmp_path, size_scale=0.05)
    assert [d.name for d in site_dirs] == [f"site-{i}" for i in range(num_sites)]
    frames = _read_all(site_dirs)
    assert pd.concat(frames)["patient_id"].is_unique
    profiles = site_profiles(num_sites)
    assert len({p.name for p in profiles}) == num_sites
    assert len({p.letter for p in profiles}) == num_sites
    assert all(800 <= p.size <= 5000 for p in profiles)


def test_site_profiles() -> None:
    profiles = site_profiles(3)
    assert all(isinstance(p, SiteProfile) for p in profiles)
    assert [p.size for p in profiles] == [1500, 2500, 4000]
    assert profiles[0].age_mean < profiles[1].age_mean < profiles[2].age_mean
    # the default three sites are fixed archetypes; extra sites depend on the seed
    assert site_profiles(3, seed=1) == profiles
    assert site_profiles(8, seed=1) == site_profiles(8, seed=1)
    assert site_profiles(8, seed=1)[3:] != site_profiles(8, seed=2)[3:]
    assert site_profiles(8, seed=1)[:3] == profiles


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_risk_sites(2, tmp_path, size_scale=0.05)
    before = _file_bytes(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_risk_sites(2, tmp_path, seed=1, size_scale=0.05)
    assert _file_bytes(tmp_path) == before
    generate_risk_sites(2, tmp_path, seed=1, size_scale=0.05, overwrite=True)
    after = _file_bytes(tmp_path)
    assert after["site-0/clinical.csv"] != before["site-0/clinical.csv"]
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temp files left


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_sites": 0}, "num_sites"),
        ({"num_sites": -2}, "num_sites"),
        ({"num_sites": 27}, "num_sites"),
        ({"num_sites": 2.5}, "num_sites"),
        ({"size_scale": 0}, "size_scale"),
        ({"size_scale": -1.0}, "size_scale"),
        ({"size_scale": float("nan")}, "size_scale"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, argument: str) -> None:
    args = {"num_sites": 3, "out_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=argument):
        generate_risk_sites(**args)
    assert not any(tmp_path.iterdir())


def test_site_profiles_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_sites"):
        site_profiles(0)
    with pytest.raises(ValueError, match="seed"):
        site_profiles(3, seed=-5)
