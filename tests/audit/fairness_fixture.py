"""A report's ``fairness`` part as :func:`medfed.audit.report.build_report` makes it.

Built by the coordinator's real :func:`medfed.server.fairness.combine` from hand-made
site reports, so it has exactly the schema a run writes into run.json.
"""

from __future__ import annotations

import json
from typing import Any

from medfed.audit.report import FAIRNESS_SOURCE
from medfed.server.fairness import combine


def group(tp: int, fp: int, tn: int, fn: int, auc: float | None, mean: float) -> dict[str, Any]:
    """One group's figures as a site releases them."""
    n = tp + fp + tn + fn
    counts = {"n": n, "positives": tp + fn, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    return {**counts, "auc": auc, "mean_predicted": mean, "observed_rate": (tp + fn) / n,
            "ece": 0.08}  # fmt: skip


def site_reports() -> dict[str, dict[str, Any]]:
    """Three sites: one withholds two age bands, one has no figures at all."""

    def released(groups: dict[str, Any], suppressed: list[str]) -> dict[str, Any]:
        payload = {"version": 1, "kind": "binary", "threshold": 0.5, "groups": groups,
                   "suppressed": suppressed}  # fmt: skip
        return {"num_examples": 120, "fairness": json.dumps(payload)}

    return {
        "st-marys-london": released(
            {
                "sex=female": group(14, 6, 36, 4, 0.84, 0.31),
                "sex=male": group(17, 9, 26, 8, 0.77, 0.36),
                "age=<50": group(9, 4, 40, 2, 0.88, 0.22),
                "age=50-64": group(12, 6, 14, 3, 0.80, 0.41),
                "age=65+": group(10, 5, 8, 7, 0.69, 0.47),
            },
            [],
        ),
        "northgate-general": released(
            {
                "sex=female": group(11, 4, 25, 5, 0.82, 0.30),
                "sex=male": group(13, 7, 19, 6, 0.74, 0.39),
                "age=65+": group(20, 9, 20, 10, 0.71, 0.45),
            },
            ["age=<50", "age=50-64"],
        ),
        "riverside-childrens": {"suppressed": "test split of 14 is below the minimum cohort"},
    }


def fairness_part() -> dict[str, Any]:
    """The report's ``fairness`` value: run.json's, labelled, with a passing cohort check."""
    combined = combine(site_reports(), ("sex", "age"))
    check = {"status": "pass", "evidence": "all 8 per-site group release(s) cover at least "
             "the site's minimum cohort attested in its signed ledger"}  # fmt: skip
    return {"source": FAIRNESS_SOURCE, **combined, "cohort_check": check}
