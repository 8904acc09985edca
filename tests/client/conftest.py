"""Shared helpers for the site-side tests: tiny clinical CSVs and site directories."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from medfed.simulations.synthetic import COLUMNS, generate_risk_sites

HEADER = COLUMNS

GOOD_ROW = {
    "patient_id": "P001",
    "age": "59",
    "sex": "1",
    "bmi": "41.0",
    "family_history": "0",
    "smoking": "1",
    "systolic_bp": "160",
    "outcome": "1",
    "treatment_time": "13.0",
    "severity": "5",
    "progress": "25.0",
}


def row(pid: str, **overrides: object) -> dict[str, str]:
    """A valid synthetic row with ``pid``, with some cells replaced."""
    return {**GOOD_ROW, "patient_id": pid, **{k: str(v) for k, v in overrides.items()}}


def csv_text(rows: list[dict[str, str]], header: tuple[str, ...] = HEADER) -> str:
    lines = [",".join(header)]
    lines += [",".join(r.get(c, "") for c in header) for r in rows]
    return "\n".join(lines) + "\n"


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    def _write(
        rows: list[dict[str, str]], name: str = "clinical.csv", header: tuple[str, ...] = HEADER
    ) -> Path:
        path = tmp_path / name
        path.write_text(csv_text(rows, header), encoding="utf-8")
        return path

    return _write


@pytest.fixture(scope="session")
def generated_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic risk site (300 patients), generated once per session."""
    root = tmp_path_factory.mktemp("generated")
    [site_dir] = generate_risk_sites(1, root / "sites", seed=1, size_scale=0.2)
    return site_dir


@pytest.fixture
def site_dir(tmp_path: Path, generated_site: Path) -> Path:
    """A fresh copy of the generated site's data directory (no policy, no ledger)."""
    target = tmp_path / "sites" / generated_site.name
    shutil.copytree(generated_site, target)
    return target
