"""The empirical one-run audit of a site's own training pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.audit.empirical import (
    CONSISTENT,
    LEAKAGE,
    AuditError,
    EmpiricalAuditResult,
    make_canaries,
    run_empirical_audit,
)
from medfed.client.data import DataError
from medfed.client.policy import PolicyError, SitePolicy, write_policy
from medfed.common.config import RunSettings
from medfed.common.tasks import SYNTHETIC_RISK
from medfed.simulations.synthetic import generate_risk_sites

# A small site (90 patients, 67 in the training split) trained for many epochs: the
# mlp memorises canaries there, so training without DP must leak. (At the `medfed
# simulate` defaults a record barely moves the model: see bench/bench_empirical_audit.py.)
MEMORISING = dict(model="mlp", local_epochs=30, batch_size=16, learning_rate=2.0, num_rounds=3)
CANARIES = 100


@pytest.fixture(scope="module")
def small_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    [site_dir] = generate_risk_sites(1, root / "sites", seed=7, size_scale=0.06)
    write_policy(site_dir / "site.toml", SitePolicy(site_id="audit-site"))
    return site_dir


@pytest.fixture(scope="module")
def no_dp(small_site: Path) -> EmpiricalAuditResult:
    settings = RunSettings(**MEMORISING)
    return run_empirical_audit(small_site, settings, dp=False, canaries=CANARIES, seed=1)


@pytest.fixture(scope="module")
def with_dp(small_site: Path) -> EmpiricalAuditResult:
    settings = RunSettings(**MEMORISING)
    return run_empirical_audit(small_site, settings, dp=True, canaries=CANARIES, seed=1)


def test_training_without_dp_leaks(no_dp: EmpiricalAuditResult) -> None:
    assert no_dp.epsilon_lower_bound > 0.5, no_dp
    assert no_dp.verdict == LEAKAGE
    assert not no_dp.dp and no_dp.noise_multiplier == 0.0
    assert no_dp.accountant_epsilon is None
    assert no_dp.correct / no_dp.guesses > 0.75


def test_dp_training_stays_within_the_accountant(with_dp: EmpiricalAuditResult) -> None:
    assert with_dp.dp and with_dp.noise_multiplier > 1.0
    assert with_dp.accountant_epsilon == pytest.approx(3.0, abs=0.02)
    assert with_dp.epsilon_lower_bound <= with_dp.accountant_epsilon
    assert with_dp.epsilon_lower_bound < 0.5  # far below: the noise hides the canaries
    assert with_dp.verdict == CONSISTENT


def test_result_describes_the_run(with_dp: EmpiricalAuditResult) -> None:
    result = with_dp
    assert (result.site_id, result.task, result.model) == ("audit-site", "risk", "mlp")
    assert result.canaries == CANARIES and 0 < result.canaries_included < CANARIES
    assert result.train_records == 67
    n = result.train_records + result.canaries_included
    assert result.sample_rate == pytest.approx(1 / np.ceil(n / 16))
    assert result.steps == 3 * 30 * np.ceil(n / 16)
    assert result.rounds == 3 and result.max_grad_norm == 1.0 and result.delta == 1e-5
    assert 0 <= result.correct <= result.guesses == 2 * result.guesses_each_way <= CANARIES
    assert result.confidence == 0.95 and result.seed == 1 and result.seconds > 0
    data = json.loads(json.dumps(result.to_dict()))
    assert data["verdict"] == CONSISTENT and data["accountant_epsilon"] == result.accountant_epsilon


def test_same_seed_same_audit_and_torch_rng_untouched(small_site: Path) -> None:
    settings = RunSettings(model="logreg", num_rounds=1, local_epochs=2)
    state = torch.random.get_rng_state()
    messages: list[str] = []
    audit = dict(dp=False, canaries=20)
    first = run_empirical_audit(small_site, settings, **audit, seed=5, progress=messages.append)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = run_empirical_audit(small_site, settings, **audit, seed=5)
    assert first.to_dict() == {**second.to_dict(), "seconds": first.seconds}
    assert any("round 1/1" in m for m in messages) and "lower bound" in messages[-1]
    fresh = run_empirical_audit(small_site, settings, **audit)
    assert fresh.seed != 5


def test_canaries_come_in_pairs_outside_the_data() -> None:
    canaries = make_canaries(SYNTHETIC_RISK, 11, np.random.default_rng(0))
    assert canaries.X.shape == (11, SYNTHETIC_RISK.num_features) and len(canaries) == 11
    np.testing.assert_array_equal(canaries.X[0::2][:5], canaries.X[1::2])
    np.testing.assert_array_equal(canaries.y, [0, 1] * 5 + [0])
    norms = np.linalg.norm(canaries.X, axis=1)
    assert np.allclose(norms, 2 * np.sqrt(SYNTHETIC_RISK.num_features), rtol=1e-5)
    many = make_canaries(SYNTHETIC_RISK, 2000, np.random.default_rng(1))
    assert 0.45 < many.included.mean() < 0.55


def test_missing_policy_is_named(small_site: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(small_site, site)
    (site / "site.toml").unlink()
    with pytest.raises(PolicyError, match=r"site\.toml"):
        run_empirical_audit(site, RunSettings(), canaries=20, seed=0)


def test_unreadable_csv_is_named(small_site: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(small_site, site)
    (site / "clinical.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"clinical\.csv"):
        run_empirical_audit(site, RunSettings(), canaries=20, seed=0)
    (site / "clinical.csv").unlink()
    with pytest.raises(DataError, match=r"clinical\.csv: site data file not found"):
        run_empirical_audit(site, RunSettings(), canaries=20, seed=0)


def test_too_few_records_for_the_canaries(small_site: Path) -> None:
    with pytest.raises(DataError, match=r"clinical\.csv: 67 training records are too few for 200"):
        run_empirical_audit(small_site, RunSettings(), canaries=200, seed=0)


def test_bad_requests_are_refused(small_site: Path) -> None:
    with pytest.raises(AuditError, match="at least 10 canaries"):
        run_empirical_audit(small_site, RunSettings(), canaries=4, seed=0)
    imaging = RunSettings(task="xray", model="cnn2d")
    with pytest.raises(AuditError, match="tabular"):
        run_empirical_audit(small_site, imaging, canaries=20, seed=0)


def test_rehab_regression_runs(small_site: Path) -> None:
    # batch 16: the noise calibration is slow for a sample rate as high as 1/2
    settings = RunSettings(task="rehab", model="logreg", num_rounds=1, batch_size=16)
    result = run_empirical_audit(small_site, settings, canaries=20, seed=0)
    assert result.task == "rehab" and result.verdict == CONSISTENT
    assert result.epsilon_lower_bound <= result.accountant_epsilon
