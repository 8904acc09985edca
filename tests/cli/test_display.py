import json
from pathlib import Path

from rich.console import Console

from medfed.cli.display import RoundProgress, summary_tables
from medfed.simulations.runner import SimulationResult

RUN = {
    "settings": {"delta": 1e-5},
    "sites": {
        "a": {
            "site_id": "a",
            "epsilon_spent": 1.23456,
            "epsilon_budget": 10.0,
            "noise_multiplier": 1.1,
            "rounds_trained": 3,
            "rounds_declined": 0,
            "records_used": 100,
            "records_skipped": 2,
        },
    },
    "final_metrics": {"auc": 0.81, "accuracy": 0.75},
}


def _render(tables) -> str:
    console = Console(width=120, record=True)
    for t in tables:
        console.print(t)
    return console.export_text()


def test_summary_shows_budget_records_and_reference():
    result = SimulationResult(Path("."), [], RUN, {"auc": 0.83}, 1.0)
    text = _render(summary_tables(result))
    assert "1.235/10" in text and "100" in text and "2" in text
    assert "0.8100" in text and "0.8300" in text and "pooled" in text


def test_summary_without_reference_has_no_reference_column():
    text = _render(summary_tables(SimulationResult(Path("."), [], RUN, None, 1.0)))
    assert "pooled" not in text


def test_progress_prints_declines_and_round_results():
    console = Console(width=120, record=True)
    with RoundProgress(console, 2) as progress:
        progress(
            {
                "event": "asked",
                "round": 1,
                "accepted": ["a"],
                "declined": {"b": "privacy budget: spent"},
            }
        )
        progress(
            {
                "event": "round-end",
                "round": 1,
                "status": "skipped",
                "participants": [],
                "aggregate_metrics": {},
                "note": "only 1 site",
            }
        )
    text = console.export_text()
    assert "b declined" in text and "privacy budget" in text and "only 1 site" in text


def _fairness() -> dict:
    from medfed.server.fairness import combine

    def group(tp: int, fp: int, tn: int, fn: int, auc: float) -> dict:
        n = tp + fp + tn + fn
        counts = {"n": n, "positives": tp + fn, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
        return {**counts, "auc": auc, "mean_predicted": 0.4, "observed_rate": (tp + fn) / n,
                "ece": 0.1}  # fmt: skip

    reports = {
        "a": {"fairness": json.dumps({"version": 1, "suppressed": ["age=65+"], "groups": {
            "sex=female": group(8, 2, 28, 2, 0.81), "sex=male": group(9, 3, 25, 3, 0.74)}})},
        "b": {"suppressed": "test split of 9 is below the minimum cohort"},
    }  # fmt: skip
    return combine(reports, ("sex", "age"))


def test_summary_shows_fairness_per_group_gaps_and_withheld_groups():
    run = {**RUN, "fairness": _fairness()}
    text = _render(summary_tables(SimulationResult(Path("."), [], run, None, 1.0)))
    assert "Fairness" in text and "sex=female" in text and "sex=male" in text
    assert "0.8000" in text  # female sensitivity 8/10, pooled from counts
    assert "0.0700" in text and "(sex=male)" in text  # AUC gap 0.81 - 0.74, worst group
    assert "n-weighted mean of per-site AUCs" in text
    assert "a: age=65+" in text  # withheld group named, no count
    assert "b: no subgroup figures" in text and "below the minimum cohort" in text


def test_summary_without_fairness_has_no_fairness_table():
    text = _render(summary_tables(SimulationResult(Path("."), [], RUN, None, 1.0)))
    assert "Fairness" not in text
