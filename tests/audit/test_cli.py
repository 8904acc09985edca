"""`medfed audit report` and `medfed audit empirical` as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli.main import app
from medfed.client.policy import SitePolicy, write_policy
from medfed.simulations.synthetic import generate_risk_sites
from tests.audit.trail_builder import Trail, build_trail

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

runner = CliRunner()


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Trail:
    root = tmp_path_factory.mktemp("trail")
    return build_trail(root, sites=3, rounds=3, decline={"hospital-b": {2}})


def test_report_html_by_default(trail: Trail) -> None:
    done = runner.invoke(app, ["audit", "report", str(trail.root)])
    assert done.exit_code == 0, done.output
    html = (trail.root / "audit-report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "site policy: maintenance window" in html  # hospital-b's decline reason
    assert "data:image/svg+xml;base64," in html


def test_report_markdown_and_json(trail: Trail, tmp_path: Path) -> None:
    md = tmp_path / "report.md"
    assert runner.invoke(app, ["audit", "report", str(trail.root), "--format", "md",
                               "--out", str(md)]).exit_code == 0  # fmt: skip
    text = md.read_text(encoding="utf-8")
    for heading in ("Verification", "Per-site privacy spend", "Privacy statement",
                    "Second opinion on epsilon", "Pitfall checks"):  # fmt: skip
        assert f"## {heading}" in text
    out = tmp_path / "report.json"
    done = runner.invoke(app, ["audit", "report", str(trail.root), "--format", "json",
                               "--out", str(out)])  # fmt: skip
    assert done.exit_code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["verification"]["ok"] is True
    sites = {s["site_id"]: s for s in report["sites"]}
    assert [r["kind"] for r in sites["hospital-b"]["rounds"]] == ["train", "decline", "train"]
    assert sites["hospital-a"]["budget_remaining"] == pytest.approx(
        sites["hospital-a"]["epsilon_budget"] - sites["hospital-a"]["epsilon_spent"]
    )
    for site in sites.values():
        assert site["second_opinion"]["flagged"] is False


def test_report_of_a_tampered_folder_says_failed(trail: Trail, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in trail.root.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(trail.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    ledger = copy / "ledgers" / "hospital-c.jsonl"
    lines = ledger.read_text(encoding="utf-8").splitlines()
    ledger.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    out = copy / "r.json"
    done = runner.invoke(app, ["audit", "report", str(copy), "--format", "json", "--out", str(out)])
    assert done.exit_code == 1
    assert "FAILED" in done.output
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["verification"]["ok"] is False
    assert report["verification"]["problems"]


def test_empirical_writes_its_result_for_the_report(tmp_path: Path) -> None:
    [site] = generate_risk_sites(1, tmp_path / "sites", seed=5, size_scale=0.1)
    write_policy(site / "site.toml", SitePolicy(site_id="hospital-z"))
    out = tmp_path / "run" / "empirical" / "z.json"
    done = runner.invoke(
        app,
        ["audit", "empirical", "--data", str(site), "--rounds", "1", "--batch-size", "16",
         "--canaries", "40", "--seed", "3", "--out", str(out), "--json"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["site_id"] == "hospital-z" and result["dp"] is True
    assert 0 <= result["epsilon_lower_bound"] <= result["accountant_epsilon"]
    assert json.loads(done.output)["seed"] == 3


def test_empirical_names_a_missing_policy(tmp_path: Path) -> None:
    done = runner.invoke(app, ["audit", "empirical", "--data", str(tmp_path)])
    assert done.exit_code == 2
    assert "site.toml" in done.output
