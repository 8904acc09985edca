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
    for name, head in summary["heads"].items():
        console.print(f"head of {name}: {head['entries']} entries, {head['head']}", highlight=False)
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


@audit_app.command()
def empirical(
    data: Path = typer.Option(
        ...,
        "--data",
        help="The site's data folder (site.toml, clinical.csv): the audit runs at the "
        "site, on its own data; only the result leaves.",
        show_default=False,
    ),
    run_dir: Path | None = typer.Option(
        None,
        "--run",
        help="A run's output folder: audit at the DP settings in its run.json (epsilon, "
        "delta, rounds, batch size, learning rate, clipping, model) and write the result "
        "to RUN/empirical/ for `medfed audit report`.",
    ),
    task: str | None = typer.Option(None, "--task", help="risk or rehab (without --run)."),
    model: str | None = typer.Option(None, "--model", help="logreg or mlp (without --run)."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="The run's target epsilon."),
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds."),
    local_epochs: int | None = typer.Option(None, "--local-epochs", help="Epochs per round."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Expected batch size."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", help="SGD step."),
    no_dp: bool = typer.Option(
        False, "--no-dp", help="Train the same pipeline without noise (expect leakage)."
    ),
    canaries: int = typer.Option(200, "--canaries", min=10, help="Canaries m."),
    seed: int | None = typer.Option(
        None, "--seed", help="Audit seed (default: fresh from the OS; recorded)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Result JSON (default: RUN/empirical/<site>-<dp|no-dp>.json)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Canary-based one-run audit (Steinke, Nasr, Jagielski 2023) of a site's DP-SGD.

    Trains the site's own pipeline once with m canaries, each drawn in with probability
    1/2, guesses which were in from the trained model, and turns the right guesses into
    an epsilon lower bound at 95% confidence, shown beside the accountant's epsilon.
    Exit status 1 when the lower bound exceeds the accountant's epsilon (a bug).
    A bound of 0 means no leakage was detected, not that there is none: at short
    training (few epochs over many records) the audit has little power.
    """
    from medfed.audit.empirical import BUG, AuditError, run_empirical_audit
    from medfed.client.data import DataError
    from medfed.client.policy import PolicyError

    settings = _audit_settings(
        run_dir,
        task=task,
        model=model,
        epsilon=epsilon,
        num_rounds=rounds,
        local_epochs=local_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
    )
    try:
        with console.status("empirical audit: training with canaries") as status:
            result = run_empirical_audit(
                data,
                settings,
                dp=not no_dp,
                canaries=canaries,
                seed=seed,
                progress=lambda message: status.update(f"empirical audit: {message}"),
            )
    except (AuditError, DataError, PolicyError) as exc:
        _fail(str(exc))
    target = out or (
        run_dir / "empirical" / f"{result.site_id}-{'dp' if result.dp else 'no-dp'}.json"
        if run_dir
        else None
    )
    if target is not None:
        from medfed.common.atomic import atomic_write_json

        atomic_write_json(target, result.to_dict())
    if as_json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        _print_empirical(result, target)
    raise typer.Exit(1 if result.verdict == BUG else 0)


def _audit_settings(run_dir: Path | None, **options):
    """Run settings from RUN/run.json (or the simulate defaults), then the options."""
    from medfed.cli.main import run_defaults
    from medfed.common.config import ConfigError, RunSettings
    from medfed.server.run_record import RunRecordError, read_run_record

    values: dict = {}
    if run_dir is not None:
        try:
            values = dict(read_run_record(run_dir).settings)
        except RunRecordError as exc:
            _fail(str(exc))
        values["resume"] = False
    else:
        task = options.get("task") or "risk"
        defaults = run_defaults(task, "synthetic")
        values = {
            "task": task,
            "epsilon": defaults["epsilon"],
            "num_rounds": defaults["rounds"],
            "batch_size": defaults["batch_size"],
            "learning_rate": defaults["learning_rate"],
            "local_epochs": defaults["local_epochs"],
            "test_fraction": defaults["test_fraction"],
        }
    values.update({k: v for k, v in options.items() if v is not None})
    try:
        return RunSettings.from_mapping(values)
    except ConfigError as exc:
        _fail(str(exc))


def _print_empirical(result, target: Path | None) -> None:
    table = Table(title=f"Empirical audit of {result.site_id} ({result.task}, {result.model})")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    claimed = "—" if result.accountant_epsilon is None else f"{result.accountant_epsilon:.3f}"
    rows = [
        ("DP-SGD", "yes" if result.dp else "no (noise 0)"),
        ("epsilon lower bound (95%)", f"{result.epsilon_lower_bound:.3f}"),
        ("accountant's epsilon", claimed),
        ("canaries m / guesses r / correct v",
         f"{result.canaries} / {result.guesses} / {result.correct}"),
        ("noise multiplier, clipping", f"{result.noise_multiplier:.3f}, {result.max_grad_norm:g}"),
        ("sample rate, steps", f"{result.sample_rate:.4g}, {result.steps}"),
        ("seconds", f"{result.seconds:.1f}"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"verdict: {result.verdict}", highlight=False)
    if target is not None:
        console.print(f"result: {target}", highlight=False)
