"""The coordinator's fairness view: pooling the sites' per-group aggregates."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medfed.client.fairness import binary_metrics, regression_metrics, site_fairness
from medfed.common.tasks import SYNTHETIC_REHAB, SYNTHETIC_RISK
from medfed.server.fairness import AUC_METHOD, combine, parse_report
from medfed.server.run_record import RunRecord


def _group(tp: int, fp: int, tn: int, fn: int, auc: float | None, mean: float) -> dict:
    n = tp + fp + tn + fn
    return {
        "n": n,
        "positives": tp + fn,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "auc": auc,
        "mean_predicted": mean,
        "observed_rate": (tp + fn) / n,
        "ece": 0.1,
    }


def _report(groups: dict, suppressed: list[str] = (), **extra) -> dict:
    payload = {"version": 1, "kind": "binary", "threshold": 0.5, "groups": groups}
    payload["suppressed"] = list(suppressed)
    return {"num_examples": 100, "loss": 0.5, "fairness": json.dumps({**payload, **extra})}


def _raw(groups: dict, **extra) -> str:
    return json.dumps({"version": 1, "groups": groups, "suppressed": [], **extra})


GOOD = _group(1, 1, 1, 1, 0.5, 0.5)
REPORTS = {
    "a": _report(
        {"sex=female": _group(8, 4, 30, 2, 0.80, 0.30), "sex=male": _group(10, 6, 20, 4, 0.7, 0.5)}
    ),
    "b": _report({"sex=female": _group(12, 2, 40, 8, 0.90, 0.25)}, ["sex=male"]),
}


def test_sensitivity_and_specificity_are_pooled_from_summed_counts() -> None:
    out = combine(REPORTS, ("sex",))
    female = out["groups"]["sex=female"]
    assert female["n"] == 44 + 62 and female["sites"] == ["a", "b"]
    assert female["sensitivity"] == pytest.approx((8 + 12) / (8 + 2 + 12 + 8))
    assert female["specificity"] == pytest.approx((30 + 40) / (30 + 4 + 40 + 2))
    # Not the mean of the per-site sensitivities (0.8 and 0.6): pooled, exactly.
    assert female["sensitivity"] != pytest.approx((0.8 + 0.6) / 2)
    assert female["observed_rate"] == pytest.approx(30 / 106)
    mean = (0.30 * 44 + 0.25 * 62) / 106
    assert female["mean_predicted"] == pytest.approx(mean)
    assert female["calibration_gap"] == pytest.approx(mean - 30 / 106)
    assert female["auc"] == pytest.approx((0.80 * 44 + 0.90 * 62) / 106)
    assert female["auc_method"] == AUC_METHOD
    assert out["groups"]["sex=male"]["sites"] == ["a"]
    assert out["by_site"]["b"]["sex=female"]["sensitivity"] == pytest.approx(12 / 20)
    assert out["suppressed"] == {"b": ["sex=male"]}
    assert out["threshold"] == 0.5 and out["attributes"] == ["sex"]
    assert "n-weighted mean of per-site AUCs" in out["note"]


def test_pooled_counts_equal_those_of_the_pooled_patients() -> None:
    """Two sites' reports of real data pool to the figures of their patients together."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200).astype(float)
    prob = np.clip(0.5 * y + rng.uniform(0, 0.6, 200), 0, 1)
    reports = {
        site: {"fairness": json.dumps({"version": 1, "groups": {"sex=female": binary_metrics(
            y[part], prob[part])}, "suppressed": []})}
        for site, part in (("a", slice(0, 80)), ("b", slice(80, 200)))
    }  # fmt: skip
    pooled, whole = combine(reports)["groups"]["sex=female"], binary_metrics(y, prob)
    for key in ("n", "positives", "tp", "fp", "tn", "fn"):
        assert pooled[key] == whole[key]
    assert pooled["mean_predicted"] == pytest.approx(whole["mean_predicted"])
    assert pooled["observed_rate"] == pytest.approx(whole["observed_rate"])
    # AUC is a weighted mean of per-site AUCs, close to but not the pooled AUC.
    assert pooled["auc"] != pytest.approx(roc_auc_score(y, prob), abs=1e-12)
    assert pooled["ece"] >= whole["ece"] - 1e-12  # the weighted ECE bounds the pooled one


def test_gaps_and_worst_groups() -> None:
    gaps = combine(REPORTS, ("sex",))["gaps"]["sex"]
    groups = combine(REPORTS, ("sex",))["groups"]
    f, m = groups["sex=female"], groups["sex=male"]
    assert gaps["sensitivity"] == pytest.approx(abs(f["sensitivity"] - m["sensitivity"]))
    assert gaps["auc"] == pytest.approx(abs(f["auc"] - m["auc"]))
    assert gaps["worst_group"]["auc"] == "sex=male"
    assert gaps["worst_group"]["sensitivity"] == "sex=female"  # 20/30 against 10/14
    worst_cal = max(("sex=female", "sex=male"), key=lambda g: abs(groups[g]["calibration_gap"]))
    assert gaps["worst_group"]["calibration_gap"] == worst_cal


def test_an_attribute_with_one_released_group_has_no_gap() -> None:
    out = combine({"b": REPORTS["b"]}, ("sex", "age"))
    assert out["gaps"]["sex"]["auc"] is None and out["gaps"]["sex"]["worst_group"] == {}
    assert out["groups"]["sex=female"]["auc_method"] == "the one site's AUC"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("not json", "not JSON"),
        ('{"version": 2, "groups": {}}', "version"),
        (_raw({"sex=female": {"n": 3}}), "not a count"),
        (_raw({"sex=x": {**GOOD, "tp": 5}}), "do not add up"),
        (_raw({"female": GOOD}), "attribute=value"),
        (_raw({"sex=f": {**GOOD, "ece": "NaN"}}), "finite"),
        (_raw({"sex=f": GOOD}, kind="survival"), "unknown kind"),
        (7, "expected a JSON string"),
    ],
)
def test_a_malformed_report_is_ignored_for_that_site(raw: object, why: str) -> None:
    reports = {**REPORTS, "c": {"fairness": raw}}
    out = combine(reports, ("sex",))
    assert why in out["ignored"]["c"]
    assert "c" not in out["by_site"] and all("c" not in g["sites"] for g in out["groups"].values())
    assert out["groups"]["sex=female"]["n"] == 106  # the others still count
    assert "Report of c ignored" in out["note"]


def test_sites_without_a_report_are_listed_with_why() -> None:
    reports = {**REPORTS, "small": {"suppressed": "test split of 5 is below the minimum cohort"}}
    out = combine(reports, ("sex",))
    assert out["not_reported"] == {"small": "test split of 5 is below the minimum cohort"}
    assert combine({"small": reports["small"]}) == {}
    assert combine({}) == {}


def test_unavailable_subgroups_are_stated() -> None:
    reports = {"x": {"fairness": _raw({}, unavailable="not read from DICOM")}}
    out = combine(reports, ("sex", "age"))
    assert out["groups"] == {} and out["unavailable"] == {"x": "not read from DICOM"}
    assert "not read from DICOM" in out["note"]


def test_regression_pools_mae_rmse_and_bias_exactly() -> None:
    rng = np.random.default_rng(3)
    y, out = rng.uniform(0, 1, 90), rng.uniform(0, 1, 90)
    reports = {
        site: {"fairness": json.dumps({"version": 1, "kind": "regression", "suppressed": [],
               "groups": {"sex=male": regression_metrics(y[p], out[p], SYNTHETIC_REHAB)}})}
        for site, p in (("a", slice(0, 30)), ("b", slice(30, 90)))
    }  # fmt: skip
    result = combine(reports, ("sex",))
    male, whole = result["groups"]["sex=male"], regression_metrics(y, out, SYNTHETIC_REHAB)
    assert result["kind"] == "regression" and "threshold" not in result
    for key in ("mae", "rmse", "bias"):
        assert male[key] == pytest.approx(whole[key])
    assert set(result["gaps"]["sex"]) == {"mae", "rmse", "bias", "worst_group"}


def test_a_site_report_round_trips_through_the_coordinator() -> None:
    rng = np.random.default_rng(4)
    X = np.zeros((40, SYNTHETIC_RISK.num_features), dtype=np.float32)
    X[:, 1] = np.arange(40) % 2  # sex
    y = (np.arange(40) % 3 == 0).astype(float)
    payload = site_fairness(X, y, rng.normal(size=40), SYNTHETIC_RISK, ("sex",), (50,), 10)
    parsed = parse_report(json.dumps(payload))
    assert set(parsed["groups"]) == {"sex=female", "sex=male"}
    assert all(math.isfinite(g["ece"]) for g in parsed["groups"].values())


def test_run_record_keeps_fairness_and_reads_old_records() -> None:
    record = RunRecord(run_id="r", settings={}, secure_aggregation={})
    assert record.fairness == {}
    old = {"run_id": "r", "settings": {}, "secure_aggregation": {}}
    assert RunRecord.from_dict(old).fairness == {}
    record.fairness = combine(REPORTS, ("sex",))
    again = RunRecord.from_dict(json.loads(json.dumps(asdict(record))))
    assert again.fairness == record.fairness
