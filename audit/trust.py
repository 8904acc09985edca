"""Which keys an audit trusts: the sites' identity keys and the coordinator's key.

Site keys come from the consortium roster. In a deployment the roster is signed by the
consortium CA; given the CA certificate (``--ca``, obtained from the consortium, not
from the coordinator) the roster's signature is checked and the result does not depend
on trusting whoever handed over the audit folder. Without a CA (a simulation, whose keys
were generated for it) the roster in the folder is taken as found, and the audit says so.
The coordinator's public key is ``coordinator.pub.pem`` in the audit folder; with a CA,
its CA-issued certificate ``coordinator.pem`` must be there, signed by the CA and for the
same key, or the audit reports a problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medfed.common.secagg.identity import Roster, RosterError
from medfed.common.signed_log import key_id, raw_public_key
from medfed.server.round_log import (
    AUDIT_ROSTER_NAME,
    COORDINATOR_CERT_NAME,
    COORDINATOR_PUBLIC_NAME,
)


class TrustError(ValueError):
    """A key file the audit needs is missing, unreadable or fails its check."""


@dataclass(frozen=True)
class TrustedKeys:
    """Site id -> identity key, the coordinator's key, and where they came from."""

    sites: dict[str, Ed25519PublicKey]
    coordinator: Ed25519PublicKey | None
    source: str
    anchored: bool
    problems: tuple[str, ...] = field(default_factory=tuple)

    def site_of(self, signer: str) -> str | None:
        """The site whose key has id ``signer`` (None if no roster key has it)."""
        for site, key in self.sites.items():
            if key_id(key) == signer:
                return site
        return None


def load_trusted_keys(directory: Path, roster: Path | None, ca: Path | None) -> TrustedKeys:
    """Read the roster (checked against ``ca`` when given) and the coordinator key.

    TrustError when the roster cannot be used at all (missing, malformed, or a bad CA
    signature): nothing can be verified without it. A missing coordinator key is a
    problem recorded in ``problems``; the site ledgers can still be checked.
    """
    roster_path = roster or directory / AUDIT_ROSTER_NAME
    if ca is not None:
        sites, source = _signed_roster(roster_path, ca)
        anchored = True
    else:
        sites, source = _plain_roster(roster_path)
        anchored = False
    coordinator, problems = _coordinator_key(directory / COORDINATOR_PUBLIC_NAME)
    if ca is not None and coordinator is not None:
        certified = _certificate_problem(directory / COORDINATOR_CERT_NAME, coordinator, ca)
        problems += (certified,) if certified else ()
        source += "; coordinator key " + ("NOT certified" if certified else "certified by the CA")
    else:
        source += "; coordinator key from coordinator.pub.pem as found"
    return TrustedKeys(sites, coordinator, source, anchored, problems)


def _certificate_problem(path: Path, key: Ed25519PublicKey, ca: Path) -> str:
    """Why ``path`` is not a CA-issued certificate for ``key`` ('' when it is)."""
    from cryptography.x509.oid import NameOID

    from medfed.deploy.layout import COORDINATOR_SUBJECT
    from medfed.deploy.pki import (
        load_ca_certificate,
        load_certificate,
        verify_certificate_signed_by,
    )

    try:
        certificate = load_certificate(path, "coordinator certificate")
        verify_certificate_signed_by(
            certificate, load_ca_certificate(ca), what="coordinator certificate"
        )
    except (OSError, ValueError) as exc:
        return f"coordinator key not certified: {exc}"
    public = certificate.public_key()
    if not isinstance(public, Ed25519PublicKey) or raw_public_key(public) != raw_public_key(key):
        return f"{path}: certifies another key than coordinator.pub.pem"
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [COORDINATOR_SUBJECT]:
        return f"{path}: not a coordinator certificate (CN must be {COORDINATOR_SUBJECT!r})"
    return ""


def _plain_roster(path: Path) -> tuple[dict[str, Ed25519PublicKey], str]:
    try:
        roster = Roster.load(path)
    except RosterError as exc:
        raise TrustError(f"roster: {exc}") from None
    signed = _is_signed(path)
    source = (
        f"site keys from {path} as found, not checked against a consortium CA"
        + (" (the roster carries a CA signature: pass --ca to check it)" if signed else "")
        + "; the result is only as trustworthy as the source of this roster"
    )
    return _by_name(roster), source


def _is_signed(path: Path) -> bool:
    try:
        return "signature" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _signed_roster(path: Path, ca: Path) -> tuple[dict[str, Ed25519PublicKey], str]:
    from medfed.deploy.pki import load_ca_certificate
    from medfed.deploy.roster import load_signed_roster

    try:
        certificate = load_ca_certificate(ca)
        signed = load_signed_roster(path, certificate)
    except (OSError, ValueError) as exc:
        raise TrustError(f"roster {path} against CA {ca}: {exc}") from None
    fingerprint = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    source = (
        f"site keys from roster {path} (consortium {signed.consortium!r}, serial "
        f"{signed.serial}), signature checked with the CA certificate {ca} "
        f"(SHA-256 {fingerprint[:16]}…)"
    )
    return _by_name(signed.secagg_roster()), source


def _by_name(roster: Roster) -> dict[str, Ed25519PublicKey]:
    return {
        roster.names.get(node_id, f"node-{node_id}"): roster.public_key(node_id)
        for node_id in roster.keys
    }


def _coordinator_key(path: Path) -> tuple[Ed25519PublicKey | None, tuple[str, ...]]:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        return None, (f"{path}: missing: the coordinator's round records cannot be checked",)
    except (OSError, ValueError) as exc:
        return None, (f"{path}: not a PEM public key ({exc})",)
    if not isinstance(key, Ed25519PublicKey):
        return None, (f"{path}: not an Ed25519 public key",)
    return key, ()
