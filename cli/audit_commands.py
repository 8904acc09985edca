"""`medfed audit`: verify signed ledgers and round records, report, audit empirically.

For the consortium's privacy officer, an ethics board or a regulator: everything here
reads an audit folder (a run's output folder plus the sites' ledgers under ``ledgers/``)
and needs no patient data, except ``empirical``, which a site runs on its own data.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

audit_app = typer.Typer(
    help="Check and report the privacy budget spent by each hospital (signed ledgers, "
    "signed round records), and audit a site's DP-SGD empirically.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

DIR_HELP = (
    "Audit folder: a run's output folder (run.json, rounds.jsonl, roster.json, "
    "coordinator.pub.pem) with each site's ledger in DIR/ledgers/<site>.jsonl."
)
ROSTER_HELP = "Roster with the sites' identity keys (default: DIR/roster.json)."
CA_HELP = (
    "Consortium CA certificate (from the consortium, not from the coordinator): the "
    "roster's CA signature is checked, so the result does not rest on trusting DIR."
)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _trail(directory: Path, roster: Path | None, ca: Path | None):
    from medfed.audit.trust import TrustError
    from medfed.audit.verify import verify_directory

    try:
        return verify_directory(directory, roster, ca)
    except (TrustError, FileNotFoundError) as exc:
        _fail(str(exc))


@audit_app.command()
def verify(
    directory: Path = typer.Argument(..., help=DIR_HELP, show_default=False),
    roster: Path | None = typer.Option(None, "--roster", help=ROSTER_HELP),
    ca: Path | None = typer.Option(None, "--ca", help=CA_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every signature, chain link and cross-reference in an audit folder.

    Names the exact file, line and entry of every edit, deletion, reordering or
    insertion. Exit status 0 when everything verifies, 1 when anything does not,
    2 when the folder or its roster cannot be used at all.
    """
    trail = _trail(directory, roster, ca)
    summary = trail.summary()
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_verification(summary)
    raise typer.Exit(0 if trail.ok else 1)


def _print_verification(summary: dict) -> None:
    checked = summary["checked"]
    counts = (
        f"{checked['ledgers']} ledger(s) with {checked['ledger_entries']} entries, "
        f"{checked['round_records']} round record(s), {checked['signatures']} valid signature(s)"
    )
    console.print(f"trust: {summary['trust']}", highlight=False)
    if summary["ok"]:
        console.print(
            f"[green]VERIFIED[/green]: {counts}; nothing edited, removed, reordered or inserted",
            highlight=False,
        )
        return
    table = Table(title=f"{len(summary['problems'])} problem(s)", show_lines=False)
    table.add_column("where", overflow="fold")
    table.add_column("what is wrong", overflow="fold")
    for problem in summary["problems"]:
        table.add_row(problem["where"], problem["what"])
    console.print(table)
    console.print(f"[red]FAILED[/red]: {counts}", highlight=False)


class ReportFormat(StrEnum):
    html = "html"
    md = "md"
    json = "json"


@audit_app.command()
def report(
    directory: Path = typer.Argument(..., help=DIR_HELP, show_default=False),
    fmt: ReportFormat = typer.Option(
        ReportFormat.html,
        "--format",
        help="html: one self-contained file with embedded plots (no network access); "
        "md: Markdown; json: for machines.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Report file (default: DIR/audit-report.<format>)."
    ),
    roster: Path | None = typer.Option(None, "--roster", help=ROSTER_HELP),
    ca: Path | None = typer.Option(None, "--ca", help=CA_HELP),
) -> None:
    """Write the privacy-budget report of an audit folder.

    Per site: epsilon over rounds against its budget, delta, noise, clipping, sampling
    rate, steps, rounds joined or declined and why, budget left for the dataset across
    all runs, and a second accountant's opinion; then the privacy statement, the
    secure aggregation and threat model in force, pitfall checks with their evidence,
    and any empirical audits in DIR/empirical/. The folder is verified first: exit
    status 1 (report still written, marked FAILED) when verification finds problems.
    """
    from medfed.audit.render import render_html, render_json, render_markdown
    from medfed.audit.report import build_report
    from medfed.common.atomic import atomic_write_text

    trail = _trail(directory, roster, ca)
    built = build_report(trail)
    render = {"html": render_html, "md": render_markdown, "json": render_json}[fmt.value]
    target = out or directory / f"audit-report.{fmt.value}"
    try:
        atomic_write_text(target, render(built))
    except OSError as exc:
        _fail(f"cannot write {target}: {exc}")
    status = (
        "[green]verified[/green]"
        if trail.ok
        else (f"[red]FAILED verification ({len(trail.problems)} problem(s))[/red]")
    )
    console.print(
        f"{target}: privacy report of {len(built['sites'])} site(s); {status}", highlight=False
    )
    raise typer.Exit(0 if trail.ok else 1)
