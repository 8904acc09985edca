"""The sections of a privacy-audit report, built as document blocks in reading order.

Each section builder takes the report dict and returns its blocks; optional parts that
are ``None`` or empty give a sentence saying so, so a reader can tell "nothing found"
from "not rendered". The writers in :mod:`medfed.audit.render` only format the blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medfed.audit.render_document import (
    Banner,
    Block,
    Bullets,
    Cell,
    Code,
    Contents,
    Facts,
    Heading,
    Para,
    Plot,
    Status,
    Table,
    as_dict,
    as_list,
    as_strings,
    as_text,
    integer,
    is_number,
    num,
    percent,
    span,
)
from medfed.audit.render_fairness import fairness_section

# (anchor, heading) of every report section, in the order they appear.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("verification", "Verification"),
    ("per-site-privacy-spend", "Per-site privacy spend"),
    ("privacy-statement", "Privacy statement"),
    ("secure-aggregation-and-threat-model", "Secure aggregation and threat model"),
    ("second-opinion-on-epsilon", "Second opinion on epsilon"),
    ("pitfall-checks", "Pitfall checks"),
    ("empirical-audit", "Empirical audit"),
    ("run-rounds", "Run rounds"),
    ("fairness", "Fairness"),
)
SECOND_OPINION_TOLERANCE = 0.05  # relative disagreement above which the report flags it
BUDGET_HEADERS = ["Site", "ε spent", "ε budget", "Budget left", "δ", "Unit of privacy",
                  "Records per patient (k)", "Result"]  # fmt: skip
MECHANISM_HEADERS = ["Site", "Accountant", "Noise multiplier σ", "Clipping norm C",
                     "Sampling rate q", "Steps", "Rounds joined", "Rounds declined"]  # fmt: skip
LEDGER_HEADERS = ["Run", "Round", "Kind", "Cumulative ε", "δ", "σ", "C", "q", "Steps", "Time"]
OPINION_HEADERS = ["Site", "Accountant", "ε", "Second accountant", "Second ε", "Difference",
                   "Result", "Note"]  # fmt: skip
EMPIRICAL_HEADERS = ["Site", "DP", "ε lower bound", "Accountant ε", "Confidence", "Canaries",
                     "Guesses", "Correct", "Result", "Verdict"]  # fmt: skip


def build_document(report: Mapping[str, Any]) -> list[Block]:
    """Every block of the report, in reading order; the writers only format them."""
    report = as_dict(report)
    blocks: list[Block] = [Heading(1, as_text(report.get("title")) or "Privacy audit report")]
    blocks.append(
        Facts(
            [
                ("Generated", as_text(report.get("generated"))),
                ("Directory", Code(as_text(report.get("directory")))),
                ("medfed version", as_text(report.get("medfed_version"))),
            ]
        )
    )
    blocks.append(Contents(list(SECTIONS)))
    builders = (
        _verification,
        _spend,
        _statement,
        _secagg,
        _second_opinion,
        _pitfalls,
        _empirical,
        _run,
        fairness_section,
    )
    for (anchor, title), build in zip(SECTIONS, builders, strict=True):
        blocks.append(Heading(2, title, anchor))
        blocks.extend(build(report))
    return blocks


def _verification(report: Mapping[str, Any]) -> list[Block]:
    """PASS/FAIL banner, what was checked, and every problem with where and what."""
    verification = as_dict(report.get("verification"))
    problems = [as_dict(p) for p in as_list(verification.get("problems"))]
    if verification.get("ok") is True and not problems:
        banner = Banner(
            Status("pass", "PASS"),
            "Every ledger, round record and signature "
            "checked out: the figures below come from verified records.",
        )
    else:
        banner = Banner(
            Status("fail", "FAIL"),
            f"Verification failed ({len(problems)} "
            "problem(s) listed below). Do not rely on the figures in this report "
            "until the problems are resolved.",
        )
    checked = as_dict(verification.get("checked"))
    labels = (
        ("ledgers", "Ledgers"),
        ("ledger_entries", "Ledger entries"),
        ("round_records", "Round records"),
        ("signatures", "Signatures"),
    )
    facts: list[tuple[str, Cell]] = [("Keys trusted from", as_text(verification.get("trust")))]
    facts += [(f"{label} checked", integer(checked.get(key))) for key, label in labels]
    rows: list[list[Cell]] = [
        [Code(as_text(p.get("where"))), as_text(p.get("what"))] for p in problems
    ]
    return [
        banner,
        Facts(facts),
        Heading(3, "Problems found"),
        Table(["Where", "What"], rows, empty="No problems found."),
    ]


def _spend(report: Mapping[str, Any]) -> list[Block]:
    """Spend against budget, the mechanism, then one subsection per site with its plot."""
    sites = [as_dict(s) for s in as_list(report.get("sites"))]
    if not sites:
        return [Para("No site ledgers were found, so no privacy spend can be reported.")]
    blocks: list[Block] = [
        Para(
            "ε is cumulative over every round the site ever trained on the dataset, across "
            "all runs; budget left is for that dataset across all runs. With k records per "
            "patient, ε protects one record and a patient is protected at group-privacy level k."
        ),
        Table(BUDGET_HEADERS, [_budget_row(site) for site in sites]),
        Table(MECHANISM_HEADERS, [_mechanism_row(site) for site in sites]),
    ]
    for site in sites:
        blocks.extend(_site_detail(site))
    return blocks


def _budget_row(site: Mapping[str, Any]) -> list[Cell]:
    budget, spent = site.get("epsilon_budget"), site.get("epsilon_spent")
    return [
        Code(as_text(site.get("site_id"))),
        num(spent),
        num(budget),
        num(site.get("budget_remaining")),
        num(site.get("delta")),
        as_text(site.get("unit_of_privacy")),
        integer(site.get("samples_per_patient")),
        _budget_status(spent, budget),
    ]


def _budget_status(spent: object, budget: object) -> Status:
    if not is_number(budget):
        return Status("unknown", "NO BUDGET SET")
    if not is_number(spent):
        return Status("unknown", "UNKNOWN")
    if float(spent) > float(budget):  # type: ignore[arg-type]
        return Status("fail", "OVER BUDGET")
    return Status("pass", "WITHIN BUDGET")


def _mechanism_row(site: Mapping[str, Any]) -> list[Cell]:
    rounds = [as_dict(r) for r in as_list(site.get("rounds"))]
    trained = [r for r in rounds if r.get("kind") == "train"]
    steps = sum(r["steps"] for r in trained if isinstance(r.get("steps"), int))
    return [
        Code(as_text(site.get("site_id"))),
        as_text(site.get("accountant")),
        span(trained, "noise_multiplier"),
        span(trained, "max_grad_norm"),
        span(trained, "sample_rate"),
        str(steps),
        str(len(trained)),
        str(len(rounds) - len(trained)),
    ]


def _site_detail(site: Mapping[str, Any]) -> list[Block]:
    """One site: identity, plot, datasets, declined rounds with reasons, every round."""
    site_id = as_text(site.get("site_id"))
    rounds = [as_dict(r) for r in as_list(site.get("rounds"))]
    identity: list[tuple[str, Cell]] = [
        ("Ledger signed by", Code(as_text(site.get("signer")))),
        ("Unit of privacy", as_text(site.get("unit_of_privacy"))),
        ("Records per patient (k)", integer(site.get("samples_per_patient"))),
    ]
    alt = (
        f"Cumulative epsilon of site {site_id} over {len(rounds)} ledger rounds, "
        f"against its budget {num(site.get('epsilon_budget'))}."
    )
    return [
        Heading(3, f"Site {site_id}"),
        Facts(identity),
        Plot(site, alt),
        _datasets_table(site),
        Heading(4, f"Declined rounds at {site_id}"),
        _declined_table(rounds),
        Heading(4, f"Ledger rounds at {site_id}"),
        Table(LEDGER_HEADERS, [_ledger_row(r) for r in rounds], empty="No rounds recorded."),
    ]


def _datasets_table(site: Mapping[str, Any]) -> Table:
    """Spend per dataset fingerprint: a site's budget composes per dataset, across runs."""
    rows: list[list[Cell]] = [
        [Code(as_text(d.get("fingerprint"))), num(d.get("epsilon_spent")),
         num(d.get("budget_remaining"))]
        for d in (as_dict(d) for d in as_list(site.get("datasets")))
    ]  # fmt: skip
    headers = ["Dataset fingerprint", "ε spent (all runs)", "Budget left"]
    return Table(headers, rows, empty="No datasets recorded.")


def _declined_table(rounds: list[Mapping[str, Any]]) -> Table:
    rows: list[list[Cell]] = [
        [Code(as_text(r.get("run_id"))), integer(r.get("round")), as_text(r.get("reason"))]
        for r in rounds
        if r.get("kind") != "train"
    ]
    return Table(["Run", "Round", "Reason"], rows, empty="No rounds declined.")


def _ledger_row(entry: Mapping[str, Any]) -> list[Cell]:
    kind = entry.get("kind")
    status = Status("pass", "trained") if kind == "train" else Status("warn", "declined")
    return [
        Code(as_text(entry.get("run_id"))),
        integer(entry.get("round")),
        status,
        num(entry.get("epsilon")),
        num(entry.get("delta")),
        num(entry.get("noise_multiplier")),
        num(entry.get("max_grad_norm")),
        num(entry.get("sample_rate")),
        integer(entry.get("steps")),
        as_text(entry.get("timestamp")),
    ]


def _statement(report: Mapping[str, Any]) -> list[Block]:
    statement = as_dict(report.get("privacy_statement"))
    summary = as_text(statement.get("summary")) or "No privacy statement was produced."
    return [
        Para(summary),
        Bullets("What the guarantee covers", as_strings(statement.get("covered"))),
        Bullets("What it does not cover", as_strings(statement.get("not_covered"))),
    ]


def _secagg(report: Mapping[str, Any]) -> list[Block]:
    secagg = as_dict(report.get("secure_aggregation"))
    threats = as_dict(report.get("threat_model"))
    settings = as_dict(secagg.get("settings"))
    blocks: list[Block] = [Facts([("Protocol", as_text(secagg.get("protocol")) or "not recorded")])]
    blocks.append(
        Table(
            ["Setting", "Value"],
            [[Code(as_text(k)), as_text(v)] for k, v in settings.items()],
            empty="No settings recorded.",
        )
    )
    if as_text(secagg.get("note")):
        blocks.append(Para(as_text(secagg.get("note"))))
    blocks.append(Bullets("Threats covered", as_strings(threats.get("covered"))))
    blocks.append(Bullets("Threats not covered", as_strings(threats.get("not_covered"))))
    return blocks


def _second_opinion(report: Mapping[str, Any]) -> list[Block]:
    """Each site's epsilon recomputed by a second accountant; > 5% disagreement flagged."""
    rows = [_opinion_row(as_dict(site)) for site in as_list(report.get("sites"))]
    return [
        Para(
            f"A second accountant recomputes each site's ε from its ledger; a relative "
            f"difference above {SECOND_OPINION_TOLERANCE:.0%} is flagged for review."
        ),
        Table(OPINION_HEADERS, rows, empty="No sites."),
    ]


def _opinion_row(site: Mapping[str, Any]) -> list[Cell]:
    opinion = as_dict(site.get("second_opinion"))
    primary: list[Cell] = [Code(as_text(site.get("site_id"))), as_text(site.get("accountant"))]
    if not opinion:
        not_computed = Status("unknown", "NOT COMPUTED")
        return [*primary, num(site.get("epsilon_spent")), "—", "—", "—", not_computed, ""]
    return [
        *primary,
        num(opinion.get("primary_epsilon")),
        as_text(opinion.get("accountant")),
        num(opinion.get("epsilon")),
        percent(opinion.get("relative_difference")),
        _opinion_status(opinion),
        as_text(opinion.get("note")),
    ]


def _opinion_status(opinion: Mapping[str, Any]) -> Status:
    difference = opinion.get("relative_difference")
    over = is_number(difference) and abs(float(difference)) > SECOND_OPINION_TOLERANCE  # type: ignore[arg-type]
    if opinion.get("flagged") or over:
        return Status("fail", "FLAGGED: DISAGREES")
    return Status("pass", "AGREES")


def _pitfalls(report: Mapping[str, Any]) -> list[Block]:
    checks = [as_dict(c) for c in as_list(report.get("pitfalls"))]
    rows: list[list[Cell]] = [
        [as_text(c.get("check")), _check_status(c.get("status")), as_text(c.get("evidence"))]
        for c in checks
    ]
    counts = {
        kind: sum(1 for c in checks if c.get("status") == kind)
        for kind in ("pass", "fail", "unknown")
    }
    summary = (
        f"{counts['pass']} passed, {counts['fail']} failed, "
        f"{len(checks) - counts['pass'] - counts['fail']} could not be decided."
    )
    status = Status("fail", "FAIL") if counts["fail"] else None
    return [
        Para(summary, status),
        Table(["Check", "Result", "Evidence"], rows, empty="No pitfall checks were run."),
    ]


def _check_status(value: object) -> Status:
    kinds = {"pass": Status("pass", "PASS"), "fail": Status("fail", "FAIL")}
    return kinds.get(as_text(value), Status("unknown", "UNKNOWN"))


def _empirical(report: Mapping[str, Any]) -> list[Block]:
    audits = [as_dict(a) for a in as_list(report.get("empirical"))]
    if not audits:
        return [Para("No empirical audit was run for this directory.")]
    rows = [
        [
            Code(as_text(a.get("site_id"))),
            "yes" if a.get("dp") else "no",
            num(a.get("epsilon_lower_bound")),
            num(a.get("accountant_epsilon")),
            percent(a.get("confidence")),
            integer(a.get("canaries")),
            integer(a.get("guesses")),
            integer(a.get("correct")),
            _empirical_status(a),
            as_text(a.get("verdict")),
        ]
        for a in audits
    ]
    return [
        Para(
            "Canary membership-inference audits give a lower bound on ε at the stated "
            "confidence; a lower bound above the accountant's ε would mean the "
            "accounting or the implementation is wrong."
        ),
        Table(EMPIRICAL_HEADERS, rows),
    ]


def _empirical_status(audit: Mapping[str, Any]) -> Status:
    bound, claimed = audit.get("epsilon_lower_bound"), audit.get("accountant_epsilon")
    if not audit.get("dp"):
        return Status("unknown", "NO DP (BASELINE)")
    if not (is_number(bound) and is_number(claimed)):
        return Status("unknown", "UNKNOWN")
    if float(bound) > float(claimed):  # type: ignore[arg-type]
        return Status("fail", "BOUND EXCEEDS ε")
    return Status("pass", "CONSISTENT")


def _run(report: Mapping[str, Any]) -> list[Block]:
    run = report.get("run")
    if not isinstance(run, Mapping):
        return [Para("This directory holds no run record.")]
    rounds = [as_dict(r) for r in as_list(run.get("rounds"))]
    facts: list[tuple[str, Cell]] = [
        ("Run", Code(as_text(run.get("run_id")))),
        ("Task", as_text(run.get("task"))),
        ("Dataset", as_text(run.get("dataset"))),
        ("Model", as_text(run.get("model"))),
        ("Rounds", f"{len(rounds)} recorded of {integer(run.get('rounds_planned'))} planned"),
        ("Status", as_text(run.get("status"))),
    ]
    rows: list[list[Cell]] = [
        [
            integer(r.get("round")),
            as_text(r.get("status")),
            ", ".join(as_strings(r.get("participants"))),
            "; ".join(
                f"{as_text(s)}: {as_text(why)}" for s, why in as_dict(r.get("declined")).items()
            ),
            Code(as_text(r.get("model_sha256"))),
        ]
        for r in rounds
    ]
    return [
        Facts(facts),
        Table(
            ["Round", "Status", "Participants", "Declined (site: reason)", "Model SHA-256"],
            rows,
            empty="No rounds recorded.",
        ),
    ]
