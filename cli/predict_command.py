"""`medfed predict` and `medfed explain`: using a trained model where the data is.

Both run offline on this machine; torch, pandas and pydicom are imported inside the
commands, so `medfed --help` stays fast.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from medfed.inference.errors import PredictError

if TYPE_CHECKING:
    from medfed.inference.importance import ImportanceReport
    from medfed.inference.model_file import LoadedModel

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line

DEFAULT_SALIENCY_DIR = Path("medfed-saliency")
MODEL_HELP = "A checkpoint (.npz) or a run folder (its last aggregated round, hash-checked)."


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    """Add `predict` and `explain` to the medfed app."""
    app.command("predict")(predict)
    app.command("explain")(explain)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def predict(
    model: Path = typer.Argument(..., help=MODEL_HELP, show_default=False),
    input_path: Path = typer.Argument(
        ...,
        metavar="INPUT",
        help="risk/rehab: a CSV of one or more patients (the training columns; the "
        "outcome column and patient_id are optional). xray/ct: a DICOM file or a "
        "series folder.",
        show_default=False,
    ),
    fmt: OutputFormat = typer.Option(
        OutputFormat.table, "--format", help="table for people, json for systems."
    ),
    explain: bool = typer.Option(
        False,
        "--explain",
        help="risk/rehab: each input's contribution to each prediction (linear model: "
        "coefficient x input, exact; MLP: integrated gradients), against the baseline "
        "of every input at the middle of its public range. xray/ct: a Grad-CAM PNG "
        f"over each image, in --saliency-dir (default ./{DEFAULT_SALIENCY_DIR}); plain "
        "gradient saliency where the last feature map is a single cell (the PNG's title "
        "names the method).",
    ),
    saliency_dir: Path | None = typer.Option(
        None, "--saliency-dir", help="xray/ct: write Grad-CAM PNGs here (implies --explain)."
    ),
    skip_invalid: bool = typer.Option(
        False,
        "--skip-invalid",
        help="risk/rehab: predict the valid rows and list the invalid ones, instead of "
        "stopping (exit 2) at a file with any invalid row.",
    ),
) -> None:
    """Predict with a trained model for patients (CSV) or images (DICOM), on this machine.

    Nothing leaves this machine: the model is read from disk and the prediction runs
    locally, offline. The input is checked with the same rules as training (ranges,
    codes, missing values; DICOM decoding and preprocessing), and a model that does not
    fit the input (another task, dataset, features or image type) is refused.

    risk: probability and label (probability >= 0.5). rehab: the progress score with an
    approximate 95% prediction interval (value +/- 1.96 x the run's federated test RMSE,
    assuming normal residuals of constant spread) when the run's run.json is found (a
    run folder, or a checkpoint in its run's checkpoints/ folder); otherwise no interval
    and a note. xray/ct: probability and label per image or series.

    By default a CSV with any invalid row is refused, each invalid row named by file
    line and column (exit 2); --skip-invalid predicts the rest. Exit 2 on bad input or
    a model/input mismatch.
    """
    from medfed.inference.input_kind import check_input_kind
    from medfed.inference.model_file import load_model

    try:
        loaded = load_model(model)
        check_input_kind(loaded, input_path)
        if loaded.is_imaging:
            if explain and saliency_dir is None:
                saliency_dir = DEFAULT_SALIENCY_DIR
            payload = _predict_imaging(loaded, input_path, saliency_dir)
            show = _show_imaging
        else:
            if saliency_dir is not None:
                raise PredictError("--saliency-dir is for imaging models (xray, ct)")
            from medfed.inference.tabular import predict_tabular

            report = predict_tabular(loaded, input_path, explain, skip_invalid)
            payload = report.to_dict()
            show = _show_tabular
    except PredictError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot read or write: {exc}", 1)
    if fmt is OutputFormat.json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        show(payload)


def explain(
    model: Path = typer.Argument(..., help=MODEL_HELP, show_default=False),
    site: Path = typer.Option(
        ..., "--site", help="The site's data directory (site.toml and its CSV)."
    ),
    test_fraction: float | None = typer.Option(
        None,
        "--test-fraction",
        help="The run's test fraction; needed only when no run.json records the model "
        "(the split seed comes from the checkpoint).",
    ),
    repeats: int = typer.Option(10, min=1, max=1000, help="Permutations per input column."),
    seed: int = typer.Option(0, help="Seed of the permutations."),
    fmt: OutputFormat = typer.Option(
        OutputFormat.table, "--format", help="table for people, json for systems."
    ),
) -> None:
    """Global importance of each input of a risk/rehab model, computed at a site.

    Run at the site, on the site's own held-out patients: the split training used
    (the run's test fraction and seed). Linear model: its coefficients and permutation
    importance; MLP: permutation importance (drop of AUC for risk, of negative MAE for
    rehab, when one input column is shuffled; mean +/- std over --repeats).

    Nothing is sent anywhere. The result holds only aggregates over the held-out split,
    which must reach the site policy's min_cohort (else refused, exit 2); it is written
    to SITE/explanations/importance-<model hash>.json, which the site may choose to
    share. Per-image explanations: `medfed predict MODEL DICOM --explain`.
    """
    from medfed.inference.importance import site_importance, write_importance
    from medfed.inference.model_file import load_model

    try:
        loaded = load_model(model)
        report = site_importance(loaded, site, test_fraction, repeats, seed)
    except PredictError as exc:
        _fail(str(exc))
    try:
        written = write_importance(report, site)
    except OSError as exc:
        _fail(f"cannot write the result at the site: {exc}", 1)
    if fmt is OutputFormat.json:
        typer.echo(json.dumps({**report.to_dict(), "written": str(written)}, indent=2))
        return
    _show_importance(report, written)


# -- imaging ----------------------------------------------------------------------------
def _predict_imaging(
    loaded: LoadedModel, input_path: Path, saliency_dir: Path | None
) -> dict[str, Any]:
    try:
        from medfed.inference.imaging import predict_imaging
    except ImportError as exc:
        raise PredictError(f"imaging prediction is not available here ({exc})") from None
    predictions = predict_imaging(loaded.weights, loaded.meta, input_path, saliency_dir)
    return {
        "model": loaded.summary(),
        "task": loaded.task,
        "input": str(input_path),
        "predictions": [p.to_dict() for p in predictions],
        "saliency_dir": str(saliency_dir) if saliency_dir is not None else None,
        "notes": list(loaded.notes),
    }


def _show_imaging(payload: dict[str, Any]) -> None:
    _model_line(payload)
    table = Table(title="predictions")
    for name in ("image or series", "probability", "label", "saliency"):
        table.add_column(name, overflow="fold")
    for p in payload["predictions"]:
        table.add_row(
            p["source"], f"{p['probability']:.3f}", str(p["label"]), p["saliency_png"] or "-"
        )
    console.print(table)
    _notes(payload["notes"])


# -- tabular ----------------------------------------------------------------------------
def _show_tabular(payload: dict[str, Any]) -> None:
    _model_line(payload)
    risk = payload["task"] == "risk"
    table = Table(title="predictions")
    table.add_column("patient", overflow="fold")
    if risk:
        table.add_column("probability", justify="right")
        table.add_column("label", justify="right")
    else:
        table.add_column("progress", justify="right")
        table.add_column("95% interval", justify="right")
    for p in payload["predictions"]:
        if risk:
            table.add_row(p["id"], f"{p['probability']:.3f}", str(p["label"]))
        else:
            low_high = p["interval"]
            shown = f"{low_high[0]:.1f} to {low_high[1]:.1f}" if low_high else "-"
            table.add_row(p["id"], f"{p['value']:.1f}", shown)
    console.print(table)
    if payload["interval"]:
        console.print(f"interval: {payload['interval']['assumption']}", highlight=False)
    if payload["explanation"]:
        _show_contributions(payload)
    if payload["invalid_rows"]:
        bad = Table(title="invalid rows (not predicted)")
        for name in ("line", "column", "problem"):
            bad.add_column(name, overflow="fold")
        for row in payload["invalid_rows"]:
            bad.add_row(str(row["line"]), row["column"], row["reason"])
        console.print(bad)
    _notes(payload["notes"])


def _show_contributions(payload: dict[str, Any]) -> None:
    info = payload["explanation"]
    console.print(
        f"contributions on the {info['scale']} scale: {info['method']}; baseline: "
        f"{info['baseline']}",
        highlight=False,
    )
    for p in payload["predictions"]:
        how = p["explanation"]
        table = Table(title=f"{p['id']}: contributions")
        table.add_column("input")
        table.add_column("contribution", justify="right")
        ranked = sorted(how["contributions"].items(), key=lambda kv: -abs(kv[1]))
        for column, value in ranked:
            table.add_row(column, f"{value:+.3f}")
        table.add_row("[dim]baseline output[/]", f"{how['baseline_output']:.3f}")
        table.add_row("[dim]output[/]", f"{how['output']:.3f}")
        console.print(table)


# -- explain ----------------------------------------------------------------------------
def _show_importance(report: ImportanceReport, written: Path) -> None:
    model = report.model
    console.print(
        f"[bold]{model['model']} for {model['task']} on {model['dataset']}[/] "
        f"(model {model['sha256'][:16]}) at site {report.site_id}: "
        f"{report.held_out_patients} held-out patients (min cohort {report.min_cohort}), "
        f"{report.score} {report.baseline_score:.3f}",
        highlight=False,
    )
    table = Table(
        title=f"permutation importance (drop of {report.score}, {report.repeats} repeats)"
    )
    for name in ("input", "mean drop", "std"):
        table.add_column(name, justify="left" if name == "input" else "right")
    for item in report.permutation:
        table.add_row(item.column, f"{item.mean:+.4f}", f"{item.std:.4f}")
    console.print(table)
    if report.coefficients:
        coef = Table(title="coefficients (largest magnitude first)")
        coef.add_column("feature")
        coef.add_column("coefficient", justify="right")
        for row in report.coefficients:
            coef.add_row(row["feature"], f"{row['coefficient']:+.4f}")
        console.print(coef)
    _notes(report.notes)
    console.print(f"written at the site: {written}", highlight=False)


def _model_line(payload: dict[str, Any]) -> None:
    m = payload["model"]
    where = f", run {m['run_id']} round {m['round']}" if m["run_id"] else ""
    console.print(
        f"[bold]{m['model']} for {m['task']} on {m['dataset']}[/] "
        f"(model {m['sha256'][:16]}{where}); input {payload['input']}",
        highlight=False,
    )


def _notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[dim]note: {note}[/]", highlight=False)
