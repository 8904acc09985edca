"""`medfed card OUT`: (re)build a run's model card from OUT/run.json.

Every run writes its card when it ends; this command rebuilds it, for runs made before
cards existed or after a card was lost. It writes OUT/model_card.md and
OUT/model_card.json and prints the card (Markdown, or JSON with ``--format json``).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line


class CardFormat(StrEnum):
    md = "md"
    json = "json"


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _load(out_dir: Path) -> dict:
    """OUT/run.json as a dict; exit 2 naming the file when it is missing or unreadable."""
    from medfed.server.run_record import RUN_RECORD_NAME

    path = out_dir / RUN_RECORD_NAME
    if not path.is_file():
        _fail(f"{path}: no run record (expected the output folder of a medfed run)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        _fail(f"{path}: cannot read the run record ({exc})")
    return data


def card(
    out: Path = typer.Argument(
        ..., help="A run's output folder (holding run.json).", show_default=False
    ),
    output_format: CardFormat = typer.Option(
        CardFormat.md, "--format", help="What to print: the Markdown card or its JSON twin."
    ),
) -> None:
    """Write the model card of a run (OUT/model_card.md and .json) and print it.

    The card states the model's intended use, the data sites and their sizes, each
    site's privacy spend and what the guarantee does not cover, the metrics overall,
    by site and by group, and known limitations. Exit status 2 when OUT/run.json is
    missing or is not a medfed run record.
    """
    from medfed.server.model_card import write_model_card
    from medfed.server.run_record import RunRecordError

    data = _load(out)
    try:
        md_path, json_path = write_model_card(out, data)
    except RunRecordError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write the model card in {out}: {exc}", code=1)
    path = json_path if output_format is CardFormat.json else md_path
    typer.echo(path.read_text(encoding="utf-8"), nl=False)
    err_console.print(f"model card written: {md_path} and {json_path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `medfed card` to the medfed command."""
    app.command("card")(card)
