"""The consortium roster: who is in the consortium, signed by its CA.

One JSON file lists every active site (node id, name, Ed25519 identity public key) in the
shape of :class:`medfed.common.secagg.identity.Roster` (``version`` and ``sites``), so the
secure-aggregation code can ``Roster.load()`` it unchanged; everything else sits at the top
level, which that loader ignores: the consortium name, a ``serial`` that grows with every
change (a site can refuse an older roster), when it was issued, each active site's Flower
SuperNode public key, the revoked sites, and the CA's ``signature``.

The signature is ECDSA-SHA384 by the CA key over :data:`ROSTER_TAG` followed by the
canonical JSON of every other field (sorted keys, no whitespace), so any edit, including
adding, dropping or renaming a site or rolling back the serial, breaks it.
:func:`load_signed_roster` checks it with the CA certificate before reading anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.common.secagg.identity import ROSTER_VERSION, Roster
from medfed.deploy.pki import (
    load_ca_certificate,
    parse_supernode_public,
    same_public_key,
    write_public_file,
)

__all__ = [
    "ROSTER_TAG",
    "ConsortiumRoster",
    "RevokedSite",
    "RosterSignatureError",
    "RosterSite",
    "UnknownSiteError",
    "canonical_bytes",
    "load_ca_certificate",
    "load_signed_roster",
    "utc_timestamp",
    "write_signed_roster",
]

ROSTER_TAG = b"medfed-roster-v1\x00"
"""Domain separation: a CA signature over a roster means nothing else."""
SITE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TOP_LEVEL = {
    "version",
    "consortium",
    "serial",
    "issued_at",
    "sites",
    "supernode_keys",
    "revoked",
}


class RosterSignatureError(ValueError):
    """A signed roster is missing, malformed, unsigned, or its signature does not verify.

    The message names the file.
    """


class UnknownSiteError(ValueError):
    """A site id is not in the roster; the message lists the known sites."""


def utc_timestamp(when: datetime | None = None) -> str:
    """``2025-01-31T12:00:00Z``."""
    return (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RosterSite:
    """An active site: its name (site id), node id, raw Ed25519 identity public key and
    SuperNode public key (an OpenSSH line)."""

    name: str
    node_id: int
    identity_public_key: bytes
    supernode_public_key: str


@dataclass(frozen=True)
class RevokedSite:
    """A site removed from the consortium; its node id is never issued again."""

    name: str
    node_id: int
    revoked_at: str
    reason: str


def canonical_bytes(unsigned: dict[str, Any]) -> bytes:
    """What the CA signs: the domain tag, then the canonical JSON of the unsigned roster."""
    text = json.dumps(unsigned, sort_keys=True, separators=(",", ":"))
    return ROSTER_TAG + text.encode("utf-8")


def _check_node_id(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise ValueError(f"{where}: node_id must be a positive integer, got {value!r}")
    return value


def _check_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not SITE_ID_PATTERN.match(value):
        raise ValueError(
            f"{where}: site name must be 1-64 characters of letters, digits, '.', '_', '-', "
            f"got {value!r}"
        )
    return value


@dataclass(frozen=True)
class ConsortiumRoster:
    """The consortium's sites, as the CA signed them. Immutable: changes make a new
    roster with the next serial (:meth:`with_site`, :meth:`with_revoked`)."""

    consortium: str
    serial: int
    issued_at: str
    sites: tuple[RosterSite, ...]
    revoked: tuple[RevokedSite, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.consortium, str) or not self.consortium:
            raise ValueError("consortium: must be a non-empty string")
        if isinstance(self.serial, bool) or not isinstance(self.serial, int) or self.serial < 1:
            raise ValueError(f"serial: must be a positive integer, got {self.serial!r}")
        if not isinstance(self.issued_at, str) or not self.issued_at:
            raise ValueError("issued_at: must be a non-empty string")
        sites = tuple(sorted(self.sites, key=lambda s: s.node_id))
        revoked = tuple(sorted(self.revoked, key=lambda s: s.node_id))
        names: set[str] = set()
        ids: set[int] = set()
        keys: set[bytes] = set()
        for entry in (*sites, *revoked):
            where = f"site {entry.name!r}"
            _check_name(entry.name, "site")
            _check_node_id(entry.node_id, where)
            if entry.name in names:
                raise ValueError(f"{where}: listed twice")
            if entry.node_id in ids:
                raise ValueError(f"{where}: node_id {entry.node_id} is used twice")
            names.add(entry.name)
            ids.add(entry.node_id)
        for site in sites:
            where = f"site {site.name!r}"
            key = bytes(site.identity_public_key)
            if len(key) != 32:
                raise ValueError(f"{where}: identity public key must be 32 bytes (Ed25519)")
            Ed25519PublicKey.from_public_bytes(key)
            if key in keys:
                raise ValueError(f"{where}: shares its identity key with another site")
            keys.add(key)
            parse_supernode_public(site.supernode_public_key, f"{where}: supernode key")
        for entry in revoked:
            if not isinstance(entry.revoked_at, str) or not isinstance(entry.reason, str):
                raise ValueError(f"revoked site {entry.name!r}: revoked_at and reason: strings")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "revoked", revoked)

    # -- views ------------------------------------------------------------------------

    @property
    def site_names(self) -> list[str]:
        """Active site names, by node id."""
        return [s.name for s in self.sites]

    def site(self, name: str) -> RosterSite:
        """The active site called ``name``; :class:`UnknownSiteError` otherwise (saying so
        when it was revoked)."""
        for site in self.sites:
            if site.name == name:
                return site
        for entry in self.revoked:
            if entry.name == name:
                raise UnknownSiteError(
                    f"site {name!r} was revoked from consortium {self.consortium!r} "
                    f"on {entry.revoked_at}" + (f" ({entry.reason})" if entry.reason else "")
                )
        known = ", ".join(self.site_names) or "none"
        raise UnknownSiteError(f"unknown site {name!r}; the roster lists: {known}")

    def is_revoked(self, name: str) -> bool:
        """Whether ``name`` was revoked."""
        return any(entry.name == name for entry in self.revoked)

    def revocation(self, name: str) -> RevokedSite | None:
        """The revocation record of ``name``, if it was revoked."""
        return next((entry for entry in self.revoked if entry.name == name), None)

    def next_node_id(self) -> int:
        """One more than every node id ever issued (revoked ones included)."""
        return max((e.node_id for e in (*self.sites, *self.revoked)), default=0) + 1

    def secagg_roster(self) -> Roster:
        """The active sites as a secure-aggregation :class:`Roster` (node id -> key)."""
        return Roster(
            {s.node_id: bytes(s.identity_public_key) for s in self.sites},
            {s.node_id: s.name for s in self.sites},
        )

    def supernode_key(self, name: str) -> ec.EllipticCurvePublicKey:
        """The SuperNode public key of an active site."""
        site = self.site(name)
        return parse_supernode_public(site.supernode_public_key, f"site {name!r}")

    # -- changes ----------------------------------------------------------------------

    def with_site(self, site: RosterSite, issued_at: str | None = None) -> ConsortiumRoster:
        """A new roster (next serial) with ``site`` added."""
        if self.is_revoked(site.name):
            raise ValueError(f"site {site.name!r} was revoked; enrol it under a new site id")
        if site.name in self.site_names:
            raise ValueError(f"site {site.name!r} is already in the roster")
        return replace(
            self,
            serial=self.serial + 1,
            issued_at=issued_at or utc_timestamp(),
            sites=(*self.sites, site),
        )

    def with_revoked(
        self, name: str, reason: str = "", issued_at: str | None = None
    ) -> ConsortiumRoster:
        """A new roster (next serial) with the active site ``name`` moved to ``revoked``."""
        site = self.site(name)
        when = issued_at or utc_timestamp()
        return replace(
            self,
            serial=self.serial + 1,
            issued_at=when,
            sites=tuple(s for s in self.sites if s.name != name),
            revoked=(*self.revoked, RevokedSite(name, site.node_id, when, reason)),
        )

    # -- JSON and signature -----------------------------------------------------------

    def to_unsigned_json(self) -> dict[str, Any]:
        """Every field but the signature (see the module docstring for the shape)."""
        return {
            "version": ROSTER_VERSION,
            "consortium": self.consortium,
            "serial": self.serial,
            "issued_at": self.issued_at,
            "sites": [
                {"node_id": s.node_id, "name": s.name, "public_key": s.identity_public_key.hex()}
                for s in self.sites
            ],
            "supernode_keys": {s.name: s.supernode_public_key for s in self.sites},
            "revoked": [
                {
                    "name": r.name,
                    "node_id": r.node_id,
                    "revoked_at": r.revoked_at,
                    "reason": r.reason,
                }
                for r in self.revoked
            ],
        }

    def sign(self, ca_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
        """:meth:`to_unsigned_json` plus ``signature``: base64 ECDSA-SHA384 by the CA."""
        unsigned = self.to_unsigned_json()
        signature = ca_key.sign(canonical_bytes(unsigned), ec.ECDSA(hashes.SHA384()))
        return {**unsigned, "signature": base64.b64encode(signature).decode("ascii")}

    @classmethod
    def from_unsigned_json(cls, obj: Any, source: str = "roster") -> ConsortiumRoster:
        """Parse :meth:`to_unsigned_json`'s form (no signature check); ``ValueError``
        naming ``source`` and the entry."""
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: expected a JSON object")
        if missing := _TOP_LEVEL - set(obj):
            raise ValueError(f"{source}: missing fields {sorted(missing)}")
        if extra := set(obj) - _TOP_LEVEL - {"signature"}:
            raise ValueError(f"{source}: unknown fields {sorted(extra)}")
        if obj["version"] != ROSTER_VERSION:
            raise ValueError(f"{source}: version must be {ROSTER_VERSION}, got {obj['version']!r}")
        sites_json, keys_json, revoked_json = obj["sites"], obj["supernode_keys"], obj["revoked"]
        if not isinstance(sites_json, list) or not isinstance(revoked_json, list):
            raise ValueError(f"{source}: 'sites' and 'revoked' must be lists")
        if not isinstance(keys_json, dict):
            raise ValueError(f"{source}: 'supernode_keys' must be an object")
        sites = []
        for position, entry in enumerate(sites_json):
            where = f"{source}: sites entry {position}"
            if not isinstance(entry, dict) or set(entry) != {"node_id", "name", "public_key"}:
                raise ValueError(f"{where}: expected exactly node_id, name and public_key")
            name = _check_name(entry["name"], where)
            where = f"{source}: site {name!r}"
            node_id = _check_node_id(entry["node_id"], where)
            try:
                key = bytes.fromhex(entry["public_key"])
                Ed25519PublicKey.from_public_bytes(key)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: public_key is not a hex Ed25519 key") from None
            line = keys_json.get(name)
            if not isinstance(line, str):
                raise ValueError(f"{where}: no SuperNode key in 'supernode_keys'")
            sites.append(RosterSite(name, node_id, key, line))
        if extra := set(keys_json) - {s.name for s in sites}:
            raise ValueError(f"{source}: supernode_keys for sites not listed: {sorted(extra)}")
        revoked = []
        for position, entry in enumerate(revoked_json):
            where = f"{source}: revoked entry {position}"
            fields = {"name", "node_id", "revoked_at", "reason"}
            if not isinstance(entry, dict) or set(entry) != fields:
                raise ValueError(f"{where}: expected exactly {sorted(fields)}")
            name = _check_name(entry["name"], where)
            node_id = _check_node_id(entry["node_id"], f"{source}: revoked site {name!r}")
            revoked.append(RevokedSite(name, node_id, entry["revoked_at"], entry["reason"]))
        try:
            return cls(
                obj["consortium"], obj["serial"], obj["issued_at"], tuple(sites), tuple(revoked)
            )
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_signed_json(
        cls, obj: Any, ca_cert: x509.Certificate, source: str = "roster"
    ) -> ConsortiumRoster:
        """Verify the CA signature of a signed roster object, then parse it;
        :class:`RosterSignatureError` naming ``source``."""
        if not isinstance(obj, dict):
            raise RosterSignatureError(f"{source}: expected a JSON object (a signed roster)")
        signature_b64 = obj.get("signature")
        if signature_b64 is None:
            raise RosterSignatureError(f"{source}: not signed (no 'signature' field)")
        try:
            if not isinstance(signature_b64, str):
                raise ValueError
            signature = base64.b64decode(signature_b64, validate=True)
        except (ValueError, binascii.Error):
            raise RosterSignatureError(f"{source}: 'signature' is not base64") from None
        unsigned = {k: v for k, v in obj.items() if k != "signature"}
        public = ca_cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise RosterSignatureError(f"{source}: the CA certificate does not hold an EC key")
        try:
            public.verify(signature, canonical_bytes(unsigned), ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError, TypeError):
            raise RosterSignatureError(
                f"{source}: signature does not match: the roster was edited or not signed "
                "by this consortium's CA"
            ) from None
        try:
            return cls.from_unsigned_json(unsigned, source)
        except ValueError as exc:
            raise RosterSignatureError(str(exc)) from None

    def matches_supernode_key(self, name: str, public_key: ec.EllipticCurvePublicKey) -> bool:
        """Whether ``public_key`` is the SuperNode key the roster lists for ``name``."""
        return same_public_key(self.supernode_key(name), public_key)


def write_signed_roster(
    path: Path, roster: ConsortiumRoster, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    """Sign ``roster`` with the CA key and write it atomically (mode 0644)."""
    text = json.dumps(roster.sign(ca_key), indent=2) + "\n"
    write_public_file(Path(path), text.encode("utf-8"))


def load_signed_roster(path: Path, ca_cert: x509.Certificate) -> ConsortiumRoster:
    """Read a roster written by :func:`write_signed_roster` and verify it with the CA
    certificate; :class:`RosterSignatureError` naming the file if it is missing, not JSON,
    unsigned, edited, signed by another CA, or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RosterSignatureError(f"roster {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RosterSignatureError(f"cannot read roster {path}: {exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RosterSignatureError(f"roster {path} is not JSON: {exc}") from None
    return ConsortiumRoster.from_signed_json(obj, ca_cert, source=f"roster {path}")
