"""Render a model card (the dict :func:`medfed.server.model_card.build_model_card` makes)
as Markdown: the same content as model_card.json, for people.

Only a table cell's pipe and line breaks are escaped; everything else is written as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

#: Per-group metrics in the order a reader expects them (binary, then regression).
GROUP_COLUMNS = (
    "n",
    "positives",
    "auc",
    "auc_method",
    "sensitivity",
    "specificity",
    "observed_rate",
    "mean_predicted",
    "calibration_gap",
    "ece",
    "mae",
    "rmse",
    "bias",
)


def fmt(value: Any) -> str:
    """A cell: floats to 4 decimals (whole ones bare, tiny ones to 3 digits), lists joined."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if value.is_integer():
            return f"{value:g}"
        return f"{value:.3g}" if abs(value) < 1e-3 else f"{value:.4f}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def _cell(value: Any) -> str:
    text = fmt(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table (one header row, one separator, the rows)."""
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _bullets(items: Iterable[str]) -> list[str]:
    return [f"- {item}" for item in items]


def render_model_card_markdown(card: dict[str, Any]) -> str:
    """The whole card as one Markdown document."""
    details = card["model_details"]
    lines = [
        f"# Model card: {details['task']} on {details['dataset']}, run {details['run_id']}",
        "",
        f"Generated {card['generated']} by medfed {details['medfed_version']} from the "
        "run's record (run.json). The machine-readable twin of this card is model_card.json.",
    ]
    for section in (
        _model_details,
        _intended_use,
        _training_data,
        _privacy,
        _metrics,
        _limitations,
    ):
        lines += ["", *section(card)]
    return "\n".join(lines) + "\n"


def _model_details(card: dict[str, Any]) -> list[str]:
    d = card["model_details"]
    ckpt = d["final_checkpoint"] or {}
    inputs = d["inputs"]
    rows = [
        ("Run id", d["run_id"]),
        ("Flower run id", d["flower_run_id"] or "-"),
        ("Status", d["status"] + (f" ({d['error']})" if d["error"] else "")),
        ("Task", d["task"]),
        ("Dataset", d["dataset"]),
        ("Model", f"{d['model']}: {d['architecture']}"),
        (
            "Inputs",
            f"{len(inputs['features'])} features: {', '.join(inputs['features'])}"
            if "features" in inputs
            else f"sample shape {inputs.get('sample_shape', '?')}",
        ),
        (
            "Rounds",
            f"{d['rounds_aggregated']} aggregated of {d['rounds_recorded']} recorded "
            f"({d['rounds_planned']} planned; {d['resumes']} resume(s))",
        ),
        ("Final checkpoint", f"{ckpt['path']} (round {ckpt['round']})" if ckpt else "none"),
        ("Model SHA-256 (weights)", ckpt.get("model_sha256")),
        ("Checkpoint file SHA-256", ckpt.get("file_sha256") or "file not found"),
        ("Started", d["started"]),
        ("Finished", d["finished"]),
        ("medfed version", d["medfed_version"]),
        ("Local training", ", ".join(f"{k} {fmt(v)}" for k, v in d["training"].items())),
    ]
    return ["## Model details", "", *table(["Field", "Value"], rows)]


def _intended_use(card: dict[str, Any]) -> list[str]:
    use = card["intended_use"]
    return [
        "## Intended use",
        "",
        f"Purpose: {use['purpose']}",
        "",
        "Intended use:",
        "",
        *_bullets(use["intended"]),
        "",
        "Out of scope:",
        "",
        *_bullets(use["out_of_scope"]),
    ]


def _training_data(card: dict[str, Any]) -> list[str]:
    data = card["training_data"]
    rows = [
        (
            s["site_id"],
            s["records_used"],
            s["records_skipped"],
            s["train_records"],
            s["test_records"] if s["test_released"] else "not released",
        )
        for s in data["sites"]
    ]
    return [
        "## Training data",
        "",
        f"Dataset: {data['dataset']}. {data['provenance']}",
        "",
        f"Split: {data['split']}.",
        "",
        *table(["Site", "Records used", "Records skipped", "Train", "Test"], rows),
        "",
        f"{data['records_used_total']} records used in all. {data['note']}",
    ]


def _privacy(card: dict[str, Any]) -> list[str]:
    p = card["privacy"]
    rows = [
        (
            s["site_id"],
            s["epsilon_spent"],
            s["epsilon_budget"],
            s["noise_multiplier"],
            s["rounds_trained"],
            s["rounds_declined"],
            s["note"] or "-",
        )
        for s in p["sites"]
    ]
    secagg = p["secure_aggregation"]
    return [
        "## Privacy guarantees",
        "",
        *_bullets(
            [
                f"Unit of privacy: {p['unit_of_privacy']}.",
                f"Mechanism: {p['mechanism']}",
                f"Accountant: {p['accountant']}",
                f"Target epsilon of this run, per site: {fmt(p['epsilon_target_per_run'])}; "
                f"delta {fmt(p['delta'])}. {p['delta_note']}",
                f"Secure aggregation ({secagg['protocol']}): {secagg['summary']}",
            ]
        ),
        "",
        *table(
            [
                "Site",
                "Epsilon spent (lifetime, this dataset)",
                "Epsilon budget",
                "Noise multiplier",
                "Rounds trained",
                "Rounds declined",
                "Note",
            ],
            rows,
        ),
        "",
        "Covered:",
        "",
        *_bullets(p["covered"]),
        "",
        "Not covered:",
        "",
        *_bullets(p["not_covered"]),
        "",
        p["verify"],
    ]


def _metrics(card: dict[str, Any]) -> list[str]:
    m = card["metrics"]
    overall = [(k, v) for k, v in m["overall"].items()]
    lines = [
        "## Metrics",
        "",
        f"Model of round {fmt(m['evaluated_round'])}, evaluated by each site on its own "
        "test split.",
        "",
        "### Overall",
        "",
        *(table(["Metric", "Value"], overall) if overall else ["No overall metrics."]),
        "",
        m["overall_note"],
        "",
        "### By site",
        "",
        *_site_table(m["by_site"]),
        "",
        "### By group",
        "",
        *_group_section(m["by_group"]),
    ]
    return lines


def _site_table(by_site: list[dict[str, Any]]) -> list[str]:
    names = sorted({k for s in by_site for k in s["metrics"]})
    rows = []
    for s in by_site:
        status = s["status"] + (f": {s['reason']}" if s.get("reason") else "")
        rows.append([s["site_id"], status, s["n"], *(s["metrics"].get(name) for name in names)])
    return table(["Site", "Status", "n", *names], rows) if rows else ["No site reports."]


def _group_columns(groups: Iterable[dict[str, Any]]) -> list[str]:
    present = {k for g in groups for k in g}
    return [c for c in GROUP_COLUMNS if c in present]


def _group_section(g: dict[str, Any]) -> list[str]:
    if not g["available"]:
        return [g["note"]]
    if not g["groups"]:
        lines = ["No group figures were released (all suppressed or not reported)."]
        return lines + _group_notes(g)
    cols = _group_columns(g["groups"].values())
    rows = [
        [name, ", ".join(map(str, v.get("sites") or [])), *(v.get(c) for c in cols)]
        for name, v in g["groups"].items()
    ]
    lines = [
        f"Attributes: {', '.join(g['attributes']) or '-'}; decision threshold "
        f"{fmt(g['threshold'])}.",
        "",
        *table(["Group", "Sites", *cols], rows),
    ]
    site_rows = [
        [site, name, *(v.get(c) for c in cols)]
        for site, groups in sorted(g["by_site"].items())
        for name, v in groups.items()
    ]
    if site_rows:
        lines += ["", "By site and group:", "", *table(["Site", "Group", *cols], site_rows)]
    gap_rows = [
        [attr, metric, value, (gaps.get("worst_group") or {}).get(metric)]
        for attr, gaps in g["gaps"].items()
        for metric, value in (gaps or {}).items()
        if metric != "worst_group"
    ]
    if gap_rows:
        lines += [
            "",
            "Gaps between the groups of each attribute (largest minus smallest):",
            "",
            *table(["Attribute", "Metric", "Gap", "Worst group"], gap_rows),
        ]
    return lines + _group_notes(g)


def _group_notes(g: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    suppressed = [
        f"{site}: {', '.join(map(str, names))}" for site, names in g["suppressed"].items() if names
    ]
    if suppressed:
        lines += ["", "Suppressed (below the site's minimum cohort):", "", *_bullets(suppressed)]
    missing = [f"{site}: {why}" for site, why in g["not_reported"].items()]
    if missing:
        lines += ["", "No group metrics from:", "", *_bullets(missing)]
    lacking = [f"{site}: {why}" for site, why in (g.get("unavailable") or {}).items()]
    if lacking:
        lines += ["", "Subgroup attributes unavailable at:", "", *_bullets(lacking)]
    if g.get("note"):
        lines += ["", str(g["note"])]
    return lines


def _limitations(card: dict[str, Any]) -> list[str]:
    return ["## Known limitations", "", *_bullets(card["limitations"])]
