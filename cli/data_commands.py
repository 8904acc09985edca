"""`medfed data`: check a site's imaging data and de-identify DICOM, at the site.

Both commands run inside the hospital and read patient data; what they print and write
stays at the site (file paths name patient folders).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medfed.cli.deid_command import deid
from medfed.common.atomic import atomic_write_json

data_app = typer.Typer(
    help="Check and de-identify a site's DICOM data (runs at the site).", no_args_is_help=True
)
data_app.command("deid")(deid)

CHECK_REPORT_NAME = "data_check.json"
MAX_LISTED = 30


@data_app.command("check")
def check(
    site_dir: Path = typer.Argument(
        ..., help="Site folder holding dicom/ and labels.csv.", show_default=False
    ),
    task: str | None = typer.Option(
        None,
        help="xray or ct; decides the preprocessing and whether 2D images or volumes "
        "are used [default: ct if the folder holds CT/MR series, else xray].",
    ),
    samples_per_patient: int = typer.Option(
        1, min=1, help="Per-patient cap k, as a run would use it."
    ),
    out: Path | None = typer.Option(
        None, help=f"Where to write the JSON report [default: SITE_DIR/{CHECK_REPORT_NAME}]."
    ),
    cache: bool = typer.Option(
        True, help="Use and fill the site's preprocessing cache (SITE_DIR/.medfed-cache)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Read every file of a site's imaging data and say what training would use.

    Every DICOM file is read and decoded; the table shows the samples that will be used
    and every quarantined file with its reason (not DICOM, truncated, missing pixel
    data, undecodable, inconsistent series, no label). The full list is written as
    JSON. Exit status 0 when at least one sample is usable, 1 otherwise.
    """
    from medfed.cli.main import fail
    from medfed.client.data import DataError
    from medfed.client.imaging_data import imaging_report, load_imaging_data
    from medfed.client.site import consent_rules_of
    from medfed.common.tasks import get_task_spec

    console = Console(stderr=json_out)
    if not site_dir.is_dir():
        fail(f"{site_dir}: not a folder")
    task = task or _guess_task(site_dir / "dicom")
    if task not in ("xray", "ct"):
        fail(f"--task must be xray or ct, got {task!r}")
    spec = get_task_spec(task, "synthetic")
    try:
        # pydicom warns about what the quarantine reports anyway (e.g. truncation).
        with warnings.catch_warnings(), _progress(console, json_out) as progress:
            warnings.simplefilter("ignore", UserWarning)
            bar = progress.add_task("reading DICOM", total=None)
            data = load_imaging_data(
                site_dir,
                spec,
                samples_per_patient,
                use_cache=cache,
                progress=lambda done, total: progress.update(bar, completed=done, total=total),
                consent=consent_rules_of(site_dir),
            )
    except DataError as exc:
        fail(str(exc))
    report = imaging_report(data, site_dir)
    path = out or site_dir / CHECK_REPORT_NAME
    atomic_write_json(path, report)
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    for table in check_tables(report):
        console.print(table)
    console.print(f"Report written to {path}")


def _guess_task(dicom_root: Path) -> str:
    """ct when any file header says CT or MR, else xray (headers only, no pixels)."""
    import pydicom

    for path in sorted(dicom_root.rglob("*"))[:200]:
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                modality = pydicom.dcmread(path, stop_before_pixels=True).get("Modality", "")
        except Exception:  # any unreadable file: look at the next one
            continue
        if modality in ("CT", "MR"):
            return "ct"
    return "xray"


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    )


def check_tables(report: dict[str, Any]) -> list[Table]:
    """A summary table and a table of quarantined files (the first MAX_LISTED)."""
    summary = Table(title=f"{report['site_dir']}: {report['task']} data", show_header=False)
    summary.add_column("what")
    summary.add_column("count", justify="right")
    summary.add_row(
        "samples used (one per patient)"
        if report["samples_per_patient"] == 1
        else f"samples used (at most {report['samples_per_patient']} per patient)",
        str(report["samples_used"]),
    )
    summary.add_row("patients", str(report["patients"]))
    summary.add_row("files used", str(report["files_used"]))
    summary.add_row("files quarantined", str(report["files_quarantined"]))
    for kind, count in report["quarantined_by_reason"].items():
        summary.add_row(f"  {kind}", str(count))
    summary.add_row("not used (beyond the per-patient cap)", str(report["not_used_beyond_cap"]))
    summary.add_row("labels.csv rows skipped", str(len(report["label_rows_skipped"])))
    summary.add_row("patients withdrawn (consent)", str(report["consent"]["withdrawn"]))
    summary.add_row("all used files de-identified", "yes" if report["identity_removed"] else "no")
    tables = [summary]
    quarantined = report["quarantined"]
    if quarantined:
        listed = Table(title=_listed_title(quarantined))
        for col in ("file", "reason", "detail"):
            listed.add_column(col)
        for q in quarantined[:MAX_LISTED]:
            listed.add_row(q["file"], q["kind"], q["detail"])
        tables.append(listed)
    if report["label_rows_skipped"]:
        rows = Table(title="labels.csv rows skipped")
        for col in ("line", "column", "reason"):
            rows.add_column(col)
        for r in report["label_rows_skipped"][:MAX_LISTED]:
            rows.add_row(str(r["line"]), r["column"], r["reason"])
        tables.append(rows)
    return tables


def _listed_title(quarantined: list[dict[str, str]]) -> str:
    counts = Counter(q["kind"] for q in quarantined)
    shown = min(len(quarantined), MAX_LISTED)
    return f"quarantined files ({shown} of {len(quarantined)} shown; {dict(counts)})"
