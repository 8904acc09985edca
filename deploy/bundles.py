"""Checking a bundle before a site (``medfed site``) or the coordinator (``medfed server``,
``medfed run``) uses it: every file present, private keys readable by their owner only,
certificates issued by the bundle's CA, the roster signed by it, the site enrolled and not
revoked. :class:`BundleError` names the file and what is wrong.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.client.policy import POLICY_NAME
from medfed.common.secagg.identity import (
    IdentityError,
    load_identity,
    public_key_bytes,
)
from medfed.deploy.layout import (
    BUNDLE_INFO,
    CA_CERT,
    COORDINATOR_CERT,
    COORDINATOR_KEY,
    COORDINATOR_SUBJECT,
    IDENTITY_CERT,
    IDENTITY_KEY,
    ROSTER_NAME,
    SERVER_CERT,
    SERVER_INFO,
    SERVER_KEY,
    SUPERNODE_KEY,
    SUPERNODE_PUB,
    BundleError,
    read_json,
    superlink_address,
)
from medfed.deploy.pki import (
    CertificateError,
    ProvisionError,
    load_ca_certificate,
    load_certificate,
    load_ec_private_key,
    parse_supernode_public,
    same_public_key,
    verify_certificate_signed_by,
)
from medfed.deploy.roster import (
    ConsortiumRoster,
    RosterSignatureError,
    UnknownSiteError,
    load_signed_roster,
)


@dataclass(frozen=True)
class SiteBundle:
    """A checked site bundle: its files and what bundle.json and the roster say.

    ``policy_template`` is the path of the bundle's site.toml template; it is not
    required to exist (the hospital keeps its real policy with its data).
    """

    bundle_dir: Path
    site_id: str
    node_id: int
    consortium: str
    superlink: str
    serial: int
    identity_key: Path
    identity_cert: Path
    supernode_key: Path
    supernode_pub: Path
    ca_cert: Path
    roster: Path
    policy_template: Path


@dataclass(frozen=True)
class ServerBundle:
    """A checked coordinator bundle."""

    bundle_dir: Path
    consortium: str
    hosts: list[str]
    port: int
    serial: int
    server_key: Path
    server_cert: Path
    ca_cert: Path
    roster: Path
    coordinator_key: Path
    coordinator_cert: Path

    @property
    def address(self) -> str:
        """``host:port`` of the first host."""
        return superlink_address(self.hosts[0], self.port)


def _require_files(bundle_dir: Path, names: Sequence[str], what: str) -> None:
    if not bundle_dir.is_dir():
        raise BundleError(f"{what} {bundle_dir} is not a folder")
    for name in names:
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{path} is missing from the {what} (re-copy the bundle)")


def check_private_key_mode(path: Path) -> None:
    """:class:`BundleError` if ``path`` is readable or writable by group or others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise BundleError(
            f"{path} is accessible by other users (mode {mode:04o}); run `chmod 600 {path}`"
        )


def _bundle_ca(path: Path) -> x509.Certificate:
    try:
        return load_ca_certificate(path)
    except CertificateError as exc:
        raise BundleError(str(exc)) from None


def _bundle_roster(
    path: Path, ca_cert: x509.Certificate, consortium: str, info_path: Path
) -> ConsortiumRoster:
    """The bundle's roster, signed by its CA and of the consortium its info file names."""
    try:
        roster = load_signed_roster(path, ca_cert)
    except RosterSignatureError as exc:
        raise BundleError(str(exc)) from None
    if roster.consortium != consortium:
        raise BundleError(
            f"{path} is the roster of consortium {roster.consortium!r}, but "
            f"{info_path} says {consortium!r}"
        )
    return roster


def _verify_cert(
    path: Path, ca_cert: x509.Certificate, ca_path: Path, what: str
) -> x509.Certificate:
    try:
        cert = load_certificate(path, what)
        verify_certificate_signed_by(cert, ca_cert, what=f"{what} {path}")
    except CertificateError as exc:
        raise BundleError(f"{exc} (CA: {ca_path})") from None
    return cert


def _common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


def _check_coordinator_key(
    bundle_dir: Path, ca_cert: x509.Certificate, ca_path: Path
) -> tuple[Path, Path]:
    """The coordinator's round-record signing key: present, 0600, Ed25519, and certified
    by the bundle's CA as the coordinator's."""
    key_path, cert_path = bundle_dir / COORDINATOR_KEY, bundle_dir / COORDINATOR_CERT
    for path in (key_path, cert_path):
        if not path.is_file():
            raise BundleError(
                f"{path} is missing from the server bundle: the coordinator needs its "
                "round-record signing key and certificate (bundles provisioned before "
                "medfed signed round records have none). On the CA machine run `medfed "
                f"provision coordinator-key --out PKI`, then copy PKI/server/{COORDINATOR_KEY} "
                f"(mode 0600) and PKI/server/{COORDINATOR_CERT} into {bundle_dir}"
            )
    check_private_key_mode(key_path)
    try:
        key = load_identity(key_path)
    except IdentityError as exc:
        raise BundleError(str(exc)) from None
    cert = _verify_cert(cert_path, ca_cert, ca_path, "coordinator certificate")
    if not same_public_key(cert.public_key(), key.public_key()):
        raise BundleError(f"coordinator certificate {cert_path} is not for the key in {key_path}")
    if (names := _common_names(cert)) != [COORDINATOR_SUBJECT]:
        raise BundleError(
            f"coordinator certificate {cert_path} names {names}, expected {COORDINATOR_SUBJECT!r}"
        )
    return key_path, cert_path


def _str_field(info: dict[str, Any], key: str, where: Path) -> str:
    value = info.get(key)
    if not isinstance(value, str) or not value:
        raise BundleError(f"{where}: '{key}' must be a non-empty string")
    return value


def load_site_bundle(bundle_dir: Path) -> SiteBundle:
    """Check a site bundle and describe it; :class:`BundleError` naming the file if a file
    is missing, a private key is readable by others, the roster is not signed by the
    bundle's CA, the site is not (or no longer) in the roster, or a key or certificate
    does not match."""
    bundle_dir = Path(bundle_dir)
    files = [
        IDENTITY_KEY,
        IDENTITY_CERT,
        SUPERNODE_KEY,
        SUPERNODE_PUB,
        CA_CERT,
        ROSTER_NAME,
        BUNDLE_INFO,
    ]
    _require_files(bundle_dir, files, "site bundle")
    for name in (IDENTITY_KEY, SUPERNODE_KEY):
        check_private_key_mode(bundle_dir / name)
    info_path = bundle_dir / BUNDLE_INFO
    info = read_json(info_path, BundleError, "bundle file")
    site_id = _str_field(info, "site_id", info_path)
    consortium = _str_field(info, "consortium", info_path)
    superlink = _str_field(info, "superlink", info_path)
    node_id = info.get("node_id")
    if isinstance(node_id, bool) or not isinstance(node_id, int):
        raise BundleError(f"{info_path}: 'node_id' must be an integer")

    ca_path = bundle_dir / CA_CERT
    ca_cert = _bundle_ca(ca_path)
    roster_path = bundle_dir / ROSTER_NAME
    roster = _bundle_roster(roster_path, ca_cert, consortium, info_path)
    if revoked := roster.revocation(site_id):
        because = f" ({revoked.reason})" if revoked.reason else ""
        raise BundleError(
            f"site {site_id!r} was revoked from consortium {consortium!r} on "
            f"{revoked.revoked_at}{because} (roster {roster_path}, serial {roster.serial}); "
            "this bundle can no longer join"
        )
    try:
        entry = roster.site(site_id)
    except UnknownSiteError:
        raise BundleError(
            f"site {site_id!r} (from {info_path}) is not in the roster {roster_path}"
        ) from None
    if entry.node_id != node_id:
        raise BundleError(
            f"{info_path} says node {node_id}, the roster {roster_path} says node "
            f"{entry.node_id} for site {site_id!r}"
        )

    try:
        identity = load_identity(bundle_dir / IDENTITY_KEY)
    except IdentityError as exc:
        raise BundleError(str(exc)) from None
    cert_path = bundle_dir / IDENTITY_CERT
    cert = _verify_cert(cert_path, ca_cert, ca_path, "identity certificate")
    if not same_public_key(cert.public_key(), identity.public_key()):
        raise BundleError(
            f"identity certificate {cert_path} is not for the key in {bundle_dir / IDENTITY_KEY}"
        )
    if (common_names := _common_names(cert)) != [site_id]:
        raise BundleError(
            f"identity certificate {cert_path} names {common_names}, expected site {site_id!r}"
        )
    if public_key_bytes(identity) != entry.identity_public_key:
        raise BundleError(
            f"the identity key {bundle_dir / IDENTITY_KEY} is not the one the roster "
            f"{roster_path} lists for site {site_id!r}"
        )

    key_path, pub_path = bundle_dir / SUPERNODE_KEY, bundle_dir / SUPERNODE_PUB
    try:
        supernode = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BundleError(f"{key_path} is not an unencrypted OpenSSH private key") from None
    if not isinstance(supernode, ec.EllipticCurvePrivateKey):
        raise BundleError(f"{key_path} holds a {type(supernode).__name__}, not an EC key")
    try:
        public = parse_supernode_public(pub_path.read_text(encoding="ascii"), str(pub_path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(str(exc)) from None
    if not same_public_key(supernode.public_key(), public):
        raise BundleError(f"{pub_path} is not the public key of {key_path}")
    if not roster.matches_supernode_key(site_id, public):
        raise BundleError(
            f"{pub_path} is not the SuperNode key the roster {roster_path} lists for "
            f"site {site_id!r}"
        )
    return SiteBundle(
        bundle_dir=bundle_dir,
        site_id=site_id,
        node_id=node_id,
        consortium=consortium,
        superlink=superlink,
        serial=roster.serial,
        identity_key=bundle_dir / IDENTITY_KEY,
        identity_cert=cert_path,
        supernode_key=key_path,
        supernode_pub=pub_path,
        ca_cert=ca_path,
        roster=roster_path,
        policy_template=bundle_dir / POLICY_NAME,
    )


def load_server_bundle(bundle_dir: Path) -> ServerBundle:
    """Check the coordinator's bundle; :class:`BundleError` naming the file if a file is
    missing, server.key is readable by others or does not match server.pem, server.pem
    is not issued by ca.pem or lacks a listed host, the roster does not verify, or the
    coordinator's signing key (coordinator-identity.pem) is missing, readable by others,
    or not the key its certificate (coordinator.pem, from ca.pem) is for."""
    bundle_dir = Path(bundle_dir)
    files = [SERVER_KEY, SERVER_CERT, CA_CERT, ROSTER_NAME, SERVER_INFO]
    _require_files(bundle_dir, files, "server bundle")
    key_path = bundle_dir / SERVER_KEY
    check_private_key_mode(key_path)
    info_path = bundle_dir / SERVER_INFO
    info = read_json(info_path, BundleError, "server file")
    consortium = _str_field(info, "consortium", info_path)
    hosts, port = info.get("hosts"), info.get("port")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise BundleError(f"{info_path}: 'hosts' must be a non-empty list of strings")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BundleError(f"{info_path}: 'port' must be an integer 1-65535")
    ca_path = bundle_dir / CA_CERT
    ca_cert = _bundle_ca(ca_path)
    cert_path = bundle_dir / SERVER_CERT
    cert = _verify_cert(cert_path, ca_cert, ca_path, "server certificate")
    try:
        key = load_ec_private_key(key_path, "server key")
    except ProvisionError as exc:
        raise BundleError(str(exc)) from None
    if not same_public_key(key.public_key(), cert.public_key()):
        raise BundleError(f"server key {key_path} does not match certificate {cert_path}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BundleError(f"server certificate {cert_path} has no subjectAltName") from None
    names = set(san.get_values_for_type(x509.DNSName))
    names |= {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    for host in hosts:
        if host not in names:
            raise BundleError(
                f"server certificate {cert_path} does not cover host {host!r} from "
                f"{info_path} (it covers {sorted(names)})"
            )
    roster_path = bundle_dir / ROSTER_NAME
    roster = _bundle_roster(roster_path, ca_cert, consortium, info_path)
    coordinator_key, coordinator_cert = _check_coordinator_key(bundle_dir, ca_cert, ca_path)
    return ServerBundle(
        bundle_dir=bundle_dir,
        consortium=consortium,
        hosts=list(hosts),
        port=port,
        serial=roster.serial,
        server_key=key_path,
        server_cert=cert_path,
        ca_cert=ca_path,
        roster=roster_path,
        coordinator_key=coordinator_key,
        coordinator_cert=coordinator_cert,
    )
