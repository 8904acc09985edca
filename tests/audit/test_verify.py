"""`medfed audit verify`: every kind of tampering is found and named, a clean trail passes."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.audit.trust import TrustError
from medfed.audit.verify import verify_directory
from medfed.cli.main import app
from medfed.common.ledger import LEDGER_TAG, LedgerEntry
from medfed.common.secagg.identity import generate_identity
from medfed.common.signed_log import entry_hash, key_id, sign_hash
from medfed.server.round_log import ROUND_LOG_TAG, RoundAttestation
from tests.audit.trail_builder import Trail, build_trail

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def trail(tmp_path: Path) -> Trail:
    return build_trail(tmp_path, sites=3, rounds=4, decline={"hospital-c": {3}})


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _problems(trail: Trail) -> list[str]:
    return [str(p) for p in verify_directory(trail.root).problems]


def _resigned(raw: dict, key, tag: bytes) -> str:
    """The line an attacker holding ``key`` would write for ``raw`` (hash and signature)."""
    raw = {**raw, "signer": key_id(key), "entry_hash": "", "signature": ""}
    raw["entry_hash"] = entry_hash(raw)
    raw["signature"] = sign_hash(key, tag, raw["entry_hash"])
    return json.dumps(raw, sort_keys=True)


def test_clean_trail_verifies(trail: Trail) -> None:
    result = verify_directory(trail.root)
    assert result.ok, result.problems
    assert result.counts() == {
        "ledgers": 3,
        "ledger_entries": 12,
        "round_records": 4,
        "signatures": 16,
    }
    assert "not checked against a consortium CA" in result.keys.source
    heads = result.summary()["heads"]
    assert heads["ledger hospital-a"]["entries"] == 4
    assert heads["rounds.jsonl"]["head"] == json.loads(_lines(trail.rounds)[-1])["entry_hash"]


def test_edited_entry_is_named(trail: Trail) -> None:
    path = trail.ledger("hospital-b")
    lines = _lines(path)
    raw = json.loads(lines[1])
    raw["epsilon"] = raw["epsilon"] / 2  # under-state the spend, leave the hash
    lines[1] = json.dumps(raw, sort_keys=True)
    _write(path, lines)
    problems = _problems(trail)
    assert any(
        p.startswith("ledgers/hospital-b.jsonl:2 (train hospital-b round 2 of run run-1)")
        and "edited" in p
        for p in problems
    ), problems


def test_rehashed_edit_fails_the_signature_and_the_next_link(trail: Trail) -> None:
    path = trail.ledger("hospital-a")
    lines = _lines(path)
    raw = json.loads(lines[0])
    raw["noise_multiplier"] = 5.0
    raw["entry_hash"] = entry_hash(raw)
    lines[0] = json.dumps(raw, sort_keys=True)
    _write(path, lines)
    problems = _problems(trail)
    assert any(p.startswith("ledgers/hospital-a.jsonl:1 ") and "signature" in p for p in problems)
    assert any(
        p.startswith("ledgers/hospital-a.jsonl:2 ") and "chain broken" in p for p in problems
    )


def test_deleted_middle_entry(trail: Trail) -> None:
    path = trail.ledger("hospital-a")
    lines = _lines(path)
    _write(path, [lines[0], *lines[2:]])
    problems = _problems(trail)
    assert any(p.startswith("ledgers/hospital-a.jsonl:2 ") and "deleted" in p for p in problems), (
        problems
    )


def test_entries_cut_from_the_end_are_found_by_the_coordinator_anchor(trail: Trail) -> None:
    path = trail.ledger("hospital-b")
    _write(path, _lines(path)[:-1])  # a valid chain, one entry shorter
    problems = _problems(trail)
    assert any(
        "round 4 of run run-1" in p and "hospital-b" in p and "removed from its end" in p
        for p in problems
    ), problems


def test_reordered_entries(trail: Trail) -> None:
    path = trail.ledger("hospital-c")
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    problems = _problems(trail)
    assert any(p.startswith("ledgers/hospital-c.jsonl:2 ") and "reordered" in p for p in problems)


def test_inserted_entry_signed_by_an_outsider(trail: Trail) -> None:
    path = trail.ledger("hospital-a")
    lines = _lines(path)
    raw = json.loads(lines[1])
    forged = {**raw, "round": 99, "prev_hash": raw["entry_hash"]}
    lines.insert(2, _resigned(forged, generate_identity(), LEDGER_TAG))
    _write(path, lines)
    problems = _problems(trail)
    assert any(
        p.startswith("ledgers/hospital-a.jsonl:3 (train hospital-a round 99") and "signature" in p
        for p in problems
    ), problems
    assert any(p.startswith("ledgers/hospital-a.jsonl:4 ") and "chain" in p for p in problems)


def test_entry_signed_with_another_sites_key(trail: Trail) -> None:
    path = trail.ledger("hospital-a")
    lines = _lines(path)
    raw = json.loads(lines[-1])
    lines[-1] = _resigned(
        {**raw, "epsilon": raw["epsilon"]}, trail.site_keys["hospital-b"], LEDGER_TAG
    )
    _write(path, lines)
    problems = _problems(trail)
    assert any("signed with hospital-b's key, not hospital-a's" in p for p in problems), problems


def test_site_rewriting_its_own_ledger_to_hide_a_spend(trail: Trail) -> None:
    """A site with its own key drops round 2 and re-chains: the coordinator's anchors differ."""
    path = trail.ledger("hospital-a")
    entries = [LedgerEntry(**json.loads(line)) for line in _lines(path)]
    key = trail.site_keys["hospital-a"]
    kept = [e for e in entries if e.round != 2]
    lines, prev = [], "0" * 64
    for e in kept:
        raw = {**asdict(e), "prev_hash": prev}
        line = _resigned(raw, key, LEDGER_TAG)
        lines.append(line)
        prev = json.loads(line)["entry_hash"]
    _write(path, lines)
    problems = _problems(trail)
    assert any(
        "round 2 of run run-1" in p and "hospital-a" in p and "not in its ledger" in p
        for p in problems
    ), problems
    assert any("records no spend for this round" in p for p in problems)


def test_recorded_epsilon_must_replay(trail: Trail) -> None:
    """Even a correctly signed entry (the site's own key) must state the true epsilon."""
    path = trail.ledger("hospital-b")
    lines = _lines(path)
    raw = json.loads(lines[0])
    lines[0] = _resigned(
        {**raw, "epsilon": raw["epsilon"] * 0.8}, trail.site_keys["hospital-b"], LEDGER_TAG
    )
    _write(path, lines[:1])  # only this entry: no chain problem after it
    problems = _problems(trail)
    assert any(p.startswith("ledgers/hospital-b.jsonl:1 ") and "replaying" in p for p in problems)


def test_edited_round_record(trail: Trail) -> None:
    lines = _lines(trail.rounds)
    raw = json.loads(lines[2])
    raw["participants"] = ["hospital-a"]
    raw["entry_hash"] = entry_hash(raw)
    lines[2] = json.dumps(raw, sort_keys=True)
    _write(trail.rounds, lines)
    problems = _problems(trail)
    assert any(
        p.startswith("rounds.jsonl:3 (round 3 of run run-1)") and "coordinator's signature" in p
        for p in problems
    ), problems


def test_deleted_last_round_record(trail: Trail) -> None:
    _write(trail.rounds, _lines(trail.rounds)[:-1])
    problems = _problems(trail)
    assert any(
        "round 4 of run run-1" in p and "no coordinator record for this round" in p
        for p in problems
    ), problems


def test_forged_round_record_signed_by_someone_else(trail: Trail) -> None:
    lines = _lines(trail.rounds)
    raw = json.loads(lines[-1])
    lines[-1] = _resigned({**raw, "dropped": ["hospital-c"]}, generate_identity(), ROUND_LOG_TAG)
    _write(trail.rounds, lines)
    assert any("coordinator's signature" in p for p in _problems(trail))


def test_models_must_chain(trail: Trail) -> None:
    key = trail.coordinator
    lines = _lines(trail.rounds)
    raw = json.loads(lines[-1])
    lines[-1] = _resigned({**raw, "model_sha256_in": "0" * 64}, key, ROUND_LOG_TAG)
    _write(trail.rounds, lines)
    problems = _problems(trail)
    assert any("starts from a model other than the one round 3 produced" in p for p in problems)


def test_missing_roster_is_an_error(trail: Trail) -> None:
    (trail.root / "roster.json").unlink()
    with pytest.raises(TrustError, match="roster"):
        verify_directory(trail.root)


def test_cli_exit_status_and_json(trail: Trail) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", str(trail.root)])
    assert ok.exit_code == 0, ok.output
    assert "VERIFIED" in ok.output
    path = trail.ledger("hospital-a")
    _write(path, _lines(path)[1:])
    bad = runner.invoke(app, ["audit", "verify", str(trail.root), "--json"])
    assert bad.exit_code == 1
    summary = json.loads(bad.output)
    assert summary["ok"] is False
    assert summary["problems"][0]["where"].startswith("ledgers/hospital-a.jsonl:1")
    missing = runner.invoke(app, ["audit", "verify", str(trail.root / "nope")])
    assert missing.exit_code == 2


def test_round_attestation_round_trips(trail: Trail) -> None:
    raw = json.loads(_lines(trail.rounds)[0])
    record = RoundAttestation(**raw)
    assert record.compute_hash() == raw["entry_hash"]
    assert record.signed_by(trail.coordinator.public_key())
    assert not replace(record, round=2).signed_by(generate_identity().public_key())


def _consortium(trail: Trail, tmp_path: Path, coordinator_name: str = "") -> Path:
    """Sign the trail's roster with a fresh consortium CA; certify the coordinator key."""
    from medfed.deploy.layout import COORDINATOR_SUBJECT
    from medfed.deploy.pki import (
        certificate_pem,
        create_ca,
        generate_supernode_key,
        issue_identity_certificate,
        supernode_public_openssh,
    )
    from medfed.deploy.roster import ConsortiumRoster, RosterSite, write_signed_roster

    ca_key, ca_cert = create_ca("Northgate", 30)
    sites = tuple(
        RosterSite(
            name,
            i + 1,
            key.public_key().public_bytes_raw(),
            supernode_public_openssh(generate_supernode_key(), name),
        )
        for i, (name, key) in enumerate(sorted(trail.site_keys.items()))
    )
    roster = ConsortiumRoster("Northgate", 1, "2026-11-30T10:00:00Z", sites)
    write_signed_roster(trail.root / "roster.json", roster, ca_key)
    cert = issue_identity_certificate(
        ca_key,
        ca_cert,
        coordinator_name or COORDINATOR_SUBJECT,
        "Northgate",
        trail.coordinator.public_key(),
        30,
    )
    (trail.root / "coordinator.pem").write_bytes(certificate_pem(cert))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certificate_pem(ca_cert))
    return ca


def test_ca_signed_roster_and_certified_coordinator(trail: Trail, tmp_path: Path) -> None:
    ca = _consortium(trail, tmp_path)
    result = verify_directory(trail.root, ca=ca)
    assert result.ok, result.problems
    assert "signature checked with the CA certificate" in result.keys.source
    assert "coordinator key certified by the CA" in result.keys.source


def test_edited_ca_signed_roster_is_refused(trail: Trail, tmp_path: Path) -> None:
    ca = _consortium(trail, tmp_path)
    roster = json.loads((trail.root / "roster.json").read_text())
    roster["sites"][0]["public_key"] = generate_identity().public_key().public_bytes_raw().hex()
    (trail.root / "roster.json").write_text(json.dumps(roster))
    with pytest.raises(TrustError, match="roster"):
        verify_directory(trail.root, ca=ca)


def test_coordinator_certificate_for_another_key(trail: Trail, tmp_path: Path) -> None:
    ca = _consortium(trail, tmp_path)
    other = build_trail(tmp_path / "other", sites=2, rounds=1)
    (trail.root / "coordinator.pub.pem").write_bytes(
        (other.root / "coordinator.pub.pem").read_bytes()
    )
    problems = [str(p) for p in verify_directory(trail.root, ca=ca).problems]
    assert any("certifies another key" in p for p in problems), problems
    assert any("coordinator's signature does not verify" in p for p in problems)


def test_a_sites_certificate_cannot_stand_for_the_coordinator(trail: Trail, tmp_path: Path) -> None:
    """A CA-issued certificate with a site's name does not certify a coordinator key."""
    ca = _consortium(trail, tmp_path, coordinator_name="hospital-a")
    problems = [str(p) for p in verify_directory(trail.root, ca=ca).problems]
    assert any("not a coordinator certificate" in p for p in problems), problems
