"""The audit report renderers: sections, verdicts, escaping, robustness, self-containment."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medfed.audit.plots import epsilon_plot_svg
from medfed.audit.render import SECTIONS, render_html, render_json, render_markdown
from tests.audit.fairness_fixture import fairness_part, group
from tests.audit.report_fixture import NORTHGATE_DECLINES, minimal_report, sample_report

TITLES = [title for _, title in SECTIONS]
HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "main", "nav", "h1", "h2", "h3", "h4",
    "p", "div", "strong", "span", "code", "dl", "dt", "dd", "table", "thead", "tbody", "tr",
    "th", "td", "ul", "ol", "li", "a", "figure", "img", "figcaption",
}  # fmt: skip
VOID_TAGS = {"meta", "img"}
NETWORK_REFERENCE = re.compile(
    r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|@import|url\("""
)


class TagCollector(HTMLParser):
    """Every start tag with its attributes, h2 texts, and whether tags nest properly."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.h2: list[str] = []
        self.stack: list[str] = []
        self.mismatched: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID_TAGS:
            self.stack.append(tag)
        if tag == "h2":
            self.h2.append("")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.mismatched.append(tag)

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "h2":
            self.h2[-1] += data


def parse(page: str) -> TagCollector:
    collector = TagCollector()
    collector.feed(page)
    collector.close()
    return collector


def md_headings(markdown: str, level: int = 2) -> list[str]:
    prefix = "#" * level + " "
    return [line[len(prefix) :] for line in markdown.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def sample_html() -> str:
    return render_html(sample_report())


@pytest.fixture(scope="module")
def sample_md() -> str:
    return render_markdown(sample_report())


# ------------------------------------------------------------------------ structure


def test_every_section_in_order_in_html(sample_html: str) -> None:
    page = parse(sample_html)
    assert page.h2 == ["Contents", *TITLES]
    assert page.mismatched == [] and page.stack == []
    assert {tag for tag, _ in page.tags} <= ALLOWED_TAGS


def test_every_section_in_order_in_markdown(sample_md: str) -> None:
    assert md_headings(sample_md) == TITLES


def test_minimal_report_renders_every_section_in_every_format() -> None:
    report = minimal_report()
    page = render_html(report)
    assert parse(page).h2 == ["Contents", *TITLES]
    assert "This directory holds no run record." in page
    assert "No empirical audit was run" in page
    assert md_headings(render_markdown(report)) == TITLES
    assert json.loads(render_json(report)) == report


@pytest.mark.parametrize(
    "mangle",
    [
        lambda r: r.clear(),
        lambda r: r.update(sites=[None, "x", {"rounds": [None, {"epsilon": "x"}]}]),
        lambda r: r.update(verification=None, run={"rounds": None}, empirical=None),
        lambda r: r["sites"][0].update(epsilon_budget=None, budget_remaining=None,
                                       epsilon_spent=math.inf, second_opinion=None),
        lambda r: r["sites"][1]["rounds"][0].update(epsilon=math.nan, round=None),
    ],
)  # fmt: skip
def test_damaged_reports_render_without_crashing(mangle: Callable[[dict], Any]) -> None:
    report = sample_report()
    mangle(report)
    assert parse(render_html(report)).h2 == ["Contents", *TITLES]
    assert md_headings(render_markdown(report)) == TITLES


# ------------------------------------------------------------------------- verdicts


def test_verification_pass_banner(sample_html: str, sample_md: str) -> None:
    assert 'class="banner banner-pass"' in sample_html and "✔ PASS" in sample_html
    assert "> **✔ PASS**" in sample_md


def test_verification_fail_banner_names_every_problem() -> None:
    report = sample_report()
    problems = [
        {"where": "sites/northgate-general/ledger.jsonl:7", "what": "entry_hash does not match"},
        {"where": "runs/run-2025-06-cxr-01/round-3.json", "what": "signature by unknown key"},
    ]
    report["verification"].update(ok=False, problems=problems)
    report["sites"] = []  # no plots: this test is about the banner
    page, markdown = render_html(report), render_markdown(report)
    assert 'class="banner banner-fail"' in page and "✘ FAIL" in page
    assert "> **✘ FAIL**" in markdown
    for problem in problems:
        assert problem["where"] in page and problem["what"] in page
        assert problem["where"] in markdown
        assert problem["what"].replace("_", r"\_") in markdown  # Markdown-escaped


def test_declined_rounds_show_their_reasons(sample_html: str, sample_md: str) -> None:
    for reason in set(NORTHGATE_DECLINES.values()):
        assert reason.replace("'", "&#x27;") in sample_html
        assert reason in sample_md


def test_second_opinion_disagreement_is_flagged_in_words(sample_html: str, sample_md: str) -> None:
    assert sample_html.count("FLAGGED: DISAGREES") == 1
    assert "**✘ FLAGGED: DISAGREES**" in sample_md
    report = sample_report()
    report["sites"][0]["second_opinion"].update(relative_difference=0.07, flagged=False)
    assert render_markdown(report).count("FLAGGED: DISAGREES") == 2  # > 5% even if unflagged


def test_pitfall_failure_and_over_budget_are_shown(sample_html: str) -> None:
    assert "1 failed" in sample_html and "✘ FAIL" in sample_html
    report = sample_report()
    report["sites"][2]["epsilon_spent"] = 3.5
    for site in report["sites"]:
        site["rounds"] = []  # no plots: this test is about the verdicts
    report["empirical"][0]["epsilon_lower_bound"] = 3.2
    page = render_html(report)
    assert "OVER BUDGET" in page and "BOUND EXCEEDS ε" in page


# ------------------------------------------------------------------ untrusted input


def poison(value: Any, key: str = "") -> Any:
    """Append a script to every string value, and to the keys of free-form mappings."""
    if isinstance(value, str):
        return value + HOSTILE
    if isinstance(value, dict):
        free_keys = key in ("declined", "settings")
        return {(poison(k) if free_keys else k): poison(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [poison(v, key) for v in value]
    return value


def assert_inert_html(page: str) -> None:
    parsed = parse(page)
    tags = {tag for tag, _ in parsed.tags}
    assert "script" not in tags and tags <= ALLOWED_TAGS
    assert not [a for _, attrs in parsed.tags for a in attrs if a.startswith("on")]
    assert parsed.mismatched == [] and parsed.stack == []


def test_every_string_is_escaped_in_html() -> None:
    page = render_html(poison(sample_report()))
    assert_inert_html(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert [t for t, _ in parse(page).tags].count("img") == 3  # only the three plots


def test_every_string_is_escaped_in_markdown() -> None:
    markdown = render_markdown(poison(sample_report()))
    assert not re.search(r"(?<!\\)<", markdown)  # every "<" is backslash-escaped: no raw HTML
    assert r"\<script\>alert(1)\</script\>" in markdown
    assert_tables_intact(markdown)


def assert_tables_intact(markdown: str) -> None:
    """Every row of a Markdown table has as many unescaped cell separators as its header."""
    width = None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            width = None
            continue
        pipes = len(re.findall(r"(?<!\\)\|", line))
        width = width or pipes
        assert pipes == width, line


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=40), st.text(max_size=40))
def test_arbitrary_text_never_becomes_markup(site_id: str, reason: str) -> None:
    report = copy.deepcopy(minimal_report())
    report["sites"] = [{"site_id": site_id, "rounds": [], "second_opinion": None}]
    report["verification"]["problems"] = [{"where": site_id, "what": reason}]
    report["pitfalls"] = [{"check": reason, "status": "fail", "evidence": site_id}]
    report["run"] = {"run_id": site_id, "rounds": [{"round": 1, "declined": {site_id: reason}}]}
    assert_inert_html(render_html(report))
    markdown = render_markdown(report)
    assert md_headings(markdown) == TITLES
    assert_tables_intact(markdown)


# --------------------------------------------------------------- self-containment


def test_html_is_self_contained(sample_html: str) -> None:
    assert not NETWORK_REFERENCE.search(sample_html)
    assert "<script" not in sample_html.lower()
    assert 'http-equiv="Content-Security-Policy"' in sample_html
    sources = [attrs.get("src") or "" for tag, attrs in parse(sample_html).tags if tag == "img"]
    assert len(sources) == 3
    for source in sources:
        assert source.startswith("data:image/svg+xml;base64,")
        svg = base64.b64decode(source.split(",", 1)[1]).decode()
        assert "<svg" in svg and not re.search(r'href="(?:https?:)?//', svg)


def test_json_is_the_report_itself() -> None:
    text = render_json(sample_report())
    assert text.endswith("}\n")
    assert json.loads(text) == sample_report()


# ----------------------------------------------------------------------------- plots


def test_plot_is_deterministic_svg_and_absent_without_rounds() -> None:
    site = sample_report()["sites"][1]
    svg = epsilon_plot_svg(site)
    assert svg is not None and "<svg" in svg and "<text" not in svg  # glyphs drawn as paths
    assert epsilon_plot_svg(site) == svg
    assert epsilon_plot_svg({**site, "rounds": []}) is None


def test_plot_survives_odd_values() -> None:
    site = sample_report()["sites"][0]
    site["epsilon_budget"] = None
    site["rounds"][0].update(epsilon=math.nan, run_id="$\\frac{1}{0$")
    site["rounds"][1].update(epsilon=math.inf, round=None)
    site["rounds"][2]["epsilon"] = "not a number"
    assert epsilon_plot_svg(site) is not None


# -------------------------------------------------------------------------- fairness


def with_fairness(fairness: Any = None) -> dict[str, Any]:
    report = sample_report()
    report["fairness"] = fairness_part() if fairness is None else fairness
    return report


def test_fairness_section_is_labelled_unsigned_and_shows_groups_and_gaps() -> None:
    report = with_fairness()
    page, markdown = render_html(report), render_markdown(report)
    section = page[page.index('id="fairness"') :]
    assert "UNSIGNED" in section and "not signed" in section
    for name in ("sex=female", "sex=male", "age=&lt;50", "age=50-64", "age=65+"):
        assert name in section
    gaps = report["fairness"]["gaps"]["age"]
    assert f"{gaps['auc']:.4g} (worst: age=65+)" in section  # AUC gap and its worst group
    assert "n-weighted means of the per-site values" in section
    assert "northgate-general: age=&lt;50, age=50-64" in section  # withheld, by name only
    assert "riverside-childrens: not reported: test split of 14" in section
    assert "✔ PASS" in section  # group sizes against the signed minimum cohort
    md_section = markdown[markdown.index("## Fairness") :]
    assert "UNSIGNED" in md_section and r"age=\<50" in md_section
    assert_tables_intact(markdown)


def test_fairness_section_without_a_record_says_so() -> None:
    assert "records no fairness evaluation" in render_html(sample_report())
    assert "records no fairness evaluation" in render_markdown(minimal_report())


def test_fairness_cohort_failure_and_regression_columns() -> None:
    fairness = fairness_part()
    fairness["cohort_check"] = {"status": "fail", "evidence": "st-marys-london sex=male: n=7"}
    page = render_html(with_fairness(fairness))
    assert "✘ FAIL" in page[page.index('id="fairness"') :] and "n=7" in page
    regression = {"kind": "regression", "attributes": ["sex"], "source": "run.json",
                  "groups": {"sex=male": {"n": 40, "sites": ["a"], "mae": 6.5, "rmse": 8.25,
                                          "bias": -1.5}}}  # fmt: skip
    page = render_html(with_fairness(regression))
    section = page[page.index('id="fairness"') :]
    assert "MAE" in section and "8.25" in section and "Sensitivity" not in section


@pytest.mark.parametrize(
    "damage",
    [
        {},
        {"groups": None, "by_site": [1, 2], "gaps": {"sex": None}, "suppressed": "x"},
        {"groups": {"sex=male": None}, "by_site": {"a": None}, "cohort_check": 3},
        {"gaps": {"sex": {"auc": "x", "worst_group": ["a"]}}, "threshold": math.nan},
    ],
)
def test_damaged_fairness_renders(damage: dict[str, Any]) -> None:
    report = with_fairness({**fairness_part(), **damage})
    assert parse(render_html(report)).h2 == ["Contents", *TITLES]
    assert md_headings(render_markdown(report)) == TITLES


def test_hostile_fairness_text_stays_inert() -> None:
    fairness = fairness_part()
    hostile = {
        **fairness,
        "groups": {f"sex={HOSTILE}": fairness["groups"]["sex=male"], HOSTILE: {"n": HOSTILE}},
        "by_site": {HOSTILE: {HOSTILE: {"n": 30}}},
        "gaps": {HOSTILE: {"auc": 0.1, "worst_group": {"auc": HOSTILE}}},
        "suppressed": {HOSTILE: [HOSTILE]},
        "not_reported": {HOSTILE: HOSTILE},
        "note": HOSTILE,
    }
    page = render_html(with_fairness(hostile))
    assert_inert_html(page)
    assert [t for t, _ in parse(page).tags].count("img") == 3
    markdown = render_markdown(with_fairness(hostile))
    assert not re.search(r"(?<!\\)<", markdown)
    assert_tables_intact(markdown)


def test_report_takes_fairness_from_run_json_with_a_cohort_check(tmp_path: Path) -> None:
    from medfed.audit.report import build_report
    from medfed.audit.verify import verify_directory
    from medfed.server.fairness import combine
    from tests.audit.trail_builder import build_trail

    build_trail(tmp_path, sites=2, rounds=1)  # ledgers attest min_cohort 20
    reports = {
        "hospital-a": {"fairness": json.dumps({"version": 1, "suppressed": [], "groups": {
            "sex=female": group(10, 5, 20, 5, 0.8, 0.4)}})},
        "hospital-b": {"fairness": json.dumps({"version": 1, "suppressed": [], "groups": {
            "sex=female": group(2, 1, 3, 1, 0.8, 0.4)}})},  # 7 patients, under 20
    }  # fmt: skip
    run = {"run_id": "run-1", "settings": {"task": "risk"}, "status": "completed",
           "fairness": combine(reports, ("sex",))}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(run), encoding="utf-8")
    report = build_report(verify_directory(tmp_path))
    fairness = report["fairness"]
    assert "not signed" in fairness["source"]
    assert fairness["groups"]["sex=female"]["n"] == 47
    assert fairness["cohort_check"]["status"] == "fail"
    assert "hospital-b sex=female: n=7, minimum 20" in fairness["cohort_check"]["evidence"]
    del run["fairness"]
    (tmp_path / "run.json").write_text(json.dumps(run), encoding="utf-8")
    assert build_report(verify_directory(tmp_path))["fairness"] is None
