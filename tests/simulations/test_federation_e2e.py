"""End to end: a real Flower simulation with DP-SGD sites and SecAgg+.

One federation of four sites covers the paths a run can take: two healthy sites (one
with a few bad CSV rows), a site whose privacy budget is too small (declines every
round), and a site whose CSV lacks a column (refuses with the file and column). A
second run on the same site folders must keep composing epsilon.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from medfed.client.policy import SitePolicy, load_policy, write_policy
from medfed.common.config import RunSettings
from medfed.common.ledger import read_ledger
from medfed.server.checkpoint import load_checkpoint
from medfed.simulations.runner import SimulationPlan, run
from medfed.simulations.synthetic import generate_risk_sites

pytestmark = pytest.mark.slow

ROUNDS = 2


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    data = root / "sites"
    site_dirs = generate_risk_sites(4, data, seed=7, size_scale=0.3)
    for i, d in enumerate(site_dirs):
        budget = 0.01 if i == 2 else 20.0
        write_policy(d / "site.toml", SitePolicy(site_id=f"h{i}", epsilon_budget=budget))
    _corrupt_rows(site_dirs[1] / "clinical.csv")
    _drop_column(site_dirs[3] / "clinical.csv", "smoking")
    first = _run(data, root / "run1")
    second = _run(data, root / "run2")
    return site_dirs, first, second


def _run(data: Path, out: Path):
    settings = RunSettings(
        num_rounds=ROUNDS, epsilon=2.0, data_root=str(data), out_dir=str(out), seed=3
    )
    return run(SimulationPlan(settings=settings, num_sites=4, reference=True))


def _corrupt_rows(csv: Path) -> None:
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    age = header.index("age")
    for lineno in (2, 5):  # file lines 3 and 6
        cells = lines[lineno].split(",")
        cells[age] = "abc" if lineno == 2 else "150"
        lines[lineno] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")


def _drop_column(csv: Path, column: str) -> None:
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    k = rows[0].index(column)
    csv.write_text("\n".join(",".join(r[:k] + r[k + 1 :]) for r in rows) + "\n")


def test_run_completes_with_the_sites_that_can_train(federation):
    _, first, _ = federation
    record = first.run
    assert record["status"] == "completed"
    assert [r["status"] for r in record["rounds"]] == ["aggregated"] * ROUNDS
    for rnd in record["rounds"]:
        assert rnd["participants"] == ["h0", "h1"]
        assert "budget" in rnd["declined"]["h2"]
        assert "clinical.csv" in rnd["declined"]["h3"]
        assert "smoking" in rnd["declined"]["h3"]
    assert record["final_metrics"]["auc"] > 0.6
    assert first.reference is not None and first.reference["auc"] > 0.6


def test_run_json_reports_privacy_and_data_per_site(federation):
    site_dirs, first, _ = federation
    sites = first.run["sites"]
    assert sites["h0"]["rounds_trained"] == ROUNDS
    assert 0 < sites["h0"]["epsilon_spent"] <= 2.0 + 1e-6
    assert sites["h0"]["epsilon_budget"] == 20.0
    assert sites["h1"]["records_skipped"] == 2
    assert sites["h2"]["rounds_declined"] == ROUNDS
    assert sites["h2"]["epsilon_spent"] == 0
    report = json.loads((site_dirs[1] / "data_report.json").read_text())
    assert {(s["line"], s["column"]) for s in report["skipped_rows"]} == {(3, "age"), (6, "age")}


def test_run_json_has_fairness_per_group_and_site(federation):
    _, first, _ = federation
    fairness = first.run["fairness"]
    assert fairness["attributes"] == ["sex", "age"] and fairness["kind"] == "binary"
    assert {"sex=female", "sex=male"} <= set(fairness["groups"])
    female = fairness["groups"]["sex=female"]
    assert female["tp"] + female["fn"] == female["positives"] and female["n"] >= 20
    assert 0 <= female["sensitivity"] <= 1 and female["auc_sites"]
    assert set(fairness["by_site"]) == {"h0", "h1", "h2"}  # h3's data cannot be read
    assert "smoking" in fairness["not_reported"]["h3"]
    for groups in fairness["by_site"].values():
        assert all(g["n"] >= 20 for g in groups.values())  # the default minimum cohort
    assert set(fairness["gaps"]) == {"sex", "age"}
    # The raw per-site strings are not repeated in every round's site metrics.
    assert all("fairness" not in m for r in first.run["rounds"] for m in r["site_metrics"].values())


def test_ledgers_replay_with_an_independent_accountant(federation):
    site_dirs, _, _ = federation
    for d in site_dirs[:2]:
        entries = [e for e in read_ledger(d / "ledger.jsonl") if e.kind == "train"]
        assert len(entries) == 2 * ROUNDS
        assert len({e.dataset_fingerprint for e in entries}) == 1
        accountant = RDPAccountant()
        for e in entries:
            accountant.history.append((e.noise_multiplier, e.sample_rate, e.steps))
            assert accountant.get_epsilon(delta=e.delta) == pytest.approx(e.epsilon, rel=1e-9)


def test_epsilon_keeps_growing_across_runs(federation):
    site_dirs, first, second = federation
    for d in site_dirs[:2]:
        eps = [e.epsilon for e in read_ledger(d / "ledger.jsonl") if e.kind == "train"]
        assert eps == sorted(eps) and eps[-1] > eps[ROUNDS - 1]
        run_ids = [e.run_id for e in read_ledger(d / "ledger.jsonl") if e.kind == "train"]
        assert len(set(run_ids)) == 2
    assert second.run["sites"]["h0"]["epsilon_spent"] > first.run["sites"]["h0"]["epsilon_spent"]


def test_declining_site_records_refusals_and_spends_nothing(federation):
    site_dirs, *_ = federation
    entries = read_ledger(site_dirs[2] / "ledger.jsonl")
    assert entries and all(e.kind == "decline" for e in entries)
    assert all("budget" in e.reason for e in entries)
    assert load_policy(site_dirs[2] / "site.toml").epsilon_budget == 0.01


def test_checkpoints_after_every_round(federation):
    _, first, _ = federation
    for rnd in first.run["rounds"]:
        weights, meta = load_checkpoint(first.out_dir / rnd["checkpoint"])
        assert meta["round"] == rnd["round"]
        assert meta["sha256"] == rnd["model_sha256"]
        assert meta["features"][0] == "age"
        assert weights[0].shape == (1, 6)


def test_every_run_writes_its_model_card(federation):
    _, first, second = federation
    for result in (first, second):
        card = json.loads((result.out_dir / "model_card.json").read_text())
        assert card["model_details"]["run_id"] == result.run["run_id"]
        assert card["metrics"]["overall"] == result.run["final_metrics"]
        declined = {s["site_id"]: s["rounds_declined"] for s in card["privacy"]["sites"]}
        assert declined["h2"] == ROUNDS
        markdown = (result.out_dir / "model_card.md").read_text()
        assert markdown.startswith("# Model card: risk on synthetic")


def test_audit_folder_of_a_real_run_verifies_and_reports(federation):
    """The run's output folder plus the published ledgers is a complete audit folder."""
    from medfed.audit.report import build_report
    from medfed.audit.verify import verify_directory

    _, _, second = federation
    trail = verify_directory(second.out_dir)
    assert trail.ok, trail.problems
    assert sorted(trail.ledgers) == ["h0", "h1", "h2", "h3"]
    assert trail.counts()["round_records"] == ROUNDS
    report = build_report(trail)
    sites = {s["site_id"]: s for s in report["sites"]}
    assert [r["kind"] for r in sites["h0"]["rounds"]] == ["train"] * (2 * ROUNDS)
    assert sites["h0"]["second_opinion"]["flagged"] is False
    assert all(r["kind"] == "decline" and "budget" in r["reason"] for r in sites["h2"]["rounds"])
    # h2 evaluates but never trains, so its ledger (declines only) attests no min cohort.
    check = report["fairness"]["cohort_check"]
    assert check["status"] == "unknown" and check["evidence"].startswith("h2 released")
    assert "not signed" in report["fairness"]["source"]
    checks = {c["check"]: c["status"] for c in report["pitfalls"]}
    assert checks["Poisson sampling (each record in each batch independently)"] == "pass"
    assert checks["Train and test splits disjoint (by patient)"] == "pass"
    assert checks["Secure random number generator for the noise"] == "fail"
