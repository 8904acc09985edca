"""`medfed audit verify`: check every signature, chain link and anchor in an audit folder.

An audit folder is a run's output folder (``medfed simulate --out`` or ``medfed run
--out``) with the sites' ledgers added under ``ledgers/`` (a simulation copies them; in a
deployment each hospital sends its ``ledger.jsonl``)::

    DIR/roster.json            the consortium roster (site id -> Ed25519 identity key)
    DIR/coordinator.pub.pem    the coordinator's public key
    DIR/rounds.jsonl           the coordinator's signed, chained round records
    DIR/ledgers/<site>.jsonl   each site's signed, chained privacy ledger
    DIR/run.json, checkpoints/ the run record and the global model after every round

Checks, each failure reported with the file, the line and what is wrong:

- every line parses and its ``entry_hash`` matches its content (an edit);
- every ``prev_hash`` is the hash of the line before (a deletion, insertion or
  reordering; the message says which the evidence points to);
- every signature verifies with the roster key of the site the entry names (ledgers) or
  with the coordinator's key (round records);
- every recorded epsilon equals the replay of the dataset's spends so far;
- the anchors: each round record names, for each site, the length and last hash its
  ledger had, and the hash of the entry that recorded its training; those entries must
  be in the site's ledger (a ledger cut short at its end is found this way), each
  participant's ledger must record a spend for that round, trained from the model the
  coordinator recorded, and each round's model must be the next round's starting model
  and match its checkpoint.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.audit.trust import TrustedKeys, load_trusted_keys
from medfed.common.ledger import LedgerEntry, LedgerError, parse_ledger_line
from medfed.common.privacy import epsilon_from_rdp, rdp_of
from medfed.common.signed_log import GENESIS
from medfed.server.round_log import ROUND_LOG_NAME, RoundAttestation, RoundLogError
from medfed.server.round_log import parse_round_line as _parse_round
from medfed.server.run_record import RUN_RECORD_NAME

LEDGERS_DIR = "ledgers"
EPSILON_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Problem:
    """One failed check: where (file, line, entry) and what is wrong."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class AuditTrail:
    """What an audit folder holds, as verified, and every problem found."""

    directory: Path
    keys: TrustedKeys
    ledgers: dict[str, list[LedgerEntry]] = field(default_factory=dict)
    ledger_files: dict[str, Path] = field(default_factory=dict)
    rounds: list[RoundAttestation] = field(default_factory=list)
    run: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    signatures: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        return {
            "ledgers": len(self.ledgers),
            "ledger_entries": sum(len(e) for e in self.ledgers.values()),
            "round_records": len(self.rounds),
            "signatures": self.signatures,
        }

    def summary(self) -> dict[str, Any]:
        """JSON-able result of the verification."""
        return {
            "ok": self.ok,
            "trust": self.keys.source,
            "anchored": self.keys.anchored,
            "checked": self.counts(),
            "problems": [{"where": p.where, "what": p.what} for p in self.problems],
            "heads": self.heads(),
        }

    def heads(self) -> dict[str, dict[str, Any]]:
        """Length and last hash of every chain: record them to detect a later truncation."""
        chains = {f"ledger {site}": entries for site, entries in sorted(self.ledgers.items())}
        chains[ROUND_LOG_NAME] = self.rounds
        return {
            name: {"entries": len(entries), "head": entries[-1].entry_hash if entries else GENESIS}
            for name, entries in chains.items()
        }


def verify_directory(
    directory: Path, roster: Path | None = None, ca: Path | None = None
) -> AuditTrail:
    """Verify everything in ``directory``; TrustError if no roster can be used."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such audit folder")
    keys = load_trusted_keys(directory, roster, ca)
    trail = AuditTrail(directory, keys)
    trail.problems += [Problem(str(directory), p) for p in keys.problems]
    ledger_dir = directory / LEDGERS_DIR
    files = sorted(ledger_dir.glob("*.jsonl")) if ledger_dir.is_dir() else []
    if not files:
        trail.problems.append(Problem(str(ledger_dir), "no site ledgers (*.jsonl) to verify"))
    for path in files:
        _verify_ledger(trail, path)
    rounds_path = directory / ROUND_LOG_NAME
    if rounds_path.is_file():
        _verify_rounds(trail, rounds_path)
        _check_anchors(trail)
        _check_models(trail)
    trail.run = _read_run(trail, directory / RUN_RECORD_NAME)
    return trail


# -- chains --------------------------------------------------------------------------
def _walk_chain(
    trail: AuditTrail,
    path: Path,
    parse: Callable[[int, str], Any],
    check: Callable[[str, Any], list[str]],
) -> list[Any]:
    """Parse every line of a chained log; report hash, link and ``check`` problems."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        trail.problems.append(Problem(str(path), f"cannot read: {exc}"))
        return []
    hashes = [_raw_hash(line) for line in lines]
    entries, prev = [], GENESIS
    for lineno, line in enumerate(lines, start=1):
        where = f"{_rel(trail, path)}:{lineno}"
        try:
            entry = parse(lineno, line)
        except (LedgerError, RoundLogError) as exc:
            trail.problems.append(Problem(where, _strip_where(str(exc))))
            prev = hashes[lineno - 1] or prev
            continue
        where = f"{where} ({_describe(entry)})"
        if entry.compute_hash() != entry.entry_hash:
            trail.problems.append(
                Problem(where, "content does not match its entry_hash: edited after writing")
            )
        if entry.prev_hash != prev:
            trail.problems.append(Problem(where, _link_problem(entry.prev_hash, hashes, lineno)))
        trail.problems += [Problem(where, what) for what in check(where, entry)]
        entries.append(entry)
        prev = entry.entry_hash
    return entries


def _link_problem(prev_hash: str, hashes: list[str | None], lineno: int) -> str:
    """Why the chain breaks before line ``lineno``: deleted, reordered or inserted."""
    if prev_hash == GENESIS:
        return "claims to be the first entry, but follows other entries (inserted or reordered)"
    if prev_hash in hashes:
        follows = hashes.index(prev_hash) + 1
        return (
            f"chain broken: it follows line {follows} in the chain but sits at line {lineno} "
            "(entries reordered, or one inserted before it)"
        )
    return (
        f"chain broken: the entry it follows ({prev_hash[:12]}…) is not in the file "
        "(deleted, or this entry was inserted)"
    )


def _raw_hash(line: str) -> str | None:
    try:
        value = json.loads(line).get("entry_hash")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _strip_where(message: str) -> str:
    """LedgerError messages start with 'path:line: '; the Problem names those already."""
    parts = message.split(": ", 2)
    return parts[-1] if len(parts) == 3 and parts[1].isdigit() else message


def _describe(entry: LedgerEntry | RoundAttestation) -> str:
    if isinstance(entry, LedgerEntry):
        return f"{entry.kind} {entry.site_id} round {entry.round} of run {entry.run_id}"
    return f"round {entry.round} of run {entry.run_id}"


def _rel(trail: AuditTrail, path: Path) -> str:
    try:
        return str(path.relative_to(trail.directory))
    except ValueError:
        return str(path)


# -- ledgers -------------------------------------------------------------------------
def _verify_ledger(trail: AuditTrail, path: Path) -> None:
    composed: dict[str, np.ndarray] = {}

    def check(where: str, entry: LedgerEntry) -> list[str]:
        problems = _signature_problems(trail, entry)
        if entry.kind == "train":
            fp = entry.dataset_fingerprint
            composed[fp] = composed.get(fp, 0) + rdp_of([entry.spend()])
            replayed = epsilon_from_rdp(composed[fp], entry.delta)
            if not math.isclose(replayed, entry.epsilon, rel_tol=EPSILON_TOLERANCE):
                problems.append(
                    f"records epsilon {entry.epsilon:.6g}, but replaying the dataset's "
                    f"spends gives {replayed:.6g}"
                )
        return problems

    entries = _walk_chain(trail, path, lambda n, line: parse_ledger_line(path, n, line), check)
    sites = {e.site_id for e in entries}
    if len(sites) > 1:
        trail.problems.append(
            Problem(_rel(trail, path), f"entries of several sites in one ledger: {sorted(sites)}")
        )
    site = entries[0].site_id if entries else path.stem
    if site in trail.ledgers:
        trail.problems.append(Problem(_rel(trail, path), f"a second ledger for site {site!r}"))
        return
    trail.ledgers[site] = entries
    trail.ledger_files[site] = path


def _signature_problems(trail: AuditTrail, entry: LedgerEntry) -> list[str]:
    key = trail.keys.sites.get(entry.site_id)
    if key is None:
        return [f"site {entry.site_id!r} is not in the roster: its signature cannot be checked"]
    if not entry.signed_by(key):
        owner = trail.keys.site_of(entry.signer)
        if owner and owner != entry.site_id:
            return [f"signed with {owner}'s key, not {entry.site_id}'s (forged entry)"]
        return [f"signature does not verify with {entry.site_id}'s roster key (forged or edited)"]
    trail.signatures += 1
    return []


# -- round records -------------------------------------------------------------------
def _verify_rounds(trail: AuditTrail, path: Path) -> None:
    def check(where: str, record: RoundAttestation) -> list[str]:
        key = trail.keys.coordinator
        if key is None:
            return []
        if not record.signed_by(key):
            return ["the coordinator's signature does not verify (forged or edited)"]
        trail.signatures += 1
        return []

    trail.rounds = _walk_chain(
        trail, path, lambda n, line: _parse_round(line, f"{path}:{n}"), check
    )


def _check_anchors(trail: AuditTrail) -> None:
    """Each round record's view of the sites' ledgers must be in those ledgers."""
    for record in trail.rounds:
        where = f"{ROUND_LOG_NAME} round {record.round} of run {record.run_id}"
        for site, anchor in sorted(record.sites.items()):
            entries = trail.ledgers.get(site)
            if entries is None:
                trail.problems.append(Problem(where, f"no ledger from {site} to check against"))
                continue
            trail.problems += [
                Problem(where, f"{site}: {what}")
                for what in _anchor_problems(record, entries, anchor)
            ]


def _anchor_problems(
    record: RoundAttestation, entries: list[LedgerEntry], anchor: dict[str, Any]
) -> list[str]:
    problems = []
    length, head = int(anchor.get("ledger_length", 0)), str(anchor.get("ledger_head", ""))
    if length > len(entries):
        problems.append(
            f"the site reported {length} ledger entries ending in {head[:12]}…, but its "
            f"ledger has {len(entries)}: entries were removed from its end"
        )
    elif length and entries[length - 1].entry_hash != head:
        problems.append(
            f"ledger entry {length} is {entries[length - 1].entry_hash[:12]}…, but the site "
            f"reported {head[:12]}… for this round: the ledger was rewritten"
        )
    trained = [
        e
        for e in entries
        if e.kind == "train" and (e.run_id, e.round) == (record.run_id, record.round)
    ]
    train_entry = str(anchor.get("train_entry", ""))
    if train_entry and not any(e.entry_hash == train_entry for e in trained):
        problems.append(
            f"the spend entry {train_entry[:12]}… the site reported for this round is not in "
            "its ledger"
        )
    site_participated = anchor.get("decision") == "accept" and train_entry
    if site_participated and trained and trained[0].model_sha256_in != record.model_sha256_in:
        problems.append("trained from a model other than the round's global model")
    return problems


def _check_models(trail: AuditTrail) -> None:
    """Participants' spends exist; models chain round to round and match checkpoints."""
    by_run: dict[str, list[RoundAttestation]] = {}
    for record in trail.rounds:
        by_run.setdefault(record.run_id, []).append(record)
        where = f"{ROUND_LOG_NAME} round {record.round} of run {record.run_id}"
        for site in record.participants:
            entries = trail.ledgers.get(site, [])
            if site in trail.ledgers and not any(
                e.kind == "train" and (e.run_id, e.round) == (record.run_id, record.round)
                for e in entries
            ):
                trail.problems.append(
                    Problem(
                        where,
                        f"{site}'s update is in the aggregate, but its ledger records no "
                        "spend for this round",
                    )
                )
    for run_id, records in by_run.items():
        for before, after in itertools.pairwise(records):
            if after.round == before.round + 1 and after.model_sha256_in != before.model_sha256:
                trail.problems.append(
                    Problem(
                        f"{ROUND_LOG_NAME} round {after.round} of run {run_id}",
                        f"starts from a model other than the one round {before.round} produced",
                    )
                )
    _check_unrecorded_spends(trail, by_run)
    _check_checkpoints(trail)


def _check_unrecorded_spends(trail: AuditTrail, by_run: dict[str, list[RoundAttestation]]) -> None:
    """A spend in a run the coordinator recorded must have that round's record."""
    recorded = {(r.run_id, r.round) for r in trail.rounds}
    for site, entries in trail.ledgers.items():
        for entry in entries:
            if entry.kind != "train" or entry.run_id not in by_run:
                continue
            if (entry.run_id, entry.round) not in recorded:
                trail.problems.append(
                    Problem(
                        f"{_rel(trail, trail.ledger_files[site])} ({_describe(entry)})",
                        "no coordinator record for this round: the round log was cut short, "
                        "or the coordinator stopped during the round and the run was not resumed",
                    )
                )


def _check_checkpoints(trail: AuditTrail) -> None:
    from medfed.server.checkpoint import checkpoint_path, load_checkpoint

    latest = {r.round: r for r in trail.rounds}  # the last record of each round number
    for server_round, record in sorted(latest.items()):
        path = checkpoint_path(trail.directory, server_round)
        if not path.is_file():
            continue
        try:
            load_checkpoint(path, record.model_sha256)
        except ValueError as exc:
            message = str(exc).removeprefix(f"{path}: ")
            trail.problems.append(Problem(_rel(trail, path), message))


def _read_run(trail: AuditTrail, path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        trail.problems.append(Problem(_rel(trail, path), f"cannot read the run record: {exc}"))
        return None
    return data if isinstance(data, dict) else None
