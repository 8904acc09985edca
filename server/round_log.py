"""The coordinator's signed round records: ``rounds.jsonl`` beside run.json.

After every round the coordinator appends one :class:`RoundAttestation`: which sites'
updates went into the aggregate, which declined or dropped, the hash of the global
model before and after, and, for every site that answered, the head of its privacy
ledger as the site reported it (length and last entry hash) and the hash of the ledger
entry that recorded its training spend. Records are hash-chained and signed with the
coordinator's Ed25519 key (:mod:`medfed.common.signed_log`), and the ledger heads anchor
the sites' ledgers: an auditor finds a site ledger entry deleted from the tail, or a
round a site trained that its ledger does not record (:mod:`medfed.audit.verify`).

The coordinator's key lives outside the run's output folder (which is handed to
auditors): ``coordinator-key`` in the run config, else ``<data-root>/coordinator-
identity.pem``, created on first use. Its public key is written to the output folder as
``coordinator.pub.pem`` for the auditor, with a copy of the roster the run used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.common.atomic import atomic_write_bytes
from medfed.common.secagg.identity import (
    IdentityError,
    generate_identity,
    load_identity,
    save_identity,
)
from medfed.common.signed_log import GENESIS, SignedEntry, entry_hash, key_id, sign_hash

if TYPE_CHECKING:
    from medfed.common.config import RunSettings

ROUND_LOG_NAME = "rounds.jsonl"
ROUND_LOG_VERSION = 1
ROUND_LOG_TAG = b"medfed-round-record-v1\0"
"""Domain separation: the coordinator's signature over a round record means nothing else."""
COORDINATOR_KEY_NAME = "coordinator-identity.pem"
COORDINATOR_PUBLIC_NAME = "coordinator.pub.pem"
COORDINATOR_CERT_NAME = "coordinator.pem"
"""A deployment's CA-issued certificate for the coordinator key, kept beside the key."""
AUDIT_ROSTER_NAME = "roster.json"


class RoundLogError(ValueError):
    """rounds.jsonl or the coordinator key is missing, unreadable or malformed."""


@dataclass(frozen=True)
class RoundAttestation(SignedEntry):
    """One round as the coordinator attests it.

    Parameters
    ----------
    run_id, flower_run_id, round : identify the round.
    status : {"aggregated", "aborted", "skipped"}
    participants : sites whose updates are in the aggregate.
    declined : site -> reason, for the sites that declined.
    dropped : sites that accepted but whose update is not in the aggregate.
    sites : site -> {"decision", "ledger_length", "ledger_head", "train_entry"} as the
        sites reported them (the ledger anchor; see the module docstring).
    secure_aggregation : the protocol the round ran under.
    model_sha256_in, model_sha256 : the global model before and after the round.
    timestamp : UTC ISO-8601.
    prev_hash, entry_hash, signer, signature : chain and signature.
    """

    run_id: str
    flower_run_id: str
    round: int
    status: str
    participants: list[str]
    declined: dict[str, str]
    dropped: list[str]
    sites: dict[str, dict[str, Any]]
    secure_aggregation: str
    model_sha256_in: str
    model_sha256: str
    timestamp: str
    version: int = ROUND_LOG_VERSION
    prev_hash: str = GENESIS
    entry_hash: str = ""
    signer: str = ""
    signature: str = ""

    TAG: ClassVar[bytes] = ROUND_LOG_TAG


_FIELDS = {f.name for f in fields(RoundAttestation)}


def parse_round_line(line: str, where: str) -> RoundAttestation:
    """One line of rounds.jsonl; RoundLogError naming ``where`` if it is malformed."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RoundLogError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise RoundLogError(f"{where}: expected a JSON object")
    if raw.get("version") != ROUND_LOG_VERSION:
        raise RoundLogError(f"{where}: unsupported round record version {raw.get('version')!r}")
    missing, unknown = _FIELDS - raw.keys(), raw.keys() - _FIELDS
    if missing or unknown:
        raise RoundLogError(f"{where}: missing fields {sorted(missing)}, unknown {sorted(unknown)}")
    record = RoundAttestation(**raw)
    if not isinstance(record.round, int) or not isinstance(record.sites, dict):
        raise RoundLogError(f"{where}: 'round' or 'sites' has the wrong type")
    return record


def read_round_log(path: Path) -> list[RoundAttestation]:
    """Read rounds.jsonl and check its chain (signatures are the auditor's job)."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RoundLogError(f"{path}: cannot read round records: {exc}") from None
    records, prev = [], GENESIS
    for lineno, line in enumerate(lines, start=1):
        record = parse_round_line(line, f"{path}:{lineno}")
        if record.prev_hash != prev or record.compute_hash() != record.entry_hash:
            raise RoundLogError(f"{path}:{lineno}: round record chain or hash broken")
        records.append(record)
        prev = record.entry_hash
    return records


def append_round(path: Path, record: RoundAttestation, key: Ed25519PrivateKey) -> RoundAttestation:
    """Chain, sign and append ``record`` (the file is rewritten atomically)."""
    records = read_round_log(path)
    data = asdict(record)
    data.update(
        prev_hash=records[-1].entry_hash if records else GENESIS,
        signer=key_id(key),
        entry_hash="",
        signature="",
    )
    digest = entry_hash(data)
    data.update(entry_hash=digest, signature=sign_hash(key, ROUND_LOG_TAG, digest))
    signed = RoundAttestation(**data)
    old = path.read_bytes() if path.exists() else b""
    line = json.dumps(asdict(signed), sort_keys=True) + "\n"
    atomic_write_bytes(path, old + line.encode())
    return signed


def coordinator_key_path(settings: RunSettings) -> Path:
    return Path(settings.coordinator_key or Path(settings.data_root) / COORDINATOR_KEY_NAME)


def load_coordinator_key(settings: RunSettings) -> Ed25519PrivateKey:
    """The coordinator's signing key; created when unset and absent (a simulation).

    A configured ``coordinator-key`` that cannot be read is an error: the run must not
    go on with round records nobody can verify.
    """
    path = coordinator_key_path(settings)
    if not settings.coordinator_key and not path.exists():
        save_identity(path, generate_identity())
    try:
        return load_identity(path)
    except IdentityError as exc:
        raise RoundLogError(f"coordinator signing key: {exc}") from None


def publish_audit_keys(
    out_dir: Path, key: Ed25519PrivateKey, roster: Path, key_path: Path | None = None
) -> None:
    """Write the coordinator's public key and a copy of the roster for the auditor.

    In a deployment the CA-issued certificate of the key (``coordinator.pem`` beside
    ``key_path``) is copied too, so that ``medfed audit verify --ca`` can check it.
    """
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(out_dir / COORDINATOR_PUBLIC_NAME, pem)
    certificate = key_path.with_name(COORDINATOR_CERT_NAME) if key_path else None
    if certificate is not None and certificate.is_file():
        atomic_write_bytes(out_dir / COORDINATOR_CERT_NAME, certificate.read_bytes())
    if roster.is_file() and roster.resolve() != (out_dir / AUDIT_ROSTER_NAME).resolve():
        atomic_write_bytes(out_dir / AUDIT_ROSTER_NAME, roster.read_bytes())
