"""Plots for the privacy-audit report: each site's epsilon over its rounds against its budget.

The figures are drawn with matplotlib's object API (``Figure``, never ``pyplot``), so no
global figure registry or interactive backend is involved, and saved as SVG with text
converted to paths: the report stays one self-contained file that needs no fonts, and
the plot prints sharply. :func:`svg_data_uri` wraps an SVG for an ``<img>`` tag, which
keeps every figure's internal ids apart from the page's and from each other.

Ledger contents are untrusted, so no free text from the report reaches a plot except
run ids, drawn with mathtext off (a ``$`` in a run id must not be parsed as TeX).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib
from matplotlib.figure import Figure

# Colour-blind-safe pair (Okabe-Ito) plus marker shapes, so the plot reads in grey print.
TRAIN_COLOUR = "#0072B2"
DECLINE_COLOUR = "#D55E00"
BUDGET_COLOUR = "#444444"
RUN_LABEL_CHARS = 18
FIGSIZE = (7.0, 2.8)  # inches; the HTML scales the SVG to the page width

_SVG_RC = {
    "svg.fonttype": "path",  # glyphs as paths: no font needed to view the report
    "svg.hashsalt": "medfed-audit",  # deterministic ids, so the same report renders the same
    "font.size": 9,
}


@dataclass(frozen=True)
class EpsilonSeries:
    """One site's ledger rounds in order: what the epsilon plot draws."""

    epsilon: list[float]
    declined: list[bool]
    round_labels: list[str]
    run_starts: list[tuple[int, str]]  # (index of the run's first round, run id)
    budget: float | None


def epsilon_series(site: Mapping[str, Any]) -> EpsilonSeries:
    """Collect a site's cumulative epsilon per ledger round, in ledger order.

    The ledger's ``epsilon`` is already cumulative for the dataset (over all runs), so
    it is plotted as recorded; a declined round keeps the epsilon it was declined at.
    """
    listed = site.get("rounds")
    listed = listed if isinstance(listed, list | tuple) else []
    rounds = [r for r in listed if isinstance(r, Mapping)]
    series = EpsilonSeries([], [], [], [], _finite_or_none(site.get("epsilon_budget")))
    previous_run: object = object()
    for index, entry in enumerate(rounds):
        series.epsilon.append(_as_float(entry.get("epsilon")))
        series.declined.append(entry.get("kind") != "train")
        series.round_labels.append(str(entry.get("round", "")))
        if entry.get("run_id") != previous_run:
            previous_run = entry.get("run_id")
            series.run_starts.append((index, str(previous_run or "")))
    return series


def epsilon_plot_svg(site: Mapping[str, Any]) -> str | None:
    """Draw the site's epsilon-over-rounds plot with its budget line; ``None`` if no rounds."""
    series = epsilon_series(site)
    if not series.epsilon:
        return None
    with matplotlib.rc_context(_SVG_RC):
        fig = Figure(figsize=FIGSIZE)
        # Fixed margins rather than a layout engine: half the drawing time, same result.
        fig.subplots_adjust(left=0.085, right=0.985, top=0.95, bottom=0.28)
        ax = fig.subplots()
        _draw_series(ax, series)
        _draw_budget(ax, series.budget)
        _draw_runs(ax, series)
        _label_axes(ax, series)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def svg_data_uri(svg: str) -> str:
    """Return ``svg`` as a base64 ``data:`` URI, for ``<img src=...>``."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _draw_series(ax: Any, series: EpsilonSeries) -> None:
    """The cumulative-epsilon line, trained rounds as dots and declined rounds as crosses."""
    xs = list(range(1, len(series.epsilon) + 1))
    ax.plot(xs, series.epsilon, color=TRAIN_COLOUR, linewidth=1.5, zorder=2)
    trained = [(x, e) for x, e, d in zip(xs, series.epsilon, series.declined, strict=True) if not d]
    declined = [(x, e) for x, e, d in zip(xs, series.epsilon, series.declined, strict=True) if d]
    if trained:
        ax.scatter(
            *zip(*trained, strict=True),
            marker="o",
            s=22,
            color=TRAIN_COLOUR,
            label="trained round (cumulative ε)",
            zorder=3,
        )
    if declined:
        ax.scatter(
            *zip(*declined, strict=True),
            marker="X",
            s=48,
            color=DECLINE_COLOUR,
            label="declined round",
            zorder=4,
        )


def _draw_budget(ax: Any, budget: float | None) -> None:
    """A dashed horizontal line at the site's lifetime budget, when it has one."""
    if budget is not None:
        ax.axhline(
            budget,
            color=BUDGET_COLOUR,
            linestyle="--",
            linewidth=1.2,
            label=f"budget ε = {budget:.4g}",
        )


def _draw_runs(ax: Any, series: EpsilonSeries) -> None:
    """Mark where each run begins when the ledger spans more than one run."""
    if len(series.run_starts) < 2:
        return
    for index, run_id in series.run_starts:
        x = index + 0.5
        ax.axvline(x, color="#999999", linestyle=":", linewidth=0.8, zorder=1)
        ax.annotate(
            _short(run_id),
            xy=(x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            va="top",
            fontsize=7,
            color="#555555",
            parse_math=False,
        )


def _label_axes(ax: Any, series: EpsilonSeries) -> None:
    """Axes, ticks at every round (thinned when there are many), legend below the plot."""
    count = len(series.epsilon)
    step = max(1, math.ceil(count / 25))
    ticks = list(range(1, count + 1, step))
    ax.set_xticks(ticks, [series.round_labels[t - 1] for t in ticks])
    ax.set_xlim(0.5, count + 0.5)
    finite = [e for e in series.epsilon if math.isfinite(e)]
    top = max([*finite, series.budget or 0.0, 1e-9])
    ax.set_ylim(0.0, top * 1.12)
    ax.set_xlabel("round (ledger order)")
    ax.set_ylabel("cumulative ε")
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.figure.legend(loc="lower center", ncols=3, frameon=False, borderaxespad=0.2)


def _short(text: str) -> str:
    return text if len(text) <= RUN_LABEL_CHARS else text[: RUN_LABEL_CHARS - 1] + "…"


def _as_float(value: object) -> float:
    """A number for the plot; anything unreadable becomes NaN (a gap), never an error."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _finite_or_none(value: object) -> float | None:
    number = _as_float(value) if value is not None else math.nan
    return number if math.isfinite(number) else None
