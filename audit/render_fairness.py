"""The report's Fairness section: the global model per subgroup, from run.json.

The figures come from the coordinator's run.json, which is not signed: the section
says so first, then shows the pooled per-group metrics, the gap between the groups of
each attribute, each site's own group figures, which groups sites withheld below their
minimum cohort, and whether every released group covers the site's signed minimum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medfed.audit.render_document import (
    Block,
    Bullets,
    Cell,
    Code,
    Facts,
    Heading,
    Para,
    Status,
    Table,
    as_dict,
    as_strings,
    as_text,
    integer,
    num,
)

BINARY_METRICS = (
    ("auc", "AUC*"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("observed_rate", "Observed rate"),
    ("mean_predicted", "Mean predicted"),
    ("calibration_gap", "Calibration gap"),
    ("ece", "ECE*"),
)
REGRESSION_METRICS = (("mae", "MAE"), ("rmse", "RMSE"), ("bias", "Bias"))
# The metrics the coordinator computes gaps for (server.fairness BINARY_WORST).
BINARY_GAPS = tuple(m for m in BINARY_METRICS if m[0] not in ("observed_rate", "mean_predicted"))
BINARY_FOOTNOTE = (
    "Sensitivity, specificity, observed rate, mean predicted risk and the calibration gap "
    "(mean predicted minus observed) are pooled exactly from the sites' summed counts. "
    "*AUC and ECE cannot be pooled from per-site figures: they are n-weighted means of the "
    "per-site values (the ECE mean is an upper bound on the pooled ECE)."
)
_CHECK = {
    "pass": Status("pass", "PASS"),
    "fail": Status("fail", "FAIL"),
}


def fairness_section(report: Mapping[str, Any]) -> list[Block]:
    """Per-group and per-site metrics and gaps, labelled as unsigned run.json content."""
    fairness = report.get("fairness")
    if not isinstance(fairness, Mapping):
        return [
            Para(
                "run.json records no fairness evaluation (it was turned off, no site "
                "released subgroup figures, or the run predates it)."
            )
        ]
    metrics = REGRESSION_METRICS if fairness.get("kind") == "regression" else BINARY_METRICS
    check = as_dict(fairness.get("cohort_check"))
    blocks: list[Block] = [
        Para(as_text(fairness.get("source")) or "Source: run.json (not signed).", _UNSIGNED),
        Facts(
            [
                ("Attributes", ", ".join(as_strings(fairness.get("attributes"))) or "—"),
                ("Decision threshold", num(fairness.get("threshold"))),
                ("Group sizes vs signed minimum cohort", _check(check.get("status"))),
            ]
        ),
        Para(as_text(check.get("evidence")) or "No cohort check was made."),
        _groups_table(as_dict(fairness.get("groups")), metrics),
    ]
    if metrics is BINARY_METRICS:
        blocks.append(Para(BINARY_FOOTNOTE))
    blocks += [
        Heading(3, "Gap between groups"),
        Para("Largest minus smallest group value of each metric, and the worst group."),
        _gaps_table(
            as_dict(fairness.get("gaps")), BINARY_GAPS if metrics is BINARY_METRICS else metrics
        ),
        Heading(3, "Groups by site"),
        _by_site_table(as_dict(fairness.get("by_site")), metrics),
        Bullets("Groups withheld below a site's minimum cohort", _per_site(fairness, "suppressed"),
                empty="No group was withheld."),
        Bullets("Sites with missing subgroup figures", _without(fairness), empty="None."),
    ]  # fmt: skip
    if as_text(fairness.get("note")):
        blocks.append(Para(as_text(fairness.get("note"))))
    return blocks


_UNSIGNED = Status("warn", "UNSIGNED")


def _check(status: object) -> Status:
    return _CHECK.get(as_text(status), Status("unknown", "UNKNOWN"))


def _groups_table(groups: Mapping[str, Any], metrics: tuple[tuple[str, str], ...]) -> Table:
    rows: list[list[Cell]] = [
        [
            Code(as_text(name)),
            integer(as_dict(g).get("n")),
            ", ".join(as_strings(as_dict(g).get("sites"))),
            *(num(as_dict(g).get(key)) for key, _ in metrics),
        ]
        for name, g in groups.items()
    ]
    headers = ["Group", "n", "Sites", *(label for _, label in metrics)]
    return Table(headers, rows, empty="No group figures were released.")


def _gaps_table(gaps: Mapping[str, Any], metrics: tuple[tuple[str, str], ...]) -> Table:
    rows: list[list[Cell]] = []
    for attribute, entry in gaps.items():
        values = as_dict(entry)
        worst = as_dict(values.get("worst_group"))
        cells = [
            f"{num(values.get(key))} (worst: {as_text(worst.get(key))})"
            if worst.get(key)
            else num(values.get(key))
            for key, _ in metrics
        ]
        rows.append([Code(as_text(attribute)), *cells])
    headers = ["Attribute", *(label for _, label in metrics)]
    return Table(headers, rows, empty="Fewer than two groups of any attribute were released.")


def _by_site_table(by_site: Mapping[str, Any], metrics: tuple[tuple[str, str], ...]) -> Table:
    rows: list[list[Cell]] = [
        [
            Code(as_text(site)),
            Code(as_text(name)),
            integer(as_dict(g).get("n")),
            *(num(as_dict(g).get(key)) for key, _ in metrics),
        ]
        for site, groups in by_site.items()
        for name, g in as_dict(groups).items()
    ]
    headers = ["Site", "Group", "n", *(label.rstrip("*") for _, label in metrics)]
    return Table(headers, rows, empty="No site released group figures.")


def _per_site(fairness: Mapping[str, Any], key: str) -> list[str]:
    return [
        f"{as_text(site)}: {', '.join(as_strings(names)) or as_text(names)}"
        for site, names in as_dict(fairness.get(key)).items()
    ]


def _without(fairness: Mapping[str, Any]) -> list[str]:
    """Sites whose figures are missing in part (attributes unavailable) or in whole, with why."""
    items = []
    for key, what in (
        ("unavailable", "attributes unavailable"),
        ("ignored", "report ignored"),
        ("not_reported", "not reported"),
    ):
        items += [
            f"{as_text(site)}: {what}: {as_text(why)}"
            for site, why in as_dict(fairness.get(key)).items()
        ]
    return items
