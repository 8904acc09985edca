"""The hash-chained privacy ledger: round trip, chain, tamper detection, filtering."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from medfed.common.ledger import (
    GENESIS,
    LEDGER_NAME,
    LedgerEntry,
    LedgerError,
    read_ledger,
    spends_for,
)
from medfed.common.ledger import append_entry as append_signed
from medfed.common.privacy import Spend, epsilon_of
from medfed.common.secagg.identity import generate_identity

DELTA = 1e-5
FP_A = "a" * 64
FP_B = "b" * 64

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SITE_KEY = generate_identity()


def append_entry(path: Path, entry: LedgerEntry) -> LedgerEntry:
    """Append signed with the test site's key (signatures are checked in tests/audit)."""
    return append_signed(path, entry, SITE_KEY)


def _entry(
    history: list[Spend],
    spend: Spend,
    *,
    round_: int,
    fingerprint: str = FP_A,
    run_id: str = "run-1",
    kind: str = "train",
) -> LedgerEntry:
    """A train entry whose epsilon is the replay of ``history`` plus ``spend``."""
    if kind == "train":
        history.append(spend)
    return LedgerEntry(
        kind=kind,  # type: ignore[arg-type]
        site_id="h1",
        run_id=run_id,
        round=round_,
        dataset_fingerprint=fingerprint,
        accountant="rdp",
        noise_multiplier=spend.noise_multiplier if kind == "train" else 0.0,
        sample_rate=spend.sample_rate if kind == "train" else 0.0,
        steps=spend.steps if kind == "train" else 0,
        max_grad_norm=1.0,
        delta=DELTA,
        epsilon=epsilon_of(history, DELTA) if kind == "train" else 0.0,
        num_samples=1000,
        samples_per_patient=1,
        reason="" if kind == "train" else "budget exhausted",
        timestamp="2024-01-01T00:00:00+00:00",
    )


# Full-batch spends (sample rate 1) keep the RDP computation fast; subsampled
# composition is covered in test_privacy.py.
SPENDS = [Spend(2.0, 1.0, 4), Spend(2.5, 1.0, 3), Spend(2.0, 1.0, 5)]


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[Path, list[LedgerEntry]]:
    path = tmp_path / LEDGER_NAME
    history: list[Spend] = []
    written = [append_entry(path, _entry(history, s, round_=i + 1)) for i, s in enumerate(SPENDS)]
    return path, written


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _rehash(raw: dict) -> dict:
    """Recompute entry_hash for a (possibly forged) raw entry."""
    entry = LedgerEntry(**{**raw, "entry_hash": ""})
    return {**raw, "entry_hash": entry.compute_hash()}


def _raises_at(path: Path, line: int) -> str:
    with pytest.raises(LedgerError) as info:
        read_ledger(path)
    msg = str(info.value)
    assert f"{path}:{line}:" in msg, msg
    return msg


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_ledger(tmp_path / "nope.jsonl") == []


def test_append_then_read_round_trip(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, written = ledger
    entries = read_ledger(path)
    assert entries == written
    assert [e.round for e in entries] == [1, 2, 3]
    assert len(_lines(path)) == 3
    for entry in entries:
        assert entry.entry_hash == entry.compute_hash()
        assert len(entry.entry_hash) == 64


def test_chain_links(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    entries = read_ledger(path)
    assert entries[0].prev_hash == GENESIS
    assert entries[1].prev_hash == entries[0].entry_hash
    assert entries[2].prev_hash == entries[1].entry_hash
    assert len({e.entry_hash for e in entries}) == 3


def test_recorded_epsilons_grow(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    eps = [e.epsilon for e in read_ledger(path)]
    assert eps[0] < eps[1] < eps[2]


def test_append_ignores_given_hashes(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    entry = replace(_entry([], SPENDS[0], round_=1), prev_hash="f" * 64, entry_hash="junk")
    written = append_entry(path, entry)
    assert written.prev_hash == GENESIS
    assert read_ledger(path) == [written]


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon", 0.001), ("noise_multiplier", 5.0), ("steps", 1), ("run_id", "other")],
)
def test_edited_field_in_line_2(
    ledger: tuple[Path, list[LedgerEntry]], field: str, value: object
) -> None:
    path, _ = ledger
    lines = _lines(path)
    raw = json.loads(lines[1])
    raw[field] = value
    lines[1] = json.dumps(raw, sort_keys=True)
    _write_lines(path, lines)
    _raises_at(path, 2)


def test_deleted_first_line(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    _write_lines(path, _lines(path)[1:])
    assert "chain" in _raises_at(path, 1)


def test_deleted_middle_line(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    lines = _lines(path)
    _write_lines(path, [lines[0], lines[2]])
    _raises_at(path, 2)


def test_swapped_lines(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    lines = _lines(path)
    _write_lines(path, [lines[1], lines[0], lines[2]])
    _raises_at(path, 1)


def test_inserted_forged_line(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, written = ledger
    lines = _lines(path)
    # A well-formed forged entry, correctly hashed and linked to line 1.
    forged = asdict(written[0])
    forged.update(round=9, run_id="forged", prev_hash=written[0].entry_hash)
    forged = _rehash(forged)
    _write_lines(path, [lines[0], json.dumps(forged, sort_keys=True), *lines[1:]])
    _raises_at(path, 3)


def test_inserted_garbage_line(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    lines = _lines(path)
    _write_lines(path, [lines[0], '{"kind": "train"}', *lines[1:]])
    _raises_at(path, 2)


def test_truncated_line(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    # Half-written last line (a crash mid-append without atomic write).
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    assert "JSON" in _raises_at(path, 3)


def test_truncated_middle_line(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    lines = _lines(path)
    lines[1] = lines[1][:40]
    _write_lines(path, lines)
    _raises_at(path, 2)


def test_non_object_line(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    lines = _lines(path)
    _write_lines(path, [*lines, "[1, 2, 3]"])
    _raises_at(path, 4)


def test_forged_epsilon_with_correct_hashes(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    history: list[Spend] = []
    first = append_entry(path, _entry(history, SPENDS[0], round_=1))
    second = _entry(history, SPENDS[1], round_=2)
    # Under-report the cumulative epsilon but keep the chain and hashes valid.
    forged = replace(second, epsilon=second.epsilon / 2)
    append_entry(path, forged)  # append_entry re-reads and re-hashes
    entries_text = _lines(path)
    raw = json.loads(entries_text[1])
    assert raw["prev_hash"] == first.entry_hash
    assert LedgerEntry(**raw).compute_hash() == raw["entry_hash"]
    msg = _raises_at(path, 2)
    assert "epsilon" in msg


def test_epsilon_must_compose_over_earlier_spends(tmp_path: Path) -> None:
    """An entry stating only its own round's epsilon (no composition) is rejected."""
    path = tmp_path / LEDGER_NAME
    append_entry(path, _entry([], SPENDS[0], round_=1))
    append_entry(path, _entry([], SPENDS[1], round_=2))  # fresh history: not composed
    _raises_at(path, 2)


def test_append_refuses_on_corrupt_ledger(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    lines = _lines(path)
    _write_lines(path, [lines[1], lines[0], lines[2]])
    before = path.read_bytes()
    with pytest.raises(LedgerError):
        append_entry(path, _entry([], SPENDS[0], round_=4))
    assert path.read_bytes() == before


def test_unknown_and_missing_fields(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    lines = _lines(path)
    raw = json.loads(lines[0])
    raw["extra"] = 1
    _write_lines(path, [json.dumps(raw), *lines[1:]])
    assert "extra" in _raises_at(path, 1)
    raw = json.loads(lines[0])
    del raw["epsilon"]
    _write_lines(path, [json.dumps(raw), *lines[1:]])
    assert "epsilon" in _raises_at(path, 1)


def test_unknown_accountant(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    raw = _rehash({**asdict(_entry([], SPENDS[0], round_=1)), "accountant": "prv"})
    _write_lines(path, [json.dumps(raw)])
    assert "accountant" in _raises_at(path, 1)


def test_atomic_append_leaves_no_temp_files(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, _ = ledger
    assert sorted(p.name for p in path.parent.iterdir()) == [LEDGER_NAME]


def test_spends_for_filters_fingerprint_and_declines(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    hist_a: list[Spend] = []
    hist_b: list[Spend] = []
    s1, s2, s3 = Spend(3.0, 0.1, 10), Spend(1.5, 1.0, 5), Spend(2.0, 1.0, 20)
    append_entry(path, _entry(hist_a, s1, round_=1, fingerprint=FP_A))
    append_entry(path, _entry(hist_b, s2, round_=1, fingerprint=FP_B, run_id="run-b"))
    append_entry(path, _entry(hist_a, s3, round_=2, fingerprint=FP_A, kind="decline"))
    append_entry(path, _entry(hist_a, s3, round_=3, fingerprint=FP_A))
    entries = read_ledger(path)
    assert [e.kind for e in entries] == ["train", "train", "decline", "train"]
    assert spends_for(entries, FP_A) == [s1, s3]
    assert spends_for(entries, FP_B) == [s2]
    assert spends_for(entries, "c" * 64) == []
    # Per-fingerprint composition: the B entry does not raise A's epsilon.
    assert entries[3].epsilon == pytest.approx(epsilon_of([s1, s3], DELTA))


def test_wrongly_typed_field_raises_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    good = asdict(_entry([], SPENDS[0], round_=1))
    raw = _rehash({**good, "noise_multiplier": "1.1"})
    _write_lines(path, [json.dumps(raw, sort_keys=True)])
    _raises_at(path, 1)


def test_entries_are_signed_by_the_site_key(ledger: tuple[Path, list[LedgerEntry]]) -> None:
    path, written = ledger
    other = generate_identity()
    for entry in read_ledger(path):
        assert entry.signed_by(SITE_KEY.public_key())
        assert not entry.signed_by(other.public_key())
    forged = replace(written[0], signature=other.sign(b"x").hex())
    assert not forged.signed_by(SITE_KEY.public_key())


def test_version_one_ledger_is_refused_with_its_version(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    path.write_text(json.dumps({"version": 1, "kind": "train"}) + "\n", encoding="utf-8")
    with pytest.raises(LedgerError, match="version 1 is not supported"):
        read_ledger(path)
