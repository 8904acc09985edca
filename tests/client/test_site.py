"""One hospital site: decisions, DP rounds, the ledger, budgets and failing closed."""

from __future__ import annotations

import functools
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from medfed.client import site as site_module
from medfed.client.data import load_site_data
from medfed.client.policy import POLICY_NAME, PolicyError, SitePolicy, write_policy
from medfed.client.site import DATA_REPORT_NAME, Decision, Site, SiteRefusal
from medfed.common.config import RunSettings
from medfed.common.ledger import LEDGER_NAME, LedgerError, read_ledger, spends_for
from medfed.common.models import build_model
from medfed.common.params import get_weights
from medfed.common.privacy import Spend, calibrate_noise, epsilon_of, steps_per_round
from medfed.common.tasks import SYNTHETIC_RISK

from .conftest import csv_text, row

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The generated site holds 300 patients: 225 train / 75 test at test_fraction 0.25.
TOTAL, TRAIN, TEST = 300, 225, 75
BATCH = 16  # q = 1/15, 15 steps per round: realistic subsampling, fast calibration

REQUIRED_FIELDS = (
    "run_id",
    "round",
    "dataset_fingerprint",
    "accountant",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "delta",
    "epsilon",
    "prev_hash",
)


@functools.cache
def _cached_calibration(target: float, delta: float, rate: float, steps: int) -> float:
    return calibrate_noise(target, delta, rate, steps)


@pytest.fixture(autouse=True)
def _fast_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """calibrate_noise is a pure function: memoise it so repeated plans stay fast."""
    monkeypatch.setattr(site_module, "calibrate_noise", _cached_calibration)


def _policy(site_dir: Path, **kwargs: object) -> SitePolicy:
    policy = SitePolicy(site_id="h1", **{"epsilon_budget": 10.0, **kwargs})  # type: ignore[arg-type]
    write_policy(site_dir / POLICY_NAME, policy)
    return policy


@pytest.fixture
def settings(site_dir: Path, tmp_path: Path) -> RunSettings:
    return RunSettings(
        data_root=str(site_dir.parent),
        out_dir=str(tmp_path / "out"),
        num_rounds=2,
        epsilon=1.0,
        batch_size=BATCH,
    )


@pytest.fixture
def site(site_dir: Path) -> Site:
    _policy(site_dir)
    return Site(site_dir)


@pytest.fixture
def weights() -> list[np.ndarray]:
    return get_weights(build_model("logreg", SYNTHETIC_RISK.num_features, seed=42))


def _ledger_lines(site: Site) -> list[dict]:
    if not site.ledger_path.exists():
        return []
    return [json.loads(line) for line in site.ledger_path.read_text().splitlines()]


def _replay(entries: list[dict], delta: float) -> float:
    """Independent Opacus accountant, stepped once per recorded DP-SGD step."""
    accountant = RDPAccountant()
    for e in entries:
        if e["kind"] != "train":
            continue
        for _ in range(e["steps"]):
            accountant.step(noise_multiplier=e["noise_multiplier"], sample_rate=e["sample_rate"])
    return float(accountant.get_epsilon(delta=delta))


# -- decisions ---------------------------------------------------------------------------


def test_decide_accepts_within_budget(site: Site, settings: RunSettings) -> None:
    decision = site.decide(settings, "run-1", 1)
    assert decision.accept, decision.reason
    assert decision.reason == ""
    assert decision.site_id == "h1"
    assert decision.noise_multiplier > 0
    assert decision.epsilon_spent == 0.0
    assert 0 < decision.epsilon_after <= decision.epsilon_budget == 10.0
    assert (decision.records_used, decision.records_skipped) == (TOTAL, 0)
    assert decision.train_records == TRAIN
    # The noise is calibrated for the run's target over all planned rounds.
    rate, steps = steps_per_round(TRAIN, BATCH, 1)
    planned = epsilon_of([Spend(decision.noise_multiplier, rate, steps * 2)], 1e-5)
    assert planned == pytest.approx(1.0, abs=0.02)
    assert planned <= 1.0
    assert decision.epsilon_after == pytest.approx(
        epsilon_of([Spend(decision.noise_multiplier, rate, steps)], 1e-5)
    )
    # Deciding writes nothing to the ledger.
    assert not site.ledger_path.exists()


def test_decision_to_config(site: Site, settings: RunSettings) -> None:
    cfg = site.decide(settings, "run-1", 1).to_config()
    assert cfg["accept"] is True
    assert cfg["site-id"] == "h1"
    assert cfg["train-records"] == TRAIN
    assert all(isinstance(v, (bool, int, float, str)) for v in cfg.values())


def test_decide_writes_site_local_data_report(site: Site, settings: RunSettings) -> None:
    site.decide(settings, "run-1", 1)
    report = json.loads((site.data_dir / DATA_REPORT_NAME).read_text())
    assert (report["rows"], report["used"], report["skipped"]) == (TOTAL, TOTAL, 0)


def test_skipped_rows_are_counted(site: Site, settings: RunSettings) -> None:
    csv = site.data_dir / "clinical.csv"
    with csv.open("a") as handle:
        handle.write(csv_text([row("NEW-1", age=150)]).splitlines()[1] + "\n")
    decision = site.decide(settings, "run-1", 1)
    assert decision.accept
    assert (decision.records_used, decision.records_skipped) == (TOTAL, 1)
    report = json.loads((site.data_dir / DATA_REPORT_NAME).read_text())
    assert report["skipped_rows"] == [
        {"line": TOTAL + 2, "column": "age", "reason": "value outside [18, 100], got 150"}
    ]


def test_strict_policy_declines_on_bad_row(site_dir: Path, settings: RunSettings) -> None:
    _policy(site_dir, on_bad_row="error")
    with (site_dir / "clinical.csv").open("a") as handle:
        handle.write(csv_text([row("NEW-1", sex=5)]).splitlines()[1] + "\n")
    decision = Site(site_dir).decide(settings, "run-1", 1)
    assert not decision.accept
    assert f"line {TOTAL + 2}" in decision.reason and "sex" in decision.reason
    assert "got 5" not in decision.reason  # the reason reaches the coordinator


def test_budget_too_small_declines_and_writes_nothing(
    site_dir: Path, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    _policy(site_dir, epsilon_budget=0.2, max_noise_multiplier=3.0)
    site = Site(site_dir)
    decision = site.decide(settings, "run-1", 1)
    assert not decision.accept
    assert "budget" in decision.reason
    assert decision.noise_multiplier == 0.0
    assert decision.epsilon_after == decision.epsilon_spent == 0.0
    with pytest.raises(SiteRefusal, match="budget"):
        site.train_round(settings, "run-1", 1, weights)
    assert not site.ledger_path.exists()


def test_missing_policy_declines(site_dir: Path, settings: RunSettings) -> None:
    site = Site(site_dir)
    decision = site.decide(settings, "run-1", 1)
    assert not decision.accept
    assert POLICY_NAME in decision.reason
    assert decision.site_id == site_dir.name
    assert decision.noise_multiplier == 0


def test_missing_policy_never_trains(
    site_dir: Path, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    site = Site(site_dir)
    with pytest.raises((PolicyError, SiteRefusal)):
        site.train_round(settings, "run-1", 1, weights)
    assert not site.ledger_path.exists()


def test_invalid_policy_declines(site_dir: Path, settings: RunSettings) -> None:
    (site_dir / POLICY_NAME).write_text('site_id = "h1"\nepsilon_budget = "lots"\n')
    decision = Site(site_dir).decide(settings, "run-1", 1)
    assert not decision.accept and "epsilon_budget" in decision.reason


def test_missing_data_declines(site: Site, settings: RunSettings) -> None:
    (site.data_dir / "clinical.csv").unlink()
    decision = site.decide(settings, "run-1", 1)
    assert not decision.accept and "clinical.csv" in decision.reason


def test_min_noise_above_calibrated_declines(site_dir: Path, settings: RunSettings) -> None:
    _policy(site_dir, min_noise_multiplier=50.0)
    decision = Site(site_dir).decide(settings, "run-1", 1)
    assert not decision.accept
    assert "noise" in decision.reason and "50" in decision.reason


def test_disallowed_task_declines(site_dir: Path, settings: RunSettings) -> None:
    _policy(site_dir, allowed_tasks=["rehab"])
    decision = Site(site_dir).decide(settings, "run-1", 1)
    assert not decision.accept and "risk" in decision.reason and "task" in decision.reason


def test_disallowed_model_declines(site_dir: Path, settings: RunSettings) -> None:
    _policy(site_dir, allowed_models=["mlp"])
    decision = Site(site_dir).decide(settings, "run-1", 1)
    assert not decision.accept and "logreg" in decision.reason


def test_larger_delta_declines(site_dir: Path, settings: RunSettings) -> None:
    _policy(site_dir, delta=1e-6)
    decision = Site(site_dir).decide(settings, "run-1", 1)
    assert not decision.accept and "delta" in decision.reason


@pytest.mark.parametrize("server_round", [0, 3])
def test_round_outside_plan_declines(site: Site, settings: RunSettings, server_round: int) -> None:
    decision = site.decide(settings, "run-1", server_round)
    assert not decision.accept and "round" in decision.reason


# -- training and the ledger -------------------------------------------------------------


def test_train_round_appends_complete_entries(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    decision = site.decide(settings, "run-1", 1)
    new_weights, n, metrics = site.train_round(settings, "run-1", 1, weights)
    assert n == TRAIN
    assert [w.shape for w in new_weights] == [w.shape for w in weights]
    assert any(not np.array_equal(a, b) for a, b in zip(new_weights, weights, strict=True))
    lines = _ledger_lines(site)
    assert len(lines) == 1
    first = lines[0]
    for key in REQUIRED_FIELDS:
        assert key in first, key
    rate, steps = steps_per_round(TRAIN, BATCH, 1)
    assert first["kind"] == "train"
    assert (first["run_id"], first["round"], first["site_id"]) == ("run-1", 1, "h1")
    assert first["accountant"] == "rdp"
    assert first["noise_multiplier"] == pytest.approx(decision.noise_multiplier)
    assert first["sample_rate"] == pytest.approx(rate)
    assert first["steps"] == steps
    assert first["max_grad_norm"] == settings.max_grad_norm
    assert first["delta"] == 1e-5
    assert first["num_samples"] == TRAIN
    assert first["epsilon"] == pytest.approx(decision.epsilon_after)
    assert metrics["epsilon"] == pytest.approx(first["epsilon"])
    assert metrics["site-id"] == "h1"
    assert metrics["records-used"] == TOTAL
    assert "train-loss" in metrics  # 225 training records >= default min_cohort 20

    site.train_round(settings, "run-1", 2, new_weights)
    lines = _ledger_lines(site)
    assert [e["round"] for e in lines] == [1, 2]
    assert lines[1]["prev_hash"] == lines[0]["entry_hash"]
    assert lines[1]["epsilon"] > lines[0]["epsilon"]
    assert lines[1]["dataset_fingerprint"] == lines[0]["dataset_fingerprint"]
    # The run's two rounds stay within the run's target epsilon.
    assert lines[1]["epsilon"] <= settings.epsilon + 1e-9
    # The ledger verifies (hashes, chain and replayed epsilons).
    assert len(read_ledger(site.ledger_path)) == 2


def test_same_round_twice_is_refused(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    site.train_round(settings, "run-1", 1, weights)
    before = site.ledger_path.read_bytes()
    with pytest.raises(SiteRefusal, match="already"):
        site.train_round(settings, "run-1", 1, weights)
    assert site.ledger_path.read_bytes() == before
    decision = site.decide(settings, "run-1", 1)
    assert not decision.accept and "already" in decision.reason


def test_restarted_coordinator_gets_no_round_twice(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    """A resumed run (same run name, new Flower run) asks again for the round it lost."""
    named = settings.model_copy(update={"run_name": "trial", "num_rounds": 3})
    run_id = named.medfed_run_id(1111)
    site.train_round(named, run_id, 1, weights)
    site.train_round(named, run_id, 2, weights)  # then the coordinator dies
    resumed = named.model_copy(update={"resume": True})
    again = resumed.medfed_run_id(2222)
    assert again == run_id == "trial"
    before = site.ledger_path.read_bytes()
    decision = site.decide(resumed, again, 2)
    assert not decision.accept
    assert decision.reason == "round 2 of run trial is already in the ledger"
    site.record_decline(decision, again, 2)
    assert site.ledger_path.read_bytes() == before  # no second entry for round 2
    # The next round keeps the run's noise, and the plan's end is still the end.
    recorded = _ledger_lines(site)[0]["noise_multiplier"]
    assert site.decide(resumed, again, 3).noise_multiplier == recorded
    site.train_round(resumed, again, 3, weights)
    assert not site.decide(resumed, again, 4).accept
    lines = _ledger_lines(site)
    assert [(e["kind"], e["round"]) for e in lines] == [("train", r) for r in (1, 2, 3)]
    assert {e["noise_multiplier"] for e in lines} == {recorded}


def test_later_rounds_reuse_the_runs_noise(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    site.train_round(settings, "run-1", 1, weights)
    recorded = _ledger_lines(site)[0]["noise_multiplier"]
    # Even if the coordinator now asks for a different target, the run keeps its noise.
    changed = settings.model_copy(update={"epsilon": 0.5})
    assert site.decide(changed, "run-1", 2).noise_multiplier == recorded
    site.train_round(changed, "run-1", 2, weights)
    assert _ledger_lines(site)[1]["noise_multiplier"] == recorded
    # A new run is calibrated afresh for its own (smaller) target: more noise.
    assert site.decide(changed, "run-2", 1).noise_multiplier > recorded


def test_second_run_keeps_composing(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    for run_id in ("run-1", "run-2"):
        for r in (1, 2):
            site.train_round(settings, run_id, r, weights)
    lines = _ledger_lines(site)
    assert [(e["run_id"], e["round"]) for e in lines] == [
        ("run-1", 1),
        ("run-1", 2),
        ("run-2", 1),
        ("run-2", 2),
    ]
    eps = [e["epsilon"] for e in lines]
    assert all(b > a for a, b in itertools.pairwise(eps))
    assert eps[-1] > settings.epsilon  # two runs of epsilon 1 compose beyond 1
    assert math.isclose(eps[-1], _replay(lines, 1e-5), rel_tol=1e-6)
    assert math.isclose(eps[1], _replay(lines[:2], 1e-5), rel_tol=1e-6)
    # The next decision starts from what the ledger says was spent.
    decision = site.decide(settings, "run-3", 1)
    assert decision.epsilon_spent == pytest.approx(eps[-1])
    assert decision.epsilon_after > eps[-1]


def test_little_budget_left_means_more_noise_for_the_whole_run(
    site_dir: Path, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    _policy(site_dir, epsilon_budget=1.2)
    site = Site(site_dir)
    site.train_round(settings, "run-1", 1, weights)
    site.train_round(settings, "run-1", 2, weights)
    first_noise = _ledger_lines(site)[-1]["noise_multiplier"]
    decision = site.decide(settings, "run-2", 1)
    assert decision.accept and decision.noise_multiplier > first_noise
    site.train_round(settings, "run-2", 1, weights)
    site.train_round(settings, "run-2", 2, weights)
    lines = _ledger_lines(site)
    assert (
        lines[-1]["noise_multiplier"]
        == lines[-2]["noise_multiplier"]
        == pytest.approx(decision.noise_multiplier)
    )
    assert lines[-1]["epsilon"] <= 1.2


def test_run_that_would_exceed_budget_is_declined(
    site_dir: Path, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    _policy(site_dir, epsilon_budget=1.1, max_noise_multiplier=3.0)
    site = Site(site_dir)
    site.train_round(settings, "run-1", 1, weights)
    site.train_round(settings, "run-1", 2, weights)
    spent = _ledger_lines(site)[-1]["epsilon"]
    decision = site.decide(settings, "run-2", 1)
    assert not decision.accept and "budget" in decision.reason
    assert decision.epsilon_spent == pytest.approx(spent)
    with pytest.raises(SiteRefusal):
        site.train_round(settings, "run-2", 1, weights)
    assert len(_ledger_lines(site)) == 2


def test_changed_data_has_its_own_fingerprint(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    site.train_round(settings, "run-1", 1, weights)
    first_fp = _ledger_lines(site)[0]["dataset_fingerprint"]
    entries = read_ledger(site.ledger_path)
    assert len(spends_for(entries, first_fp)) == 1
    # Other settings that change the training split change the fingerprint.
    other = settings.model_copy(update={"seed": 7})
    decision = site.decide(other, "run-2", 1)
    assert decision.epsilon_spent == 0.0


def test_corrupt_ledger_declines_and_appends_nothing(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    site.train_round(settings, "run-1", 1, weights)
    raw = json.loads(site.ledger_path.read_text())
    raw["epsilon"] = raw["epsilon"] / 10
    site.ledger_path.write_text(json.dumps(raw, sort_keys=True) + "\n")
    tampered = site.ledger_path.read_bytes()

    decision = site.decide(settings, "run-1", 2)
    assert not decision.accept
    assert LEDGER_NAME in decision.reason
    with pytest.raises(LedgerError):
        site.train_round(settings, "run-1", 2, weights)
    site.record_decline(decision, "run-1", 2)
    assert site.ledger_path.read_bytes() == tampered


def test_truncated_ledger_declines(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    site.train_round(settings, "run-1", 1, weights)
    text = site.ledger_path.read_text()
    site.ledger_path.write_text(text[: len(text) // 2])
    decision = site.decide(settings, "run-1", 2)
    assert not decision.accept and "ledger" in decision.reason


def test_record_decline_writes_reason(site_dir: Path, settings: RunSettings) -> None:
    _policy(site_dir, epsilon_budget=0.2, max_noise_multiplier=3.0)
    site = Site(site_dir)
    decision = site.decide(settings, "run-1", 1)
    assert not decision.accept
    site.record_decline(decision, "run-1", 1)
    entries = read_ledger(site.ledger_path)
    assert len(entries) == 1
    entry = entries[0]
    assert entry.kind == "decline"
    assert (entry.run_id, entry.round, entry.site_id) == ("run-1", 1, "h1")
    assert entry.reason == decision.reason and "budget" in entry.reason
    assert entry.steps == 0
    # Recording the same decline again is a no-op; declines spend nothing.
    site.record_decline(decision, "run-1", 1)
    assert len(read_ledger(site.ledger_path)) == 1
    assert site.decide(settings, "run-1", 1).epsilon_spent == 0.0


def test_decline_then_train_in_another_run(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    declined = Decision("h1", False, "maintenance window", 0.0, 0.0, 10.0, 0.0, 0, 0)
    site.record_decline(declined, "run-0", 1)
    site.train_round(settings, "run-1", 1, weights)
    entries = read_ledger(site.ledger_path)
    assert [e.kind for e in entries] == ["decline", "train"]
    assert entries[0].reason == "maintenance window"
    assert entries[1].prev_hash == entries[0].entry_hash


# -- evaluation --------------------------------------------------------------------------


def test_evaluate_releases_metrics_over_min_cohort(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    loss, n, metrics = site.evaluate(settings, weights)
    assert n == TEST
    assert math.isfinite(loss) and loss > 0
    assert metrics["site-id"] == "h1"
    assert 0 <= metrics["accuracy"] <= 1
    assert 0 <= metrics["auc"] <= 1
    assert "suppressed" not in metrics
    # Evaluation spends no privacy budget.
    assert not site.ledger_path.exists()


def test_evaluate_suppresses_small_cohort(
    site_dir: Path, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    _policy(site_dir, min_cohort=1_000_000)
    loss, n, metrics = Site(site_dir).evaluate(settings, weights)
    assert (loss, n) == (0.0, 0)
    assert "suppressed" in metrics
    assert not {"auc", "accuracy", "loss"} & set(metrics)


def test_evaluate_refuses_a_run_the_policy_forbids(
    site_dir: Path, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    _policy(site_dir, allowed_models=["mlp"])
    loss, n, metrics = Site(site_dir).evaluate(settings, weights)
    assert (loss, n) == (0.0, 0)
    assert "model 'logreg' not allowed" in str(metrics["suppressed"])
    assert not {"auc", "accuracy", "loss"} & set(metrics)


def test_evaluate_releases_fairness_groups_over_min_cohort(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    _, n, metrics = site.evaluate(settings, weights)
    payload = json.loads(str(metrics["fairness"]))
    assert payload["version"] == 1 and payload["kind"] == "binary"
    released, withheld = payload["groups"], payload["suppressed"]
    # Every group of sex and age is either released (with >= 20 patients) or named.
    assert set(released) | set(withheld) == {
        "sex=female", "sex=male", "age=<50", "age=50-64", "age=65+"
    }  # fmt: skip
    assert not set(released) & set(withheld)
    assert all(g["n"] >= 20 for g in released.values())  # the policy's default min_cohort
    for attribute in ("sex=", "age="):
        mine = [g["n"] for name, g in released.items() if name.startswith(attribute)]
        assert not mine or sum(mine) == n or n - sum(mine) >= 20


def test_evaluate_without_fairness_groups_sends_none(
    site: Site, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    off = settings.model_copy(update={"fairness_groups": ""})
    _, _, metrics = site.evaluate(off, weights)
    assert "fairness" not in metrics and "auc" in metrics


def test_suppressed_evaluation_sends_no_fairness(
    site_dir: Path, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    _policy(site_dir, min_cohort=TEST + 1)
    _, _, metrics = Site(site_dir).evaluate(settings, weights)
    assert "suppressed" in metrics and "fairness" not in metrics


def test_small_cohort_hides_train_loss(
    site_dir: Path, settings: RunSettings, weights: list[np.ndarray]
) -> None:
    _policy(site_dir, min_cohort=TRAIN + 1)
    _, n, metrics = Site(site_dir).train_round(settings, "run-1", 1, weights)
    assert n == TRAIN
    assert "train-loss" not in metrics


# -- accounting against what Opacus actually does ----------------------------------------


def _big_site(tmp_path: Path, n_rows: int) -> Path:
    rng = np.random.default_rng(0)
    rows = [
        row(
            f"P{i:05d}",
            age=int(rng.integers(18, 101)),
            bmi=f"{rng.uniform(15, 45):.1f}",
            systolic_bp=int(rng.integers(90, 200)),
            smoking=int(rng.integers(0, 2)),
            outcome=int(rng.random() < 0.3),
        )
        for i in range(n_rows)
    ]
    site_dir = tmp_path / "big" / "site-0"
    site_dir.mkdir(parents=True)
    (site_dir / "clinical.csv").write_text(csv_text(rows))
    return site_dir


def test_recorded_epsilon_never_exceeds_budget(tmp_path: Path) -> None:
    site_dir = _big_site(tmp_path, 1984)  # 1488 train / 496 test
    settings = RunSettings(
        data_root=str(site_dir.parent), num_rounds=1, epsilon=1.0, batch_size=BATCH
    )
    data = load_site_data(site_dir / "clinical.csv", SYNTHETIC_RISK)
    assert len(data) == 1984
    _policy(site_dir, epsilon_budget=10.0)
    site = Site(site_dir)
    planned = site.decide(settings, "run-1", 1)
    assert planned.accept and planned.train_records == 1488
    # The tightest budget that the site's own plan says this round fits in.
    _policy(site_dir, epsilon_budget=round(planned.epsilon_after * 1.001, 6))
    decision = site.decide(settings, "run-1", 1)
    assert decision.accept
    weights = get_weights(build_model("logreg", SYNTHETIC_RISK.num_features, 42))
    site.train_round(settings, "run-1", 1, weights)
    recorded = read_ledger(site.ledger_path)[-1].epsilon
    assert recorded <= decision.epsilon_budget
