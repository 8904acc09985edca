"""``medfed provision``: create a consortium's CA, server and site bundles on disk.

Layout under the output folder ``OUT``::

    OUT/ca/ca.key            CA private key (EC P-384, 0600): keep it offline, in no bundle
    OUT/ca/ca.pem            CA certificate
    OUT/roster.json          the CA-signed roster (master copy)
    OUT/consortium.json      consortium name, SuperLink hosts and port (used by add-site)
    OUT/server/              the coordinator's bundle: server.key (0600), server.pem,
                             ca.pem, roster.json, server.json
    OUT/sites/<ID>/          one hospital's bundle: identity.key (0600), identity.pem,
                             supernode.key (0600), supernode.pub, ca.pem, roster.json,
                             site.toml (policy template), bundle.json

:func:`provision` creates it all, :func:`add_site` enrols one more site and
:func:`revoke_site` removes one; both re-sign the roster with the next serial and copy it
into every bundle. :func:`load_site_bundle` and :func:`load_server_bundle` check a bundle
before a site or the coordinator starts (:class:`BundleError` naming the file).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
from medfed.common.secagg.identity import (
    IdentityError,
    generate_identity,
    load_identity,
    public_key_bytes,
    save_identity,
)
from medfed.deploy.pki import (
    CertificateError,
    ProvisionError,
    certificate_pem,
    check_consortium_name,
    check_host,
    create_ca,
    generate_supernode_key,
    issue_identity_certificate,
    issue_server_certificate,
    load_ca_certificate,
    load_certificate,
    load_ec_private_key,
    parse_supernode_public,
    private_pem,
    refuse_existing,
    same_public_key,
    supernode_private_openssh,
    supernode_public_openssh,
    verify_certificate_signed_by,
    write_private_key,
    write_public_file,
)
from medfed.deploy.roster import (
    ConsortiumRoster,
    RosterSignatureError,
    RosterSite,
    UnknownSiteError,
    load_signed_roster,
    utc_timestamp,
    write_signed_roster,
)

DEFAULT_PORT = 9092
DEFAULT_DAYS = 825
MIN_SITES = 2  # secure aggregation needs at least two sites

CA_DIR = "ca"
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
ROSTER_NAME = "roster.json"
CONSORTIUM_NAME = "consortium.json"
SERVER_DIR = "server"
SERVER_KEY = "server.key"
SERVER_CERT = "server.pem"
SERVER_INFO = "server.json"
SITES_DIR = "sites"
IDENTITY_KEY = "identity.key"
IDENTITY_CERT = "identity.pem"
SUPERNODE_KEY = "supernode.key"
SUPERNODE_PUB = "supernode.pub"
BUNDLE_INFO = "bundle.json"

SITE_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_SITE_ID = 64


class BundleError(ValueError):
    """A site or server bundle is incomplete, unsafe or inconsistent; the message names
    the file and what is wrong."""


# -- input checks ---------------------------------------------------------------------


def check_site_id(site_id: str) -> str:
    """A site id: 1-64 letters, digits, '.', '_', '-' (not '.' or '..');
    :class:`ProvisionError` naming it otherwise."""
    if (
        not isinstance(site_id, str)
        or not 1 <= len(site_id) <= MAX_SITE_ID
        or not SITE_ID_RE.match(site_id)
        or site_id in (".", "..")
    ):
        raise ProvisionError(
            f"--site: invalid site id {site_id!r}: use 1-{MAX_SITE_ID} letters, digits, "
            "'.', '_' or '-'"
        )
    return site_id


def check_site_ids(site_ids: Sequence[str]) -> list[str]:
    """Valid, unique site ids, at least :data:`MIN_SITES`."""
    ids = [check_site_id(s) for s in site_ids]
    seen: set[str] = set()
    for site_id in ids:
        if site_id in seen:
            raise ProvisionError(f"--site: site id {site_id!r} is given twice")
        seen.add(site_id)
    if len(ids) < MIN_SITES:
        raise ProvisionError(
            f"--site: give at least {MIN_SITES} sites (secure aggregation needs two or more), "
            f"got {len(ids)}"
        )
    return ids


def check_hosts(hosts: Sequence[str]) -> list[str]:
    """Valid SuperLink hosts (DNS names or IP literals), duplicates dropped, at least one."""
    checked = list(dict.fromkeys(check_host(h) for h in hosts if h.strip()))
    if not checked:
        raise ProvisionError("--server: give at least one host name or IP address")
    return checked


def check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ProvisionError(f"--port: must be 1-65535, got {port!r}")
    return port


def superlink_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteEntry:
    """A site as provisioning reports it."""

    site_id: str
    node_id: int
    bundle_dir: Path


@dataclass(frozen=True)
class ProvisionResult:
    """What :func:`provision` wrote."""

    out_dir: Path
    consortium: str
    hosts: list[str]
    port: int
    serial: int
    ca_key: Path
    ca_cert: Path
    roster: Path
    server_dir: Path
    sites: list[SiteEntry]
    written: list[Path] = field(default_factory=list)

    @property
    def superlink(self) -> str:
        return superlink_address(self.hosts[0], self.port)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": "provision",
            "consortium": self.consortium,
            "out_dir": str(self.out_dir),
            "superlink": self.superlink,
            "hosts": self.hosts,
            "port": self.port,
            "serial": self.serial,
            "ca_key": str(self.ca_key),
            "ca_certificate": str(self.ca_cert),
            "roster": str(self.roster),
            "server_bundle": str(self.server_dir),
            "sites": [
                {"site_id": s.site_id, "node_id": s.node_id, "bundle": str(s.bundle_dir)}
                for s in self.sites
            ],
            "written": [str(p) for p in self.written],
        }


@dataclass(frozen=True)
class RosterUpdate:
    """What :func:`add_site` or :func:`revoke_site` changed."""

    action: str  # "add-site" or "revoke-site"
    out_dir: Path
    consortium: str
    site: SiteEntry
    serial: int
    active_sites: list[str]
    updated_rosters: list[Path]
    written: list[Path] = field(default_factory=list)
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "action": self.action,
            "consortium": self.consortium,
            "out_dir": str(self.out_dir),
            "site_id": self.site.site_id,
            "node_id": self.site.node_id,
            "bundle": str(self.site.bundle_dir),
            "serial": self.serial,
            "active_sites": self.active_sites,
            "updated_rosters": [str(p) for p in self.updated_rosters],
        }
        if self.action == "add-site":
            data["written"] = [str(p) for p in self.written]
        else:
            data["reason"] = self.reason
        return data


# -- writing --------------------------------------------------------------------------


@dataclass
class _Writer:
    force: bool
    written: list[Path] = field(default_factory=list)

    def private(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_key(path, data, self.force)
        self.written.append(path)

    def public(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_public_file(path, data)
        self.written.append(path)

    def json(self, path: Path, obj: Any) -> None:
        self.public(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _private_dir(path: Path) -> None:
    """Create a folder that holds private keys: mode 0700."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _site_key_paths(site_dir: Path) -> list[Path]:
    return [site_dir / IDENTITY_KEY, site_dir / SUPERNODE_KEY]


def _write_site_bundle(
    writer: _Writer,
    site_dir: Path,
    site_id: str,
    node_id: int,
    consortium: str,
    superlink: str,
    identity: Ed25519PrivateKey,
    identity_cert: x509.Certificate,
    supernode_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> None:
    """Everything of a site's bundle but its roster.json."""
    _private_dir(site_dir)
    if not writer.force:
        refuse_existing([site_dir / IDENTITY_KEY])
    save_identity(site_dir / IDENTITY_KEY, identity)
    os.chmod(site_dir / IDENTITY_KEY, 0o600)
    writer.written.append(site_dir / IDENTITY_KEY)
    writer.public(site_dir / IDENTITY_CERT, certificate_pem(identity_cert))
    writer.private(site_dir / SUPERNODE_KEY, supernode_private_openssh(supernode_key))
    writer.public(
        site_dir / SUPERNODE_PUB,
        (supernode_public_openssh(supernode_key, site_id) + "\n").encode("ascii"),
    )
    writer.public(site_dir / CA_CERT, certificate_pem(ca_cert))
    write_policy(site_dir / POLICY_NAME, SitePolicy(site_id=site_id))
    os.chmod(site_dir / POLICY_NAME, 0o644)
    writer.written.append(site_dir / POLICY_NAME)
    writer.json(
        site_dir / BUNDLE_INFO,
        {
            "consortium": consortium,
            "site_id": site_id,
            "node_id": node_id,
            "superlink": superlink,
        },
    )


@dataclass(frozen=True)
class _NewSite:
    entry: RosterSite
    identity: Ed25519PrivateKey
    identity_cert: x509.Certificate
    supernode_key: ec.EllipticCurvePrivateKey


def _new_site(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    consortium: str,
    site_id: str,
    node_id: int,
    days: int,
) -> _NewSite:
    identity = generate_identity()
    cert = issue_identity_certificate(
        ca_key, ca_cert, site_id, consortium, identity.public_key(), days
    )
    supernode = generate_supernode_key()
    entry = RosterSite(
        site_id, node_id, public_key_bytes(identity), supernode_public_openssh(supernode, site_id)
    )
    return _NewSite(entry, identity, cert, supernode)


def provision(
    out_dir: Path,
    consortium: str,
    servers: Sequence[str],
    site_ids: Sequence[str],
    port: int = DEFAULT_PORT,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> ProvisionResult:
    """Create a consortium in ``out_dir``: CA, server bundle, one bundle per site, roster.

    Node ids are 1, 2, ... in ``site_ids`` order. Without ``force`` nothing is written if
    any private key, the CA certificate or the roster already exists there
    (:class:`ProvisionError` naming the file).
    """
    out_dir = Path(out_dir)
    name = check_consortium_name(consortium)
    hosts = check_hosts(servers)
    ids = check_site_ids(site_ids)
    port = check_port(port)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ProvisionError(f"--days: must be a whole number of days >= 1, got {days!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ProvisionError(f"--out: {out_dir} exists and is not a folder")
    ca_dir, server_dir, sites_dir = out_dir / CA_DIR, out_dir / SERVER_DIR, out_dir / SITES_DIR
    guarded = [
        ca_dir / CA_KEY,
        ca_dir / CA_CERT,
        out_dir / ROSTER_NAME,
        server_dir / SERVER_KEY,
        *(p for site_id in ids for p in _site_key_paths(sites_dir / site_id)),
    ]
    if not force:
        refuse_existing(guarded)

    # Everything is made in memory first, so a failure here writes nothing.
    ca_key, ca_cert = create_ca(name, days)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, hosts, days)
    new_sites = [
        _new_site(ca_key, ca_cert, name, site_id, node_id, days)
        for node_id, site_id in enumerate(ids, start=1)
    ]
    roster = ConsortiumRoster(name, 1, utc_timestamp(), tuple(s.entry for s in new_sites))
    superlink = superlink_address(hosts[0], port)

    writer = _Writer(force=True)  # existence was checked above
    _private_dir(ca_dir)
    writer.private(ca_dir / CA_KEY, private_pem(ca_key))
    writer.public(ca_dir / CA_CERT, certificate_pem(ca_cert))
    writer.json(
        out_dir / CONSORTIUM_NAME,
        {
            "consortium": name,
            "servers": hosts,
            "port": port,
            "days": days,
            "created_at": utc_timestamp(),
        },
    )
    _private_dir(server_dir)
    writer.private(server_dir / SERVER_KEY, private_pem(server_key))
    writer.public(server_dir / SERVER_CERT, certificate_pem(server_cert))
    writer.public(server_dir / CA_CERT, certificate_pem(ca_cert))
    writer.json(server_dir / SERVER_INFO, {"consortium": name, "hosts": hosts, "port": port})
    entries = []
    for site in new_sites:
        site_dir = sites_dir / site.entry.name
        _write_site_bundle(
            writer,
            site_dir,
            site.entry.name,
            site.entry.node_id,
            name,
            superlink,
            site.identity,
            site.identity_cert,
            site.supernode_key,
            ca_cert,
        )
        entries.append(SiteEntry(site.entry.name, site.entry.node_id, site_dir))
    rosters = [server_dir / ROSTER_NAME, *(e.bundle_dir / ROSTER_NAME for e in entries)]
    rosters.append(out_dir / ROSTER_NAME)  # the master copy last
    _write_rosters(roster, ca_key, rosters)
    writer.written.extend(rosters)
    return ProvisionResult(
        out_dir=out_dir,
        consortium=name,
        hosts=hosts,
        port=port,
        serial=roster.serial,
        ca_key=ca_dir / CA_KEY,
        ca_cert=ca_dir / CA_CERT,
        roster=out_dir / ROSTER_NAME,
        server_dir=server_dir,
        sites=entries,
        written=writer.written,
    )


def _write_rosters(
    roster: ConsortiumRoster, ca_key: ec.EllipticCurvePrivateKey, paths: Sequence[Path]
) -> None:
    """Sign once and write the same bytes everywhere."""
    first = paths[0]
    write_signed_roster(first, roster, ca_key)
    for path in paths[1:]:
        if path != first:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_public_file(path, first.read_bytes())


# -- the consortium on disk (the CA operator's side) ----------------------------------


@dataclass(frozen=True)
class _Consortium:
    out_dir: Path
    name: str
    hosts: list[str]
    port: int
    days: int
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    roster: ConsortiumRoster


def _read_json(path: Path, error: type[ValueError], what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise error(f"{what} {path}: expected a JSON object")
    return obj


def _open_consortium(out_dir: Path) -> _Consortium:
    out_dir = Path(out_dir)
    if not (out_dir / CONSORTIUM_NAME).exists():
        raise ProvisionError(
            f"{out_dir / CONSORTIUM_NAME} does not exist: --out must be a folder made by "
            "`medfed provision`"
        )
    info = _read_json(out_dir / CONSORTIUM_NAME, ProvisionError, "consortium file")
    where = out_dir / CONSORTIUM_NAME
    name, hosts, port = info.get("consortium"), info.get("servers"), info.get("port")
    if not isinstance(name, str) or not name:
        raise ProvisionError(f"{where}: 'consortium' must be a non-empty string")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise ProvisionError(f"{where}: 'servers' must be a non-empty list of hosts")
    if isinstance(port, bool) or not isinstance(port, int):
        raise ProvisionError(f"{where}: 'port' must be an integer")
    days = info.get("days", DEFAULT_DAYS)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ProvisionError(f"{where}: 'days' must be a positive integer")
    ca_cert = load_ca_certificate(out_dir / CA_DIR / CA_CERT)
    ca_key = load_ec_private_key(out_dir / CA_DIR / CA_KEY, "CA key")
    if not same_public_key(ca_key.public_key(), ca_cert.public_key()):
        raise ProvisionError(
            f"CA key {out_dir / CA_DIR / CA_KEY} does not belong to CA certificate "
            f"{out_dir / CA_DIR / CA_CERT}"
        )
    roster = load_signed_roster(out_dir / ROSTER_NAME, ca_cert)
    if roster.consortium != name:
        raise ProvisionError(
            f"{out_dir / ROSTER_NAME} is for consortium {roster.consortium!r}, {where} for {name!r}"
        )
    return _Consortium(out_dir, name, hosts, port, days, ca_key, ca_cert, roster)


def _bundle_rosters(con: _Consortium, roster: ConsortiumRoster) -> list[Path]:
    """Every roster copy to refresh: the server's, then each site folder of a site the
    roster knows (active or revoked) that exists, then the master copy."""
    paths = []
    if (con.out_dir / SERVER_DIR).is_dir():
        paths.append(con.out_dir / SERVER_DIR / ROSTER_NAME)
    names = [s.name for s in roster.sites] + [r.name for r in roster.revoked]
    for site_name in names:
        site_dir = con.out_dir / SITES_DIR / site_name
        if site_dir.is_dir():
            paths.append(site_dir / ROSTER_NAME)
    paths.append(con.out_dir / ROSTER_NAME)
    return paths


def add_site(out_dir: Path, site_id: str, force: bool = False) -> RosterUpdate:
    """Enrol one more site: a new bundle in ``OUT/sites/<ID>`` with node id one above
    every id ever issued, and the roster (next serial) in every bundle.

    Without ``force`` an existing key in that folder is an error (nothing is written).
    """
    check_site_id(site_id)
    con = _open_consortium(out_dir)
    roster = con.roster
    if roster.is_revoked(site_id):
        raise ProvisionError(
            f"site {site_id!r} was revoked from consortium {con.name!r}; enrol it under "
            "a new site id"
        )
    if site_id in roster.site_names:
        node = roster.site(site_id).node_id
        raise ProvisionError(f"site {site_id!r} is already in the roster (node {node})")
    site_dir = con.out_dir / SITES_DIR / site_id
    if not force:
        refuse_existing(_site_key_paths(site_dir))
    # The certificate ends no later than the CA's (pki clamps to it).
    days = con.days
    new = _new_site(con.ca_key, con.ca_cert, con.name, site_id, roster.next_node_id(), days)
    updated = roster.with_site(new.entry)
    writer = _Writer(force=force)
    _write_site_bundle(
        writer,
        site_dir,
        site_id,
        new.entry.node_id,
        con.name,
        superlink_address(con.hosts[0], con.port),
        new.identity,
        new.identity_cert,
        new.supernode_key,
        con.ca_cert,
    )
    rosters = _bundle_rosters(con, updated)
    _write_rosters(updated, con.ca_key, rosters)
    return RosterUpdate(
        action="add-site",
        out_dir=con.out_dir,
        consortium=con.name,
        site=SiteEntry(site_id, new.entry.node_id, site_dir),
        serial=updated.serial,
        active_sites=updated.site_names,
        updated_rosters=rosters,
        written=writer.written,
    )


def revoke_site(out_dir: Path, site_id: str, reason: str = "") -> RosterUpdate:
    """Remove a site from the roster (it moves to ``revoked``; its node id is never
    reused), re-sign with the next serial and replace every bundle's roster.json, the
    revoked site's own included. Its bundle folder stays where it is."""
    con = _open_consortium(out_dir)
    roster = con.roster
    if not isinstance(reason, str) or any(not ch.isprintable() for ch in reason):
        raise ProvisionError("--reason: must be printable text on one line")
    if revoked := roster.revocation(site_id):
        raise ProvisionError(
            f"site {site_id!r} was already revoked on {revoked.revoked_at} (node {revoked.node_id})"
        )
    if site_id not in roster.site_names:
        known = ", ".join(roster.site_names) or "none"
        raise UnknownSiteError(
            f"unknown site {site_id!r} in {con.out_dir / ROSTER_NAME}; known sites: {known}"
        )
    node_id = roster.site(site_id).node_id
    updated = roster.with_revoked(site_id, reason)
    rosters = _bundle_rosters(con, updated)
    _write_rosters(updated, con.ca_key, rosters)
    return RosterUpdate(
        action="revoke-site",
        out_dir=con.out_dir,
        consortium=con.name,
        site=SiteEntry(site_id, node_id, con.out_dir / SITES_DIR / site_id),
        serial=updated.serial,
        active_sites=updated.site_names,
        updated_rosters=rosters,
        reason=reason,
    )


# -- loading a bundle (the site's and the coordinator's side) ---------------------------


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


def _bundle_roster(path: Path, ca_cert: x509.Certificate) -> ConsortiumRoster:
    try:
        return load_signed_roster(path, ca_cert)
    except RosterSignatureError as exc:
        raise BundleError(str(exc)) from None


def _verify_cert(
    path: Path, ca_cert: x509.Certificate, ca_path: Path, what: str
) -> x509.Certificate:
    try:
        cert = load_certificate(path, what)
        verify_certificate_signed_by(cert, ca_cert, what=f"{what} {path}")
    except CertificateError as exc:
        raise BundleError(f"{exc} (CA: {ca_path})") from None
    return cert


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
    info = _read_json(info_path, BundleError, "bundle file")
    site_id = _str_field(info, "site_id", info_path)
    consortium = _str_field(info, "consortium", info_path)
    superlink = _str_field(info, "superlink", info_path)
    node_id = info.get("node_id")
    if isinstance(node_id, bool) or not isinstance(node_id, int):
        raise BundleError(f"{info_path}: 'node_id' must be an integer")

    ca_path = bundle_dir / CA_CERT
    ca_cert = _bundle_ca(ca_path)
    roster_path = bundle_dir / ROSTER_NAME
    roster = _bundle_roster(roster_path, ca_cert)
    if roster.consortium != consortium:
        raise BundleError(
            f"{roster_path} is the roster of consortium {roster.consortium!r}, but "
            f"{info_path} says {consortium!r}"
        )
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
    common_names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if common_names != [site_id]:
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
    is not issued by ca.pem or lacks a listed host, or the roster does not verify."""
    bundle_dir = Path(bundle_dir)
    files = [SERVER_KEY, SERVER_CERT, CA_CERT, ROSTER_NAME, SERVER_INFO]
    _require_files(bundle_dir, files, "server bundle")
    key_path = bundle_dir / SERVER_KEY
    check_private_key_mode(key_path)
    info_path = bundle_dir / SERVER_INFO
    info = _read_json(info_path, BundleError, "server file")
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
    roster = _bundle_roster(roster_path, ca_cert)
    if roster.consortium != consortium:
        raise BundleError(
            f"{roster_path} is the roster of consortium {roster.consortium!r}, but "
            f"{info_path} says {consortium!r}"
        )
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
    )
