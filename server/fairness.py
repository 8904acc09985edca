"""The coordinator's fairness view: per-group and per-site metrics from the sites' reports.

Each site sends one ``fairness`` string metric (:mod:`medfed.client.fairness`) holding
per-group aggregates over at least its minimum cohort. This module combines them:

- sensitivity, specificity, observed rate, mean predicted risk and the calibration gap
  (mean predicted minus observed) are pooled *exactly*, from summed counts and
  n-weighted sums;
- AUC cannot be pooled from per-site AUCs (it needs the patients' scores), so a group's
  AUC is the n-weighted mean of the per-site AUCs, and says so (``auc_method``);
- ECE is likewise the n-weighted mean of per-site ECEs, an upper bound on the pooled ECE
  (per bin, |sum of differences| <= sum of |differences|);
- regression MAE, RMSE and bias pool exactly (n-weighted MAE and bias, root of the
  n-weighted mean squared error).

The gap of an attribute is the largest minus the smallest group value of each metric,
with the worst group. A report that cannot be read is left out for that site, with a
note; it never stops the run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from medfed.common.messages import FAIRNESS_KEY, SUPPRESSED_KEY
from medfed.common.subgroups import MISSING_LABEL, attribute_of

SUPPORTED_VERSION = 1
AUC_METHOD = "n-weighted mean of per-site AUCs"
ECE_METHOD = "n-weighted mean of per-site ECEs (an upper bound on the pooled ECE)"
BINARY_COUNTS = ("n", "positives", "tp", "fp", "tn", "fn")
BINARY_RATES = ("mean_predicted", "observed_rate", "ece")
REGRESSION_FIELDS = ("mae", "rmse", "bias")
# metric -> how the worst group is chosen: lowest value, highest, or largest magnitude
BINARY_WORST = {
    "auc": "low",
    "sensitivity": "low",
    "specificity": "low",
    "calibration_gap": "abs",
    "ece": "high",
}
REGRESSION_WORST = {"mae": "high", "rmse": "high", "bias": "abs"}


class ReportError(ValueError):
    """A site's fairness report does not have the expected shape."""


def combine(
    eval_reports: Mapping[str, Mapping[str, Any]], attributes: Sequence[str] = ()
) -> dict[str, Any]:
    """Combine the sites' fairness reports; ``{}`` when no site sent one.

    ``eval_reports`` maps site id to the site's evaluation reply (as the strategy keeps
    it); ``attributes`` orders the attributes (the run's ``fairness-groups``).
    """
    parsed: dict[str, dict[str, Any]] = {}
    ignored: dict[str, str] = {}
    not_reported: dict[str, str] = {}
    for site, report in sorted(eval_reports.items()):
        raw = report.get(FAIRNESS_KEY)
        if raw is None:
            not_reported[site] = str(report.get(SUPPRESSED_KEY) or "no fairness report")
            continue
        try:
            parsed[site] = parse_report(raw)
        except ReportError as exc:
            ignored[site] = str(exc)
    if not parsed and not ignored:
        return {}
    kind = _kind(parsed)
    for site in [s for s, p in parsed.items() if p["groups"] and p["kind"] != kind]:
        ignored[site] = f"a {parsed.pop(site)['kind']} report in a {kind} run"
    by_site = {site: _site_view(p, kind) for site, p in parsed.items() if p["groups"]}
    groups = _pool_groups(parsed, kind, attributes)
    seen = [attribute_of(g) for g in groups] + [
        attribute_of(g) for p in parsed.values() for g in p["suppressed"]
    ]
    order = [a for a in attributes if a in seen] + sorted(set(seen) - set(attributes))
    result: dict[str, Any] = {
        "attributes": order or list(attributes),
        "kind": kind,
        "groups": groups,
        "by_site": by_site,
        "gaps": _gaps(groups, order, kind),
        "suppressed": {s: p["suppressed"] for s, p in parsed.items() if p["suppressed"]},
        "unavailable": {s: p["unavailable"] for s, p in parsed.items() if p["unavailable"]},
        "not_reported": not_reported,
        "ignored": ignored,
    }
    if kind == "binary":
        result["threshold"] = _threshold(parsed)
    result["note"] = _note(result)
    return result


# -- reading a site's report ---------------------------------------------------------------
def parse_report(raw: object) -> dict[str, Any]:
    """A site's ``fairness`` string as a checked dict; ReportError says what is wrong."""
    if not isinstance(raw, str):
        kind = type(raw).__name__
        raise ReportError(f"malformed fairness report: expected a JSON string, got {kind}")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ReportError(f"malformed fairness report: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ReportError("malformed fairness report: expected a JSON object")
    if data.get("version") != SUPPORTED_VERSION:
        raise ReportError(f"unsupported fairness report version {data.get('version')!r}")
    groups, suppressed = data.get("groups", {}), data.get("suppressed", [])
    if not isinstance(groups, dict) or not isinstance(suppressed, list):
        raise ReportError("malformed fairness report: 'groups' or 'suppressed' has the wrong type")
    if not all(isinstance(g, str) and "=" in g for g in [*groups, *suppressed]):
        raise ReportError("malformed fairness report: a group name is not 'attribute=value'")
    kind = data.get("kind") or _inferred_kind(groups)
    if kind not in ("binary", "regression"):
        raise ReportError(f"malformed fairness report: unknown kind {kind!r}")
    checked = {name: _check_group(name, g, kind) for name, g in groups.items()}
    unavailable = data.get("unavailable", "")
    return {
        "kind": kind,
        "threshold": _number(data.get("threshold", 0.5), "threshold"),
        "groups": checked,
        "suppressed": [str(g) for g in suppressed],
        "unavailable": str(unavailable) if unavailable else "",
    }


def _inferred_kind(groups: Mapping[str, Any]) -> str:
    """A report without ``kind``: regression if its groups carry MAE, else binary."""
    has_mae = any(isinstance(g, dict) and "mae" in g for g in groups.values())
    return "regression" if has_mae else "binary"


def _check_group(name: str, group: object, kind: str) -> dict[str, Any]:
    if not isinstance(group, dict):
        raise ReportError(f"malformed fairness report: group {name!r} is not an object")
    if kind == "regression":
        out = {"n": _count(group, "n", name)}
        out.update({k: _number(group.get(k), f"{name}.{k}") for k in REGRESSION_FIELDS})
        return out
    out = {k: _count(group, k, name) for k in BINARY_COUNTS}
    if (
        out["tp"] + out["fn"] != out["positives"]
        or sum(out[k] for k in ("tp", "fp", "tn", "fn")) != out["n"]
    ):
        raise ReportError(f"malformed fairness report: counts of {name!r} do not add up")
    out.update({k: _number(group.get(k), f"{name}.{k}") for k in BINARY_RATES})
    auc = group.get("auc")
    out["auc"] = None if auc is None else _number(auc, f"{name}.auc")
    return out


def _count(group: Mapping[str, Any], key: str, name: str) -> int:
    value = group.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ReportError(f"malformed fairness report: {name}.{key} is not a count")
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReportError(f"malformed fairness report: {where} is not a finite number")
    return float(value)


def _kind(parsed: Mapping[str, Mapping[str, Any]]) -> str:
    """The run's kind: that of the sites' reports with groups (the most common one)."""
    kinds = [p["kind"] for p in parsed.values() if p["groups"]]
    return max(("binary", "regression"), key=kinds.count)


def _threshold(parsed: Mapping[str, Mapping[str, Any]]) -> float | str:
    values = {p["threshold"] for p in parsed.values() if p["groups"]}
    if len(values) > 1:
        return "mixed"
    return values.pop() if values else 0.5


# -- combining -----------------------------------------------------------------------------
def _site_view(report: Mapping[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: _summarise([(None, g)], kind) for name, g in report["groups"].items()}


def _pool_groups(
    parsed: Mapping[str, Mapping[str, Any]], kind: str, attributes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    members: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for site, report in parsed.items():
        for name, group in report["groups"].items():
            members.setdefault(name, []).append((site, group))
    rank = {a: i for i, a in enumerate(attributes)}
    order = sorted(
        members,
        key=lambda g: (rank.get(attribute_of(g), len(rank)), attribute_of(g), _value_order(g)),
    )
    return {name: _summarise(members[name], kind) for name in order}


def _value_order(group: str) -> tuple[int, float, str]:
    """Groups of one attribute in reading order: <50, 50-64, 65+; codes by number;
    names (female, male) alphabetically; ``missing`` last."""
    label = group.split("=", 1)[1]
    if label == MISSING_LABEL:
        return (2, 0.0, label)
    number = re.match(r"<?(-?\d+(?:\.\d+)?)", label)
    if number is None:
        return (1, 0.0, label)
    return (0, float(number.group(1)) - (0.5 if label.startswith("<") else 0.0), label)


def _summarise(members: list[tuple[str | None, dict[str, Any]]], kind: str) -> dict[str, Any]:
    """One group over the sites that released it (a single site: that site's view)."""
    n = sum(g["n"] for _, g in members)
    sites = [s for s, _ in members if s is not None]
    out: dict[str, Any] = {"n": n} if not sites else {"n": n, "sites": sites}
    if kind == "regression":
        out["mae"] = _weighted(members, "mae")
        out["bias"] = _weighted(members, "bias")
        out["rmse"] = math.sqrt(sum(g["rmse"] ** 2 * g["n"] for _, g in members) / n) if n else None
        return out
    total = {k: sum(g[k] for _, g in members) for k in ("positives", "tp", "fp", "tn", "fn")}
    with_auc = [(s, g) for s, g in members if g["auc"] is not None]
    out.update(total)
    out["auc"] = _weighted(with_auc, "auc")
    if sites:
        out["auc_method"] = AUC_METHOD if len(with_auc) > 1 else "the one site's AUC"
        out["auc_sites"] = [s for s, _ in with_auc]
    out["sensitivity"] = _ratio(total["tp"], total["tp"] + total["fn"])
    out["specificity"] = _ratio(total["tn"], total["tn"] + total["fp"])
    out["observed_rate"] = _ratio(total["positives"], n)
    out["mean_predicted"] = _weighted(members, "mean_predicted")
    gap = None
    if out["mean_predicted"] is not None and out["observed_rate"] is not None:
        gap = out["mean_predicted"] - out["observed_rate"]
    out["calibration_gap"] = gap
    out["ece"] = _weighted(members, "ece")
    return out


def _weighted(members: Sequence[tuple[Any, Mapping[str, Any]]], key: str) -> float | None:
    n = sum(g["n"] for _, g in members)
    return sum(g[key] * g["n"] for _, g in members) / n if n else None


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _gaps(
    groups: Mapping[str, Mapping[str, Any]], attributes: Sequence[str], kind: str
) -> dict[str, dict[str, Any]]:
    """Per attribute: max - min of each metric over its groups, and the worst group."""
    rules = REGRESSION_WORST if kind == "regression" else BINARY_WORST
    gaps: dict[str, dict[str, Any]] = {}
    for attribute in attributes:
        mine = {g: v for g, v in groups.items() if attribute_of(g) == attribute}
        entry: dict[str, Any] = {}
        worst: dict[str, str] = {}
        for metric, rule in rules.items():
            values = {g: v[metric] for g, v in mine.items() if v.get(metric) is not None}
            if len(values) < 2:
                entry[metric] = None
                continue
            # Rounded so that equal groups show a gap of 0, not float noise (1e-17).
            entry[metric] = round(max(values.values()) - min(values.values()), 12)
            if entry[metric] > 0:  # equal groups have no worst one
                worst[metric] = _worst(values, rule)
        entry["worst_group"] = worst
        gaps[attribute] = entry
    return gaps


def _worst(values: Mapping[str, float], rule: str) -> str:
    """The group with the lowest value, the highest, or the largest magnitude."""
    if rule == "low":
        return min(values, key=lambda g: values[g])
    if rule == "high":
        return max(values, key=lambda g: values[g])
    return max(values, key=lambda g: abs(values[g]))


def _note(result: Mapping[str, Any]) -> str:
    parts = []
    if result["kind"] == "binary":
        parts.append(
            f"Sensitivity, specificity, observed rate and calibration gap are pooled exactly "
            f"from the sites' summed counts (threshold {result.get('threshold')}); AUC is the "
            f"{AUC_METHOD} (not a pooled AUC); ECE is the {ECE_METHOD}."
        )
    else:
        parts.append("MAE, RMSE and bias are pooled exactly from the sites' group aggregates.")
    parts.append("Groups under a site's minimum cohort are withheld by the site and not counted.")
    for site, why in result["ignored"].items():
        parts.append(f"Report of {site} ignored: {why}.")
    for site, why in result["unavailable"].items():
        parts.append(f"{site}: {why}.")
    return " ".join(parts)
