"""Session fixtures of the tabular inference tests (imported by the test modules).

Kept out of conftest.py, which the imaging tests of this folder may own.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from medfed.client.data import SiteData, load_site_data
from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
from medfed.common.tasks import SYNTHETIC_REHAB, SYNTHETIC_RISK
from medfed.simulations.synthetic import generate_risk_sites
from tests.inference.helpers import write_run

MIN_COHORT = 20


@pytest.fixture(scope="session")
def synthetic_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic hospital (risk and rehab columns) with a policy, made once."""
    root = tmp_path_factory.mktemp("inference-sites")
    [site] = generate_risk_sites(1, root, seed=3, size_scale=0.4)
    write_policy(site / POLICY_NAME, SitePolicy(site_id="hospital-a", min_cohort=MIN_COHORT))
    return site


@pytest.fixture(scope="session")
def site_data(synthetic_site: Path) -> Callable[[str], SiteData]:
    specs = {"risk": SYNTHETIC_RISK, "rehab": SYNTHETIC_REHAB}
    cache: dict[str, SiteData] = {}

    def _load(task: str) -> SiteData:
        if task not in cache:
            cache[task] = load_site_data(synthetic_site / "clinical.csv", specs[task])
        return cache[task]

    return _load


@pytest.fixture(scope="session")
def trained_run(
    tmp_path_factory: pytest.TempPathFactory, site_data: Callable[[str], SiteData]
) -> Callable[[str, str], Path]:
    """(task, model) -> a run folder with round 1's checkpoint and run.json (cached)."""
    cache: dict[tuple[str, str], Path] = {}

    def _run(task: str, model: str) -> Path:
        if (task, model) not in cache:
            out = tmp_path_factory.mktemp(f"run-{task}-{model}")
            write_run(out, site_data(task), model)
            cache[(task, model)] = out
        return cache[(task, model)]

    return _run


@pytest.fixture
def run_copy(tmp_path: Path, trained_run: Callable[[str, str], Path]) -> Callable[[str, str], Path]:
    """A copy of a cached run folder that a test may alter."""

    def _copy(task: str, model: str) -> Path:
        target = tmp_path / f"run-{task}-{model}"
        shutil.copytree(trained_run(task, model), target)
        return target

    return _copy
