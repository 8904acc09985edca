"""Rich output for the CLI: a live round-by-round progress bar and the end-of-run summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from medfed.simulations.runner import SimulationResult


class RoundProgress:
    """Turns coordinator events into a progress bar over the planned rounds."""

    def __init__(self, console: Console, rounds: int) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("round {task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("starting Flower simulation", total=rounds)
        self.console = console

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "run-start":
            self._describe(f"{event.get('sites')} sites connected")
        elif kind == "round-start":
            self._describe(f"round {event['round']}: asking sites")
        elif kind == "asked":
            accepted = len(event.get("accepted", []))
            self._describe(f"round {event['round']}: {accepted} training (DP-SGD)")
            for site, reason in (event.get("declined") or {}).items():
                self.progress.console.print(
                    f"  [yellow]round {event['round']}: {site} declined[/]: {reason}"
                )
        elif kind == "round-end":
            self.progress.advance(self.task)
            metrics = event.get("aggregate_metrics") or {}
            shown = ", ".join(
                f"{k}={metrics[k]:.3f}"
                for k in ("auc", "accuracy", "mae", "r2")
                if isinstance(metrics.get(k), float)
            )
            self.progress.console.print(
                f"  round {event['round']}: {event['status']}"
                f" ({len(event.get('participants', []))} sites) {shown}"
            )
            if event.get("note"):
                self.progress.console.print(f"  [yellow]{event['note']}[/]")

    def _describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)


METRIC_ORDER = (
    "auc",
    "accuracy",
    "mean_site_auc",
    "mean_site_accuracy",
    "mae",
    "rmse",
    "r2",
    "loss",
)


def summary_tables(result: SimulationResult) -> list[Table]:
    """Per-site privacy table and global-metrics table."""
    delta = result.run["settings"]["delta"]
    sites = Table(title=f"Sites: privacy spent (δ={delta:g}) and data used")
    sites.add_column("site", no_wrap=True)
    for col in ("ε spent/budget", "noise σ", "rounds", "declined", "records", "skipped"):
        sites.add_column(col, justify="right")
    for site in sorted(result.run["sites"].values(), key=lambda s: s["site_id"]):
        sites.add_row(
            site["site_id"],
            f"{site['epsilon_spent']:.3f}/{site['epsilon_budget']:g}",
            f"{site['noise_multiplier']:.3f}",
            str(site["rounds_trained"]),
            str(site["rounds_declined"]),
            str(site["records_used"]),
            str(site["records_skipped"]),
        )
    metrics = Table(title="Global model on the sites' test splits")
    metrics.add_column("metric")
    metrics.add_column("federated, DP", justify="right")
    if result.reference is not None:
        metrics.add_column("pooled, no DP", justify="right")
    final = result.run.get("final_metrics") or {}
    for name in METRIC_ORDER:
        if name not in final and not (result.reference and name in result.reference):
            continue
        row = [name, _fmt(final.get(name))]
        if result.reference is not None:
            row.append(_fmt(result.reference.get(name)))
        metrics.add_row(*row)
    return [sites, metrics, *fairness_tables(result.run.get("fairness") or {})]


def fairness_tables(fairness: dict[str, Any]) -> list[Table]:
    """Per-group metrics and the gaps between groups; none when fairness was off."""
    if not fairness:
        return []
    regression = fairness.get("kind") == "regression"
    columns = FAIRNESS_REGRESSION if regression else FAIRNESS_BINARY
    groups = Table(
        title="Fairness: global model per subgroup (sites' test splits)",
        caption=_fairness_caption(fairness),
        caption_justify="left",
    )
    groups.add_column("group", no_wrap=True)
    groups.add_column("n", justify="right")
    groups.add_column("sites", justify="right")
    for _, label in columns:
        groups.add_column(label, justify="right")
    for name, group in (fairness.get("groups") or {}).items():
        sites = len(group.get("sites") or [])
        cells = [_fmt(group.get(key)) for key, _ in columns]
        groups.add_row(name, str(group.get("n", "—")), str(sites), *cells)
    gaps = Table(title="Fairness: gap between groups (largest - smallest; worst group)")
    gaps.add_column("attribute", no_wrap=True)
    for _, label in columns:
        gaps.add_column(label, justify="right")
    for attribute, gap in (fairness.get("gaps") or {}).items():
        worst = gap.get("worst_group") or {}
        gaps.add_row(
            attribute,
            *(_gap_cell(gap.get(key), worst.get(key)) for key, _ in columns),
        )
    return [groups, gaps] if fairness.get("gaps") else [groups]


FAIRNESS_BINARY = (
    ("auc", "AUC*"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("calibration_gap", "calibration gap"),
)
FAIRNESS_REGRESSION = (("mae", "MAE"), ("rmse", "RMSE"), ("bias", "bias"))


def _fairness_caption(fairness: dict[str, Any]) -> str:
    lines = []
    if fairness.get("kind") != "regression":
        lines.append(
            f"*AUC: n-weighted mean of per-site AUCs (not pooled). Sensitivity, specificity "
            f"and calibration gap (mean predicted - observed) pooled from summed counts at "
            f"threshold {fairness.get('threshold', 0.5)}."
        )
    suppressed = fairness.get("suppressed") or {}
    lines.append(
        "Withheld below the minimum cohort: "
        + ("; ".join(f"{s}: {', '.join(g)}" for s, g in suppressed.items()) or "none")
    )
    for site, why in (fairness.get("unavailable") or {}).items():
        lines.append(f"{site}: attributes unavailable ({why})")
    for site, why in (fairness.get("ignored") or {}).items():
        lines.append(f"{site}: report ignored ({why})")
    for site, why in (fairness.get("not_reported") or {}).items():
        lines.append(f"{site}: no subgroup figures ({why})")
    return "\n".join(lines)


def _gap_cell(value: Any, worst: Any) -> str:
    return f"{value:.4f} ({worst})" if isinstance(value, float) and worst else _fmt(value)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "—"
