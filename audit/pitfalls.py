"""Pitfall checks of a DP deployment, each pass or fail with the evidence behind it.

The evidence is what the sites attested in their signed ledger entries (what Opacus
actually built: sampler, noise generator, model check; how the data was split and
scaled) and what the coordinator's run record shows of released metrics. A check with
no evidence is ``unknown``, never ``pass``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medfed.common.ledger import LedgerEntry
from medfed.common.messages import SUPPRESSED_KEY

Check = dict[str, str]


def pitfall_checks(
    ledgers: dict[str, list[LedgerEntry]], run: dict[str, Any] | None
) -> list[Check]:
    """All checks, in the order the report shows them."""
    spends = [e for entries in ledgers.values() for e in entries if e.kind == "train"]
    return [
        _attested(
            "Poisson sampling (each record in each batch independently)",
            spends,
            lambda ev: ev.get("poisson_sampling") is True,
            lambda ev: f"sampler {ev.get('sampler', '?')}",
        ),
        _attested(
            "No BatchNorm (per-sample gradients stay per sample)",
            spends,
            lambda ev: (
                ev.get("batchnorm_layers") == 0
                and "no errors" in str(ev.get("module_validator", ""))
            ),
            lambda ev: (
                f"{ev.get('batchnorm_layers', '?')} BatchNorm layer(s); "
                f"{ev.get('module_validator', 'no model check recorded')}"
            ),
        ),
        _attested(
            "Secure random number generator for the noise",
            spends,
            lambda ev: ev.get("noise_secure_rng") is True,
            lambda ev: str(ev.get("noise_generator", "generator not recorded")),
        ),
        _attested(
            "Scaling constants not fitted on private data",
            spends,
            lambda ev: "nothing fitted on site data" in str(ev.get("normalisation", "")),
            lambda ev: str(ev.get("normalisation", "not recorded")),
        ),
        _attested(
            "Train and test splits disjoint (by patient)",
            spends,
            lambda ev: ev.get("train_test_patient_overlap") == 0,
            lambda ev: (
                f"{ev.get('train_test_patient_overlap', '?')} patient(s) in both; "
                f"{ev.get('split', 'split not recorded')}"
            ),
        ),
        _cohort_check(ledgers, run),
    ]


def _attested(
    name: str,
    spends: list[LedgerEntry],
    holds: Callable[[dict[str, Any]], bool],
    describe: Callable[[dict[str, Any]], str],
) -> Check:
    """Pass when every spend attests it; fail naming the first that does not."""
    if not spends:
        return {"check": name, "status": "unknown", "evidence": "no DP-SGD spends in the ledgers"}
    failing = [e for e in spends if not holds(e.evidence)]
    if failing:
        first = failing[0]
        return {
            "check": name,
            "status": "fail",
            "evidence": f"{len(failing)} of {len(spends)} spend(s) do not show it; e.g. "
            f"{first.site_id} round {first.round} of run {first.run_id}: "
            f"{describe(first.evidence)}",
        }
    kinds = sorted({describe(e.evidence) for e in spends})
    return {
        "check": name,
        "status": "pass",
        "evidence": f"all {len(spends)} signed spend(s) attest it: " + "; ".join(kinds),
    }


def _cohort_check(ledgers: dict[str, list[LedgerEntry]], run: dict[str, Any] | None) -> Check:
    """Every per-site metric the coordinator recorded covers at least the site's cohort."""
    name = "Metrics suppressed below the minimum cohort"
    if not run:
        return {"check": name, "status": "unknown", "evidence": "no run.json in the folder"}
    cohort = _min_cohorts(ledgers)
    released = suppressed = 0
    for rnd in run.get("rounds", []):
        for site, metrics in (rnd.get("site_metrics") or {}).items():
            if SUPPRESSED_KEY in metrics or int(metrics.get("num_examples", 0)) == 0:
                suppressed += 1
                continue
            released += 1
            n, least = int(metrics.get("num_examples", 0)), cohort.get(site)
            if least is None:
                return {
                    "check": name,
                    "status": "unknown",
                    "evidence": f"{site} released metrics but attests no minimum cohort",
                }
            if n < least:
                return {
                    "check": name,
                    "status": "fail",
                    "evidence": f"round {rnd.get('round')}: {site} released metrics over "
                    f"{n} patients, below its minimum cohort {least}",
                }
    return {
        "check": name,
        "status": "pass",
        "evidence": f"run.json (the coordinator's record, not signed) shows {released} "
        f"per-site metric release(s), each over at least the site's signed minimum cohort "
        f"({_cohort_text(cohort)}); {suppressed} withheld",
    }


def _min_cohorts(ledgers: dict[str, list[LedgerEntry]]) -> dict[str, int]:
    found: dict[str, int] = {}
    for site, entries in ledgers.items():
        for e in entries:
            value = e.evidence.get("min_cohort")
            if isinstance(value, int) and not isinstance(value, bool):
                found[site] = value
    return found


def _cohort_text(cohort: dict[str, int]) -> str:
    return ", ".join(f"{site} {n}" for site, n in sorted(cohort.items())) or "none attested"
