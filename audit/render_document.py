"""The report's document model and value formatting, shared by its HTML and Markdown writers.

A report is turned into a flat list of blocks (headings, paragraphs, banners, tables, ...)
by :mod:`medfed.audit.render_sections`; :mod:`medfed.audit.render` writes them out. The
formatting helpers here read the report defensively: a missing, ``None`` or mistyped
value becomes a placeholder such as ``—``, never an exception, because a report about a
damaged directory must still render.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Status:
    """A verdict shown as a word and a symbol as well as a colour (never colour alone)."""

    kind: str  # pass | fail | warn | unknown
    word: str


@dataclass(frozen=True)
class Code:
    """Text shown in a monospace font (hashes, fingerprints, identifiers)."""

    text: str


Cell = str | Status | Code


@dataclass(frozen=True)
class Heading:
    """A section heading; ``anchor`` becomes the HTML id that the contents link to."""

    level: int
    text: str
    anchor: str = ""


@dataclass(frozen=True)
class Para:
    """A paragraph, optionally led by a verdict."""

    text: str
    status: Status | None = None


@dataclass(frozen=True)
class Banner:
    """The report's headline verdict (verification PASS or FAIL)."""

    status: Status
    text: str


@dataclass(frozen=True)
class Facts:
    """Label/value pairs, e.g. a run's metadata."""

    pairs: list[tuple[str, Cell]]


@dataclass(frozen=True)
class Table:
    """A table; ``empty`` is said instead when there are no rows."""

    headers: list[str]
    rows: list[list[Cell]]
    empty: str = "None."


@dataclass(frozen=True)
class Bullets:
    """A labelled list; ``empty`` is said instead when there are no items."""

    label: str
    items: list[str]
    empty: str = "None stated."


@dataclass(frozen=True)
class Plot:
    """A site's epsilon plot; drawn only by the HTML writer (Markdown describes it)."""

    site: Mapping[str, Any]
    alt: str


@dataclass(frozen=True)
class Contents:
    """Links to the report's sections: (anchor, heading) pairs."""

    entries: list[tuple[str, str]]


Block = Heading | Para | Banner | Facts | Table | Bullets | Plot | Contents


# ---------------------------------------------------------------- value formatting


def as_dict(value: object) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def as_list(value: object) -> list[Any]:
    """``value`` as a list if it is a list or tuple, else an empty list."""
    return list(value) if isinstance(value, list | tuple) else []


def as_text(value: object) -> str:
    """``value`` as text; ``None`` is empty."""
    return "" if value is None else str(value)


def as_strings(value: object) -> list[str]:
    """Every item of a list, as text."""
    return [as_text(item) for item in as_list(value)]


def is_number(value: object) -> bool:
    """True for int and float, not bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def num(value: object) -> str:
    """A number to 4 significant figures; ``—`` when absent, ``∞`` when infinite."""
    if value is None:
        return "—"
    if not is_number(value):
        return as_text(value)
    number = float(value)  # type: ignore[arg-type]
    if math.isnan(number):
        return "n/a"
    if math.isinf(number):
        return "∞" if number > 0 else "-∞"
    return f"{number:.4g}"


def integer(value: object) -> str:
    """A whole number as is; anything else as :func:`num` shows it."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else num(value)


def percent(value: object) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{float(value):.1%}" if is_number(value) and math.isfinite(value) else num(value)  # type: ignore[arg-type]


def span(rounds: Iterable[Mapping[str, Any]], key: str) -> str:
    """One value, or ``min to max`` when the rounds used several; ``—`` when none trained."""
    values = sorted({float(r[key]) for r in rounds if is_number(r.get(key))})
    if not values:
        return "—"
    return num(values[0]) if len(values) == 1 else f"{num(values[0])} to {num(values[-1])}"
