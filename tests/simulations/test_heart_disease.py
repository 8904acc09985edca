"""The four UCI Heart Disease hospitals, copied unchanged into four sites."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from medfed.common.tasks import HEART_DISEASE_RISK
from medfed.simulations.heart_disease import (
    ATTRIBUTION,
    HOSPITALS,
    INSTITUTIONS,
    prepare_heart_disease_sites,
    shipped_file,
)

EXPECTED_ROWS = {"cleveland": 303, "hungarian": 294, "switzerland": 123, "va": 200}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_hospitals_and_shipped_files() -> None:
    assert HOSPITALS == ("cleveland", "hungarian", "switzerland", "va")
    for hospital in HOSPITALS:
        path = shipped_file(hospital)
        assert isinstance(path, Path)
        assert path.is_file()
        assert path.name == f"{hospital}.csv"
        assert path.parent.name == "uci-heart-disease"


def test_unknown_hospital() -> None:
    with pytest.raises(ValueError, match="unknown hospital") as info:
        shipped_file("mayo")
    for hospital in HOSPITALS:
        assert hospital in str(info.value)


def test_attribution() -> None:
    assert "10.24432/C52P4X" in ATTRIBUTION
    assert "CC BY 4.0" in ATTRIBUTION
    for author in ("Janosi", "Steinbrunn", "Pfisterer", "Detrano"):
        assert author in ATTRIBUTION
    assert "UCI Machine Learning Repository" in ATTRIBUTION


def test_prepare_sites(tmp_path: Path) -> None:
    site_dirs = prepare_heart_disease_sites(tmp_path)
    assert site_dirs == [tmp_path / f"site-{i}" for i in range(4)]
    for hospital, site_dir in zip(HOSPITALS, site_dirs, strict=True):
        csv_path = site_dir / "clinical.csv"
        assert csv_path.read_bytes() == shipped_file(hospital).read_bytes()
        rows = _rows(csv_path)
        assert len(rows) == EXPECTED_ROWS[hospital]
        assert set(HEART_DISEASE_RISK.required_columns()) <= set(rows[0])
        source = (site_dir / "SOURCE.txt").read_text()
        assert INSTITUTIONS[hospital] in source
        assert ATTRIBUTION in source
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"site-{i}" for i in range(4)]


def test_missing_values_are_left_alone(tmp_path: Path) -> None:
    site_dirs = prepare_heart_disease_sites(tmp_path)
    # ca and thal are nearly always missing outside Cleveland: nothing is imputed.
    hungarian = _rows(site_dirs[1] / "clinical.csv")
    assert sum(row["ca"] == "" for row in hungarian) > 250
    swiss = _rows(site_dirs[2] / "clinical.csv")
    assert sum(row["chol"] == "0" for row in swiss) > 100


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    site_dirs = prepare_heart_disease_sites(tmp_path)
    target = site_dirs[0] / "clinical.csv"
    target.write_text("edited\n")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        prepare_heart_disease_sites(tmp_path)
    assert target.read_text() == "edited\n"
    prepare_heart_disease_sites(tmp_path, overwrite=True)
    assert target.read_bytes() == shipped_file("cleveland").read_bytes()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temp files left
