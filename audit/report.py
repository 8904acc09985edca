"""`medfed audit report`: the verified audit folder as one report (a JSON-able dict).

The report is built only from what :func:`medfed.audit.verify.verify_directory` read and
checked; renderers (:mod:`medfed.audit.render`) turn it into HTML, Markdown or JSON.
A report of a folder that fails verification says so first and lists every problem.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from medfed.audit.pitfalls import _min_cohorts, pitfall_checks
from medfed.audit.second_opinion import second_opinion
from medfed.audit.statements import privacy_statement, threat_model
from medfed.audit.verify import AuditTrail
from medfed.common.ledger import LedgerEntry, spends_for
from medfed.common.privacy import epsilon_of

EMPIRICAL_DIR = "empirical"
FAIRNESS_SOURCE = (
    "run.json: the coordinator's record, which is not signed. The figures are the "
    "sites' per-subgroup aggregates as the coordinator combined them; no signature "
    "covers them, so they are reported, not verified."
)


def build_report(trail: AuditTrail) -> dict[str, Any]:
    """The report dict (schema in :mod:`medfed.audit.render`)."""
    run = trail.run or {}
    secure = _secure_aggregation(run, trail)
    return {
        "title": "medfed privacy audit",
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "directory": str(trail.directory),
        "medfed_version": _version(),
        "verification": trail.summary(),
        "run": _run(trail),
        "secure_aggregation": secure,
        "threat_model": threat_model(secure["protocol"], trail.keys.anchored),
        "privacy_statement": privacy_statement(trail.ledgers, secure["protocol"]),
        "sites": [_site(site, entries, trail) for site, entries in sorted(trail.ledgers.items())],
        "pitfalls": pitfall_checks(trail.ledgers, trail.run),
        "empirical": _empirical(trail.directory / EMPIRICAL_DIR),
        "fairness": _fairness(run, trail.ledgers),
    }


def _version() -> str:
    try:
        return version("medfed")
    except PackageNotFoundError:
        return "unknown"


def _run(trail: AuditTrail) -> dict[str, Any] | None:
    """The run in the folder, its rounds taken from the signed round records."""
    run = trail.run
    run_id = (run or {}).get("run_id") or (trail.rounds[-1].run_id if trail.rounds else None)
    if run_id is None:
        return None
    settings = (run or {}).get("settings", {})
    rounds = [r for r in trail.rounds if r.run_id == run_id]
    return {
        "run_id": run_id,
        "task": settings.get("task", "?"),
        "dataset": settings.get("dataset", "?"),
        "model": settings.get("model", "?"),
        "rounds_planned": int(settings.get("num_rounds", len(rounds))),
        "status": (run or {}).get("status", "unknown (no run.json)"),
        "rounds": [
            {
                "round": r.round,
                "status": r.status,
                "participants": list(r.participants),
                "declined": dict(r.declined),
                "model_sha256": r.model_sha256,
            }
            for r in rounds
        ],
    }


def _secure_aggregation(run: dict[str, Any], trail: AuditTrail) -> dict[str, Any]:
    described = dict(run.get("secure_aggregation") or {})
    used = sorted({r.secure_aggregation for r in trail.rounds})
    protocol = described.pop("protocol", None) or (used[-1] if used else None)
    protocol = {"flower-secagg+": "flower"}.get(protocol, protocol)
    note = str(described.pop("note", ""))
    if used:
        note = f"{note} Signed round records show: {', '.join(used)}.".strip()
    settings = {k: v for k, v in described.items() if isinstance(v, str | int | float | bool)}
    return {"protocol": protocol or "unknown", "settings": settings, "note": note}


def _site(site: str, entries: list[LedgerEntry], trail: AuditTrail) -> dict[str, Any]:
    spends = [e for e in entries if e.kind == "train"]
    latest = spends[-1] if spends else (entries[-1] if entries else None)
    budget = latest.epsilon_budget if latest and latest.epsilon_budget > 0 else None
    delta = spends[-1].delta if spends else 0.0
    datasets = _datasets(spends, budget)
    current = datasets[-1] if datasets else None
    spent = current["epsilon_spent"] if current else 0.0
    k = max((e.samples_per_patient for e in spends), default=1)
    opinion = None
    if spends:
        history = spends_for(entries, spends[-1].dataset_fingerprint)
        opinion = second_opinion(history, delta, spent).to_dict()
    return {
        "site_id": site,
        "signer": latest.signer if latest else "",
        "epsilon_budget": budget,
        "delta": delta,
        "accountant": spends[-1].accountant if spends else "rdp",
        "samples_per_patient": k,
        "unit_of_privacy": "one patient" if k == 1 else f"one patient (up to {k} samples)",
        "epsilon_spent": spent,
        "budget_remaining": None if budget is None else max(budget - spent, 0.0),
        "datasets": datasets,
        "rounds": [_round_row(e) for e in entries],
        "second_opinion": opinion,
    }


def _datasets(spends: list[LedgerEntry], budget: float | None) -> list[dict[str, Any]]:
    """Per dataset fingerprint (in order of last use): epsilon spent, budget left."""
    order: dict[str, None] = {}
    for e in spends:
        order.pop(e.dataset_fingerprint, None)
        order[e.dataset_fingerprint] = None
    rows = []
    for fingerprint in order:
        mine = [e for e in spends if e.dataset_fingerprint == fingerprint]
        spent = epsilon_of([e.spend() for e in mine], mine[-1].delta)
        rows.append(
            {
                "fingerprint": fingerprint,
                "epsilon_spent": spent,
                "budget_remaining": None if budget is None else max(budget - spent, 0.0),
            }
        )
    return rows


def _round_row(e: LedgerEntry) -> dict[str, Any]:
    return {
        "run_id": e.run_id,
        "round": e.round,
        "kind": e.kind,
        "epsilon": e.epsilon,
        "noise_multiplier": e.noise_multiplier,
        "sample_rate": e.sample_rate,
        "steps": e.steps,
        "max_grad_norm": e.max_grad_norm,
        "delta": e.delta,
        "reason": e.reason,
        "timestamp": e.timestamp,
    }


def _fairness(run: dict[str, Any], ledgers: dict[str, list[LedgerEntry]]) -> dict[str, Any] | None:
    """run.json's per-subgroup evaluation, labelled unsigned, with a cohort check."""
    fairness = run.get("fairness")
    if not isinstance(fairness, dict) or not fairness:
        return None
    check = _group_cohort_check(fairness, ledgers)
    return {"source": FAIRNESS_SOURCE, **fairness, "cohort_check": check}


def _group_cohort_check(
    fairness: dict[str, Any], ledgers: dict[str, list[LedgerEntry]]
) -> dict[str, str]:
    """Every per-site group size against the minimum cohort the site's signed ledger attests.

    A group under it should never have left the site; a site that attests no minimum
    leaves the check undecided.
    """
    cohort = _min_cohorts(ledgers)
    by_site = fairness.get("by_site")
    sizes = [
        (site, name, group.get("n") if isinstance(group, dict) else None)
        for site, groups in (by_site if isinstance(by_site, dict) else {}).items()
        for name, group in (groups if isinstance(groups, dict) else {}).items()
    ]
    below = [
        f"{site} {name}: n={n}, minimum {cohort[site]}"
        for site, name, n in sizes
        if site in cohort and not (isinstance(n, int) and n >= cohort[site])
    ]
    unattested = sorted({site for site, _, _ in sizes if site not in cohort})
    if below:
        return {
            "status": "fail",
            "evidence": "group figures under the site's signed minimum cohort: "
            + "; ".join(below[:5]),
        }
    if unattested:
        return {
            "status": "unknown",
            "evidence": f"{', '.join(unattested)} released group figures but attest no "
            "minimum cohort in a signed ledger",
        }
    return {
        "status": "pass",
        "evidence": f"all {len(sizes)} per-site group release(s) cover at least the site's "
        "minimum cohort attested in its signed ledger",
    }


def _empirical(folder: Path) -> list[dict[str, Any]]:
    """Results that `medfed audit empirical --out DIR/empirical` wrote, if any."""
    if not folder.is_dir():
        return []
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "epsilon_lower_bound" in data:
            results.append(data)
    return results
