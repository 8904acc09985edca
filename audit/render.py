"""Render a privacy-audit report (a JSON-able dict) as HTML, Markdown or JSON.

The report's sections are built once as a small document model (headings, paragraphs,
banners, tables, lists, plots) and then written out by an HTML or a Markdown writer, so
both formats always carry the same sections in the same order (:data:`SECTIONS`).

Everything in a report may come from a ledger, and ledgers are untrusted input: every
string is escaped on output (``html.escape`` for HTML; backslash escapes for Markdown),
and the HTML page carries a Content-Security-Policy that forbids scripts and network
loads, as a second line of defence. The HTML is one self-contained file: inline CSS,
plots embedded as ``data:`` images, no JavaScript, readable on paper.

Optional parts of the report may be ``None`` or empty; a section then says so instead of
being left out, so a reader can tell "nothing found" from "not rendered".

Report schema (built by :func:`medfed.audit.report.build_report`)::

    title, generated (ISO-8601), directory, medfed_version: str
    verification: {ok: bool, trust: str (where the keys came from),
                   checked: {ledgers, ledger_entries, round_records, signatures: int},
                   problems: [{where: str, what: str}]}
    run: None | {run_id, task, dataset, model: str, rounds_planned: int, status: str,
                 rounds: [{round: int, status: str, participants: [str],
                           declined: {site: reason}, model_sha256: str}]}
    secure_aggregation: {protocol: str, settings: {str: scalar}, note: str}
    threat_model: {covered: [str], not_covered: [str]}
    privacy_statement: {summary: str, covered: [str], not_covered: [str]}
    sites: [{site_id, signer: str, epsilon_budget: float | None, delta: float,
             accountant: str, samples_per_patient: int, unit_of_privacy: str,
             epsilon_spent: float, budget_remaining: float | None,  # dataset, all runs
             datasets: [{fingerprint: str, epsilon_spent: float,
                         budget_remaining: float | None}],
             rounds: [{run_id: str, round: int, kind: "train" | "decline",
                       epsilon: float (cumulative), noise_multiplier, sample_rate: float,
                       steps: int, max_grad_norm, delta: float, reason, timestamp: str}],
             second_opinion: None | {accountant: str, epsilon, primary_epsilon,
                                     relative_difference: float, flagged: bool, note: str}}]
    pitfalls: [{check: str, status: "pass" | "fail" | "unknown", evidence: str}]
    empirical: [{site_id: str, dp: bool, epsilon_lower_bound: float,
                 accountant_epsilon: float | None, confidence: float, canaries, guesses,
                 correct: int, verdict: str}]
    fairness: None | {source: str (run.json, unsigned), kind: "binary" | "regression",
                      attributes: [str], threshold: float, groups: {group: {n, sites,
                      auc, sensitivity, ...}}, by_site: {site: {group: {...}}},
                      gaps: {attribute: {metric: float, worst_group: {metric: group}}},
                      suppressed: {site: [group]}, unavailable, ignored, not_reported:
                      {site: str}, note: str, cohort_check: {status, evidence: str}}
                      (see :mod:`medfed.server.fairness`)
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from typing import Any

from medfed.audit.render_document import (
    Banner,
    Block,
    Bullets,
    Cell,
    Code,
    Facts,
    Heading,
    Para,
    Plot,
    Status,
    Table,
    as_dict,
    as_text,
)
from medfed.audit.render_sections import SECTIONS, build_document

__all__ = ["SECTIONS", "render_html", "render_json", "render_markdown"]

# --------------------------------------------------------------------------- public API


def render_json(report: Mapping[str, Any]) -> str:
    """The report itself, as indented JSON with sorted keys and a trailing newline."""
    return json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown (plots are described, not embedded)."""
    return "\n".join(_md_block(block) for block in build_document(report)).rstrip() + "\n"


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page: inline CSS, embedded plots, no scripts."""
    body = "\n".join(_html_block(block) for block in build_document(report))
    title = _e(as_text(as_dict(report).get("title")) or "Privacy audit report")
    return _HTML_PAGE.format(csp=_CSP, title=title, css=_CSS, body=body)


# ---------------------------------------------------------------------- HTML writer

_LONG_CODE = 24
_SYMBOLS = {"pass": "✔", "fail": "✘", "warn": "!", "unknown": "?"}
# Defence in depth: even if escaping failed, no script could run and nothing could load.
_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _html_cell(cell: Cell) -> str:
    if isinstance(cell, Status):
        kind = cell.kind if cell.kind in _SYMBOLS else "unknown"
        return f'<span class="st st-{kind}">{_SYMBOLS[kind]} {_e(cell.word)}</span>'
    if isinstance(cell, Code):
        # Long unbroken values (hashes, fingerprints) may wrap anywhere; short ids may not.
        wrap = ' class="long"' if len(cell.text) > _LONG_CODE else ""
        return f"<code{wrap}>{_e(cell.text)}</code>" if cell.text else "—"
    return _e(cell) if cell else "—"


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        anchor = f' id="{_e(block.anchor)}"' if block.anchor else ""
        return f"<h{block.level}{anchor}>{_e(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        status = _html_cell(block.status) + " " if block.status else ""
        return f"<p>{status}{_e(block.text)}</p>"
    if isinstance(block, Banner):
        kind = block.status.kind
        return (
            f'<div class="banner banner-{kind}" role="status"><strong>'
            f"{_html_cell(block.status)}</strong> {_e(block.text)}</div>"
        )
    if isinstance(block, Facts):
        rows = "".join(f"<dt>{_e(k)}</dt><dd>{_html_cell(v)}</dd>" for k, v in block.pairs)
        return f'<dl class="facts">{rows}</dl>'
    if isinstance(block, Table):
        return _html_table(block)
    if isinstance(block, Bullets):
        return _html_bullets(block)
    if isinstance(block, Plot):
        return _html_plot(block)
    links = "".join(f'<li><a href="#{_e(a)}">{_e(t)}</a></li>' for a, t in block.entries)
    return f'<nav class="contents"><h2 class="toc">Contents</h2><ol>{links}</ol></nav>'


def _html_table(table: Table) -> str:
    if not table.rows:
        return f'<p class="empty">{_e(table.empty)}</p>'
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in table.headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_bullets(bullets: Bullets) -> str:
    label = f'<p class="label">{_e(bullets.label)}</p>'
    if not bullets.items:
        return f'{label}<p class="empty">{_e(bullets.empty)}</p>'
    return label + "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in bullets.items) + "</ul>"


def _html_plot(plot: Plot) -> str:
    # Imported here: matplotlib is only needed for HTML, not for JSON or Markdown output.
    from medfed.audit.plots import epsilon_plot_svg, svg_data_uri

    svg = epsilon_plot_svg(plot.site)
    if svg is None:
        return '<p class="empty">No rounds recorded, so there is nothing to plot.</p>'
    return (
        f'<figure class="plot"><img src="{svg_data_uri(svg)}" alt="{_e(plot.alt)}">'
        f"<figcaption>{_e(plot.alt)} Dots: trained rounds; crosses: declined rounds; "
        "dashed line: budget.</figcaption></figure>"
    )


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""

_CSS = """
:root { color-scheme: light; }
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; font-size: 14px;
  line-height: 1.45; color: #111; background: #fff; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 32px; }
h1 { font-size: 24px; margin: 0 0 8px; }
h2 { font-size: 19px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #333; }
h3 { font-size: 16px; margin: 20px 0 6px; }
h4 { font-size: 14px; margin: 14px 0 4px; }
h2.toc { font-size: 15px; border: 0; margin: 12px 0 4px; }
nav.contents ol { margin: 0; columns: 2; }
code { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
code.long, dd { overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: left; vertical-align: top;
  overflow-wrap: break-word; }
thead th { background: #eceff3; }
tbody tr:nth-child(even) { background: #f8f9fa; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; }
dl.facts dt { font-weight: bold; }
dl.facts dd { margin: 0; }
p.label { font-weight: bold; margin: 10px 0 2px; }
p.empty { color: #444; font-style: italic; }
.st { font-weight: bold; white-space: nowrap; padding: 0 4px; border-radius: 3px;
  border: 1px solid; }
.st-pass { color: #0b5d1e; background: #e3f4e6; border-color: #0b5d1e; }
.st-fail { color: #8a1010; background: #fde4e4; border-color: #8a1010; }
.st-warn { color: #7a4a00; background: #fff1d6; border-color: #7a4a00; }
.st-unknown { color: #333; background: #eee; border-color: #666; }
.banner { padding: 10px 14px; border: 2px solid; border-radius: 4px; margin: 8px 0;
  font-size: 15px; }
.banner-pass { background: #e3f4e6; border-color: #0b5d1e; }
.banner-fail { background: #fde4e4; border-color: #8a1010; }
.banner .st { font-size: 18px; }
figure.plot { margin: 6px 0 10px; }
figure.plot img { width: 100%; max-width: 860px; height: auto; display: block; }
figcaption { font-size: 12px; color: #333; }
@page { size: A4; margin: 14mm; }
@media print {
  body { font-size: 11px; }
  table { font-size: 10px; }
  code { font-size: 9.5px; }
  main { max-width: none; padding: 0; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2, h3, h4 { break-after: avoid; }
  tr, figure, .banner { break-inside: avoid; }
  thead { display: table-header-group; }
  nav.contents { display: none; }
}
"""


# ------------------------------------------------------------------ Markdown writer

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#!])")
_MD_SYMBOLS = {"pass": "✔", "fail": "✘", "warn": "!", "unknown": "?"}
_MD_BULLET_START = re.compile(r"^([-+=])")
_MD_NUMBER_START = re.compile(r"^(\d+)([.)])")


def _m(text: str) -> str:
    """Escape untrusted text for inline Markdown: no markup, no HTML, one line, table-safe."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _m_line(text: str) -> str:
    """Like :func:`_m`, for text that starts a line (must not become a list or heading)."""
    escaped = _MD_BULLET_START.sub(r"\\\1", _m(text))
    return _MD_NUMBER_START.sub(r"\1\\\2", escaped)


def _md_cell(cell: Cell) -> str:
    if isinstance(cell, Status):
        return f"**{_MD_SYMBOLS.get(cell.kind, '?')} {_m(cell.word)}**"
    if isinstance(cell, Code) and re.fullmatch(r"[^`\\\s|]+", cell.text):
        return f"`{cell.text}`"  # a code span shows its text literally: only safe text goes in
    if isinstance(cell, Code):
        return _m(cell.text) or "—"
    return _m(cell) if cell else "—"


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {_m_line(block.text)}\n"
    if isinstance(block, Para):
        if block.status:
            return f"{_md_cell(block.status)} {_m(block.text)}\n"
        return f"{_m_line(block.text)}\n"
    if isinstance(block, Banner):
        return f"> {_md_cell(block.status)} {_m(block.text)}\n"
    if isinstance(block, Facts):
        return "".join(f"- **{_m(k)}:** {_md_cell(v)}\n" for k, v in block.pairs)
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, Bullets):
        items = "".join(f"- {_m_line(i)}\n" for i in block.items) or f"_{_m(block.empty)}_\n"
        return f"**{_m(block.label)}**\n\n{items}"
    if isinstance(block, Plot):
        return (
            "_Plot of cumulative ε over rounds against the budget: in the HTML report; "
            "the ledger-rounds table below holds the same figures._\n"
        )
    return "".join(f"{n}. [{_m(t)}](#{a})\n" for n, (a, t) in enumerate(block.entries, 1))


def _md_table(table: Table) -> str:
    if not table.rows:
        return f"_{_m(table.empty)}_\n"
    lines = [
        "| " + " | ".join(_m(h) for h in table.headers) + " |",
        "|" + "|".join("---" for _ in table.headers) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"
