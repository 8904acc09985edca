"""Global importance at a site: held-out split, permutation ranking, min_cohort refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medfed.client.data import load_site_data, split_train_test
from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
from medfed.common.tasks import SYNTHETIC_REHAB, SYNTHETIC_RISK
from medfed.inference.errors import PredictError
from medfed.inference.importance import EXPLANATIONS_DIR, site_importance, write_importance
from medfed.inference.model_file import load_model
from medfed.simulations.synthetic import COLUMNS
from tests.inference.helpers import SEED, TEST_FRACTION, write_run

PATIENTS = 480


def known_site(root: Path, min_cohort: int = 20, allowed_tasks: list[str] | None = None) -> Path:
    """A site whose outcome depends on smoking only and progress on severity only.

    Every other column, bmi and treatment_time in particular, is independent noise.
    """
    rng = np.random.default_rng(11)
    n = PATIENTS
    smoking = rng.integers(0, 2, n)
    flip = rng.random(n) < 0.1
    severity = rng.integers(1, 11, n)
    cells = {
        "patient_id": [f"K{i:05d}" for i in range(n)],
        "age": rng.integers(18, 101, n),
        "sex": rng.integers(0, 2, n),
        "bmi": np.round(rng.uniform(12, 70, n), 1),
        "family_history": rng.integers(0, 2, n),
        "smoking": smoking,
        "systolic_bp": rng.integers(70, 251, n),
        "outcome": np.where(flip, 1 - smoking, smoking),
        "treatment_time": np.round(rng.uniform(0, 52, n), 1),
        "severity": severity,
        "progress": np.round(np.clip(95 - 9 * severity + rng.normal(0, 3, n), 0, 100), 1),
    }
    site = root / "site-k"
    site.mkdir(parents=True)
    lines = [",".join(COLUMNS)]
    lines += [",".join(str(cells[c][i]) for c in COLUMNS) for i in range(n)]
    (site / "clinical.csv").write_text("\n".join(lines) + "\n")
    policy = SitePolicy(site_id="hospital-k", min_cohort=min_cohort)
    if allowed_tasks is not None:
        policy = policy.model_copy(update={"allowed_tasks": allowed_tasks})
    write_policy(site / POLICY_NAME, policy)
    return site


def trained(tmp_path: Path, site: Path, task: str, model: str) -> Path:
    spec = SYNTHETIC_RISK if task == "risk" else SYNTHETIC_REHAB
    run = tmp_path / f"run-{task}-{model}"
    write_run(run, load_site_data(site / "clinical.csv", spec), model)
    return run


@pytest.mark.parametrize(
    ("task", "model", "matters", "noise"),
    [
        ("risk", "logreg", "smoking", "bmi"),
        ("risk", "mlp", "smoking", "bmi"),
        ("rehab", "mlp", "severity", "treatment_time"),
    ],
)
def test_permutation_ranks_the_feature_that_matters_above_noise(
    tmp_path, task, model, matters, noise
):
    site = known_site(tmp_path)
    report = site_importance(load_model(trained(tmp_path, site, task, model)), site)
    by_name = {c.column: c for c in report.permutation}
    assert report.permutation[0].column == matters
    assert by_name[matters].mean > by_name[noise].mean + 5 * max(by_name[noise].std, 1e-3)
    assert abs(by_name[noise].mean) < 0.1 * by_name[matters].mean
    assert report.held_out_patients == PATIENTS * TEST_FRACTION
    assert (report.test_fraction, report.seed) == (TEST_FRACTION, SEED)
    assert report.score == ("auc" if task == "risk" else "neg_mae (progress units)")
    if model == "logreg":
        assert report.coefficients[0]["feature"] == matters
    else:
        assert report.coefficients == []


def test_held_out_split_is_the_one_training_used(tmp_path):
    site = known_site(tmp_path)
    run = trained(tmp_path, site, "risk", "logreg")
    report = site_importance(load_model(run), site, repeats=2)
    data = load_site_data(site / "clinical.csv", SYNTHETIC_RISK)
    _, test = split_train_test(data, TEST_FRACTION, SEED)
    assert report.held_out_patients == len(test)
    assert report.min_cohort == 20


def test_withdrawn_patients_are_left_out_as_in_training(tmp_path):
    from medfed.client.site import consent_rules_of

    site = known_site(tmp_path)
    (site / "withdrawn.txt").write_text("".join(f"K{i:05d}\n" for i in range(0, PATIENTS, 6)))
    run = trained(tmp_path, site, "risk", "logreg")
    report = site_importance(load_model(run), site, repeats=2)
    data = load_site_data(site / "clinical.csv", SYNTHETIC_RISK, consent=consent_rules_of(site))
    assert len(data) == PATIENTS - PATIENTS // 6
    _, test = split_train_test(data, TEST_FRACTION, SEED)
    assert report.held_out_patients == len(test) < PATIENTS * TEST_FRACTION


def test_result_is_written_at_the_site_with_aggregates_only(tmp_path):
    site = known_site(tmp_path)
    report = site_importance(load_model(trained(tmp_path, site, "risk", "mlp")), site, repeats=3)
    path = write_importance(report, site)
    assert path.parent == site / EXPLANATIONS_DIR
    assert path.name == f"importance-{report.model['sha256'][:16]}.json"
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    text = path.read_text()
    assert "K00" not in text  # no patient identifier


def test_refused_below_the_sites_minimum_cohort(tmp_path):
    site = known_site(tmp_path, min_cohort=PATIENTS)
    run = trained(tmp_path, site, "risk", "mlp")
    with pytest.raises(PredictError, match=r"held-out split has 120 patients, below .* 480"):
        site_importance(load_model(run), site)
    assert not (site / EXPLANATIONS_DIR).exists()


def test_refused_when_the_site_policy_does_not_allow_the_task(tmp_path):
    site = known_site(tmp_path, allowed_tasks=["rehab"])
    run = trained(tmp_path, site, "risk", "logreg")
    with pytest.raises(PredictError, match="does not allow logreg for risk"):
        site_importance(load_model(run), site)


def test_checkpoint_alone_needs_the_test_fraction(tmp_path):
    site = known_site(tmp_path)
    run = trained(tmp_path, site, "risk", "logreg")
    lone = tmp_path / "model.npz"
    shutil.copy(run / "checkpoints" / "round-0001.npz", lone)
    with pytest.raises(PredictError, match="pass --test-fraction"):
        site_importance(load_model(lone), site)
    report = site_importance(load_model(lone), site, test_fraction=TEST_FRACTION, repeats=2)
    assert report.held_out_patients == PATIENTS * TEST_FRACTION
    with pytest.raises(PredictError, match="differs from the run's"):
        site_importance(load_model(run), site, test_fraction=0.5)


def test_imaging_model_is_pointed_to_saliency(tmp_path):
    from medfed.common.config import RunSettings
    from medfed.common.models import build_model
    from medfed.common.params import get_weights
    from medfed.server.app import model_meta
    from medfed.server.checkpoint import save_checkpoint

    site = known_site(tmp_path)
    meta = model_meta(RunSettings(task="xray", model="cnn2d"))
    path, _ = save_checkpoint(tmp_path, 1, get_weights(build_model("cnn2d", (1, 64, 64), 0)), meta)
    with pytest.raises(PredictError, match="imaging model; explain an image"):
        site_importance(load_model(path), site)
