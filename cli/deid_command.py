"""``medfed data deid``: de-identify a site's DICOM tree into a new folder.

A plain function; the app registers it with ``data_app.command("deid")(deid)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

if TYPE_CHECKING:
    from medfed.client.deid import DeidOptions, DeidReport

MAX_LISTED = 20

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one-line errors stay one line


def _lib() -> ModuleType:
    """medfed.client.deid, imported when a command runs (it loads pydicom)."""
    from medfed.client import deid

    return deid


def _fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit non-zero (as ``medfed.cli.main.fail``)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def deid(
    in_dir: Path = typer.Argument(
        ...,
        help="A site folder (dicom/ + labels.csv) or any tree of DICOM files. Only read.",
    ),
    out_dir: Path = typer.Argument(
        ..., help="Folder for the de-identified copy; outside IN_DIR, empty or new."
    ),
    key_file: Path = typer.Option(
        ...,
        "--key-file",
        help="The site's secret key (raw bytes or hex). Created with 32 random bytes "
        "and mode 0600 if missing. Keep it in the hospital, never in OUT_DIR: the same "
        "key gives the same pseudonyms, UIDs and date shifts on every run.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write into a non-empty OUT_DIR (same names are replaced)."
    ),
    shift_dates: bool = typer.Option(
        True,
        "--shift-dates/--remove-dates",
        help="Shift dates back by a per-patient offset (1-365 days, intervals kept) "
        "or apply the profile's remove/empty actions to them.",
    ),
    labels: bool = typer.Option(
        True, "--labels/--no-labels", help="Rewrite IN_DIR/labels.csv with the same mapping."
    ),
    retain_patient_characteristics: bool = typer.Option(
        False,
        "--retain-patient-characteristics",
        help="PS3.15 Retain Patient Characteristics Option: keep Patient's Sex, Age, Size "
        "and Weight (the Basic Profile empties sex and removes the others). Needed for "
        "per-subgroup (sex, age) evaluation of imaging models; recorded in each file "
        "(DCM 113108) and in the report.",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print the report (as in deid_report.json) as JSON."
    ),
) -> None:
    """De-identify DICOM files (DICOM PS3.15 Basic Confidentiality Profile).

    Every attribute the profile lists is removed, emptied or replaced;
    private tags are removed; UIDs are remapped with a keyed hash
    (consistent across files and runs); Patient ID and name become a
    keyed pseudonym; dates move back by a per-patient offset. With
    --retain-patient-characteristics, patient sex, age, size and weight
    are kept. PatientIdentityRemoved and DeidentificationMethod are set.

    Pixel data stays bit-identical (never decoded), so burned-in text is
    not removed: files whose BurnedInAnnotation is not NO are flagged.

    Output: OUT_DIR/dicom/PSEUDONYM/STUDY/SERIES/INSTANCE.dcm for a site
    (no dicom/ level for a bare tree), labels.csv remapped, and
    deid_report.json with no original identifier. Nothing is written into
    IN_DIR; unreadable or non-DICOM files are skipped and reported.
    """
    try:
        _lib().check_dirs(in_dir, out_dir, overwrite)
        key, created = _lib().load_or_create_key(key_file, forbidden=(out_dir, in_dir))
    except (_lib().DeidError, OSError) as exc:
        _fail(str(exc))
    options = _lib().DeidOptions(
        shift_dates=shift_dates,
        labels=labels,
        overwrite=overwrite,
        retain_patient_characteristics=retain_patient_characteristics,
    )
    try:
        report = _run(in_dir, out_dir, key, options, quiet=json_output)
    except (_lib().DeidError, OSError) as exc:
        _fail(str(exc))
    if json_output:
        data = json.loads((out_dir / _lib().REPORT_NAME).read_text(encoding="utf-8"))
        typer.echo(json.dumps({**data, "key_file_created": created}, indent=2))
        return
    _summary(report, key_file if created else None)


def _run(in_dir: Path, out_dir: Path, key: bytes, options: DeidOptions, quiet: bool) -> DeidReport:
    if quiet:
        return _lib().deidentify_tree(in_dir, out_dir, key, options)
    columns = (TextColumn("de-identifying"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("deid", total=None)

        def on_file(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return _lib().deidentify_tree(in_dir, out_dir, key, options, on_file=on_file)


def _summary(report: DeidReport, created_key: Path | None) -> None:
    data = report.to_json()
    table = Table(title="medfed data deid", show_header=False)
    for label, key in (
        ("files seen", "files_seen"),
        ("de-identified", "files_written"),
        ("skipped", "files_skipped"),
        ("patients", "patients"),
        ("studies", "studies"),
        ("series", "series"),
    ):
        table.add_row(label, str(data[key]))
    table.add_row("burned-in annotation flags", str(len(report.flagged)))
    table.add_row("patient characteristics", data["patient_characteristics"])
    if report.labels is not None:
        table.add_row("labels.csv rows remapped", str(report.labels["rows"]))
    console.print(table)
    _skipped_table(report)
    _flagged(report)
    if created_key is not None:
        console.print(f"Created a new site key at {created_key} (mode 0600); keep it.")
    console.print(f"Report: {report.out_dir / _lib().REPORT_NAME}")


def _skipped_table(report: DeidReport) -> None:
    if not report.skipped:
        return
    table = Table(title="Skipped (input paths are shown here only, not in the report)")
    table.add_column("input file (relative to IN_DIR)")
    table.add_column("reason")
    for skipped in report.skipped[:MAX_LISTED]:
        table.add_row(str(skipped.source), skipped.reason)
    console.print(table)
    if len(report.skipped) > MAX_LISTED:
        console.print(f"... and {len(report.skipped) - MAX_LISTED} more")


def _flagged(report: DeidReport) -> None:
    flagged = report.flagged
    if not flagged:
        return
    console.print(
        f"[yellow]{len(flagged)} file(s) may carry burned-in text in their pixels[/] "
        "(BurnedInAnnotation YES or absent; pixels are not altered): review before release."
    )
    for written in flagged[:MAX_LISTED]:
        console.print(f"  {written.path} (BurnedInAnnotation {written.burned_in_annotation})")
