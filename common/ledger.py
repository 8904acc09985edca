"""The site privacy ledger: an append-only, hash-chained, signed JSON Lines file.

Each line is one :class:`LedgerEntry`. ``prev_hash`` holds the hash of the line before
(``GENESIS`` for the first) and ``entry_hash`` the SHA-256 of the entry's canonical JSON
without ``entry_hash`` and ``signature``, so an edit, deletion, insertion or reordering
breaks the chain; ``signature`` is the site's Ed25519 identity key's signature over the
entry hash (:mod:`medfed.common.signed_log`), so nobody without that key can rewrite the
ledger and re-chain it. The ledger is the accountant's state: whoever reads it can
recompute every epsilon from the raw parameters it records. Anything unreadable raises
:class:`LedgerError`, and a site that cannot read its ledger does not train (fail closed).
Signatures are checked by the audit (:mod:`medfed.audit.verify`), which knows the keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.common.atomic import atomic_write_bytes
from medfed.common.privacy import ACCOUNTANT, Spend, epsilon_of
from medfed.common.signed_log import GENESIS, SignedEntry, entry_hash, key_id, sign_hash

LEDGER_NAME = "ledger.jsonl"
LEDGER_VERSION = 2
LEDGER_TAG = b"medfed-ledger-entry-v2\0"
"""Domain separation: a site's signature over a ledger entry means nothing else."""
EPSILON_TOLERANCE = 1e-6


class LedgerError(ValueError):
    """The ledger is missing, unreadable, tampered with or inconsistent."""


@dataclass(frozen=True)
class LedgerEntry(SignedEntry):
    """One round at one site: either a DP-SGD spend (``train``) or a refusal.

    Parameters
    ----------
    kind : {"train", "decline"}
        ``train`` records a spend; ``decline`` records a refused round and its reason.
    site_id, run_id, round : identify the round.
    dataset_fingerprint : str
        SHA-256 of the site's training records; spends compose per fingerprint.
    accountant : str
        Accountant that produced ``epsilon`` (``rdp``).
    noise_multiplier, sample_rate, steps, max_grad_norm : the mechanism's parameters.
    delta : float
        Delta at which ``epsilon`` is stated (the site's policy delta).
    epsilon : float
        Cumulative epsilon for this dataset after this entry, over all runs.
    num_samples : int
        Training records (patients) in the dataset.
    samples_per_patient : int
        Records one patient may contribute (1 unless a cap k > 1 is configured).
    reason : str
        Why a round was declined (empty for ``train``).
    timestamp : str
        UTC ISO-8601 time of writing.
    epsilon_budget : float
        The site's lifetime budget (policy) when the entry was written.
    model_sha256_in : str
        Hash of the global model the site trained from (``train``; empty otherwise), to
        be matched with the coordinator's round records.
    evidence : dict
        What the site attests about the mechanism it ran (sampling, noise generator,
        model check, normalisation, train/test overlap, minimum cohort); scalars only.
    prev_hash, entry_hash : the chain.
    signer, signature : the signing key's id and its Ed25519 signature over the hash.
    """

    kind: Literal["train", "decline"]
    site_id: str
    run_id: str
    round: int
    dataset_fingerprint: str
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon: float
    num_samples: int
    samples_per_patient: int
    reason: str
    timestamp: str
    epsilon_budget: float = 0.0
    model_sha256_in: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    version: int = LEDGER_VERSION
    prev_hash: str = GENESIS
    entry_hash: str = ""
    signer: str = ""
    signature: str = ""

    TAG: ClassVar[bytes] = LEDGER_TAG

    def spend(self) -> Spend:
        return Spend(self.noise_multiplier, self.sample_rate, self.steps)


_FIELDS = {f.name for f in fields(LedgerEntry)}


def read_ledger(path: Path) -> list[LedgerEntry]:
    """Read and verify ``path``; an absent file is an empty ledger.

    Raises LedgerError naming the file, the line and what is wrong when a line is
    malformed, a hash or chain link does not match, or a recorded epsilon disagrees
    with the spends before it.
    """
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot read ledger: {exc}") from None
    entries: list[LedgerEntry] = []
    prev = GENESIS
    for lineno, line in enumerate(lines, start=1):
        entry = parse_ledger_line(path, lineno, line)
        if entry.prev_hash != prev:
            raise LedgerError(
                f"{path}:{lineno}: chain broken: prev_hash {entry.prev_hash[:12]}… does "
                f"not match the hash of the entry before ({prev[:12]}…)"
            )
        if entry.compute_hash() != entry.entry_hash:
            raise LedgerError(f"{path}:{lineno}: entry_hash does not match its content")
        entries.append(entry)
        prev = entry.entry_hash
    _check_epsilons(path, entries)
    return entries


def parse_ledger_line(path: Path, lineno: int, line: str) -> LedgerEntry:
    """One ledger line as an entry (fields, types, ranges; not its hash or chain link).

    LedgerError names ``path``, ``lineno`` and what is wrong."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LedgerError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise LedgerError(f"{path}:{lineno}: expected a JSON object")
    if raw.get("version") != LEDGER_VERSION:
        raise LedgerError(
            f"{path}:{lineno}: ledger version {raw.get('version')!r} is not supported "
            f"(this medfed reads and writes version {LEDGER_VERSION}: signed entries)"
        )
    missing = _FIELDS - raw.keys()
    unknown = raw.keys() - _FIELDS
    if missing or unknown:
        raise LedgerError(
            f"{path}:{lineno}: missing fields {sorted(missing)}, unknown {sorted(unknown)}"
        )
    for name, value in raw.items():
        if name == "evidence":
            if not _scalar_mapping(value):
                raise LedgerError(f"{path}:{lineno}: field 'evidence' should map names to scalars")
            continue
        expected = _TYPES[name]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise LedgerError(
                f"{path}:{lineno}: field '{name}' should be {_type_name(expected)}, got {value!r}"
            )
    if raw["kind"] not in ("train", "decline"):
        raise LedgerError(f"{path}:{lineno}: unknown entry kind {raw['kind']!r}")
    bad = _range_problem(raw)
    if bad:
        raise LedgerError(f"{path}:{lineno}: {bad}")
    if raw["accountant"] != ACCOUNTANT:
        raise LedgerError(f"{path}:{lineno}: unknown accountant {raw['accountant']!r}")
    try:
        return LedgerEntry(**raw)
    except TypeError as exc:
        raise LedgerError(f"{path}:{lineno}: {exc}") from None


_TYPES: dict[str, type | tuple[type, ...]] = {
    f.name: {"int": int, "float": (int, float), "str": str}.get(str(f.type), str)
    for f in fields(LedgerEntry)
}


def _scalar_mapping(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str | int | float | bool) for k, v in value.items()
    )


def _type_name(expected: type | tuple[type, ...]) -> str:
    return "a number" if isinstance(expected, tuple) else f"of type {expected.__name__}"


def _range_problem(raw: dict) -> str:
    """Values a real DP-SGD spend cannot have (negative steps, a rate above 1, ...)."""
    if raw["steps"] < 0 or raw["round"] < 0 or raw["num_samples"] < 0:
        return "steps, round and num_samples must not be negative"
    if raw["kind"] == "train":
        if not 0 < raw["sample_rate"] <= 1:
            return f"sample_rate {raw['sample_rate']} is not in (0, 1]"
        if raw["noise_multiplier"] <= 0 or raw["steps"] == 0 or not 0 < raw["delta"] < 1:
            return "a train entry needs a positive noise_multiplier, steps and delta in (0, 1)"
        if raw["samples_per_patient"] < 1:
            return "samples_per_patient must be at least 1"
    return ""


def _check_epsilons(path: Path, entries: list[LedgerEntry]) -> None:
    """Every recorded epsilon must equal the replay of its dataset's spends so far."""
    history: dict[str, list[Spend]] = {}
    for lineno, entry in enumerate(entries, start=1):
        if entry.kind != "train":
            continue
        spends = history.setdefault(entry.dataset_fingerprint, [])
        spends.append(entry.spend())
        replayed = epsilon_of(spends, entry.delta)
        if not math.isclose(replayed, entry.epsilon, rel_tol=EPSILON_TOLERANCE):
            raise LedgerError(
                f"{path}:{lineno}: recorded epsilon {entry.epsilon:.6g} does not match "
                f"the replayed accountant ({replayed:.6g})"
            )


def spends_for(entries: list[LedgerEntry], fingerprint: str) -> list[Spend]:
    """All DP-SGD spends recorded for the dataset with ``fingerprint``."""
    return [
        e.spend() for e in entries if e.kind == "train" and e.dataset_fingerprint == fingerprint
    ]


def ledger_head(entries: list[LedgerEntry]) -> tuple[int, str]:
    """(number of entries, hash of the last one): what a site tells the coordinator."""
    return len(entries), entries[-1].entry_hash if entries else GENESIS


def append_entry(path: Path, entry: LedgerEntry, key: Ed25519PrivateKey) -> LedgerEntry:
    """Chain ``entry`` to the ledger at ``path``, sign it with ``key``, write atomically.

    The whole file is rewritten to a temporary file in the same folder and renamed over
    the old one, so a crash leaves either the old ledger or the new one, never half a
    line. Returns the entry as written (with its hashes and signature).
    """
    entries = read_ledger(path)
    prev = entries[-1].entry_hash if entries else GENESIS
    chained = _signed(entry, prev, key)
    old = path.read_bytes() if path.exists() else b""
    line = json.dumps(asdict(chained), sort_keys=True) + "\n"
    atomic_write_bytes(path, old + line.encode())
    return chained


def _signed(entry: LedgerEntry, prev: str, key: Ed25519PrivateKey) -> LedgerEntry:
    data = asdict(entry)
    data.update(prev_hash=prev, signer=key_id(key), entry_hash="", signature="")
    digest = entry_hash(data)
    data.update(entry_hash=digest, signature=sign_hash(key, LEDGER_TAG, digest))
    return LedgerEntry(**data)
