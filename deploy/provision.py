"""``medfed provision``: create a consortium's CA, server and site bundles on disk.

Layout under the output folder ``OUT``::

    OUT/ca/ca.key            CA private key (EC P-384, 0600): keep it offline, in no bundle
    OUT/ca/ca.pem            CA certificate
    OUT/roster.json          the CA-signed roster (master copy)
    OUT/consortium.json      consortium name, SuperLink hosts and port (used by add-site)
    OUT/server/              the coordinator's bundle: server.key (0600), server.pem,
                             coordinator-identity.pem (0600), coordinator.pem, ca.pem,
                             roster.json, server.json
    OUT/sites/<ID>/          one hospital's bundle: identity.key (0600), identity.pem,
                             supernode.key (0600), supernode.pub, ca.pem, roster.json,
                             site.toml (policy template), bundle.json

:func:`provision` creates it all, :func:`add_site` enrols one more site and
:func:`revoke_site` removes one; both re-sign the roster with the next serial and copy it
into every bundle. :func:`add_coordinator_key` gives a server bundle provisioned before
the coordinator signed its round records its signing key and certificate. File names
are in :mod:`medfed.deploy.layout`; checking a bundle before use is
:mod:`medfed.deploy.bundles`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
from medfed.common.secagg.identity import (
    generate_identity,
    public_key_bytes,
    save_identity,
)
from medfed.deploy.layout import (
    BUNDLE_INFO,
    CA_CERT,
    CA_DIR,
    CA_KEY,
    CONSORTIUM_NAME,
    COORDINATOR_CERT,
    COORDINATOR_KEY,
    COORDINATOR_SUBJECT,
    DEFAULT_DAYS,
    DEFAULT_PORT,
    IDENTITY_CERT,
    IDENTITY_KEY,
    ROSTER_NAME,
    SERVER_CERT,
    SERVER_DIR,
    SERVER_INFO,
    SERVER_KEY,
    SITES_DIR,
    SUPERNODE_KEY,
    SUPERNODE_PUB,
    check_hosts,
    check_port,
    check_site_id,
    check_site_ids,
    read_json,
    superlink_address,
)
from medfed.deploy.pki import (
    ProvisionError,
    certificate_pem,
    check_consortium_name,
    create_ca,
    generate_supernode_key,
    issue_identity_certificate,
    issue_server_certificate,
    load_ca_certificate,
    load_ec_private_key,
    private_pem,
    refuse_existing,
    same_public_key,
    supernode_private_openssh,
    supernode_public_openssh,
    write_private_key,
    write_public_file,
)
from medfed.deploy.roster import (
    ConsortiumRoster,
    RosterSite,
    UnknownSiteError,
    load_signed_roster,
    utc_timestamp,
    write_signed_roster,
)

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


def _write_identity(writer: _Writer, path: Path, identity: Ed25519PrivateKey) -> None:
    """An Ed25519 identity key: atomically, 0600 (the caller checked for an existing one)."""
    save_identity(path, identity)
    os.chmod(path, 0o600)
    writer.written.append(path)


def _new_coordinator_key(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, consortium: str, days: int
) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """The coordinator's round-record signing key and its CA-issued certificate."""
    key = generate_identity()
    cert = issue_identity_certificate(
        ca_key, ca_cert, COORDINATOR_SUBJECT, consortium, key.public_key(), days
    )
    return key, cert


def _write_coordinator_key(
    writer: _Writer, server_dir: Path, key: Ed25519PrivateKey, cert: x509.Certificate
) -> None:
    _write_identity(writer, server_dir / COORDINATOR_KEY, key)
    writer.public(server_dir / COORDINATOR_CERT, certificate_pem(cert))


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
    _write_identity(writer, site_dir / IDENTITY_KEY, identity)
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
        server_dir / COORDINATOR_KEY,
        *(p for site_id in ids for p in _site_key_paths(sites_dir / site_id)),
    ]
    if not force:
        refuse_existing(guarded)

    # Everything is made in memory first, so a failure here writes nothing.
    ca_key, ca_cert = create_ca(name, days)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, hosts, days)
    coordinator_key, coordinator_cert = _new_coordinator_key(ca_key, ca_cert, name, days)
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
    _write_coordinator_key(writer, server_dir, coordinator_key, coordinator_cert)
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


def _open_consortium(out_dir: Path) -> _Consortium:
    out_dir = Path(out_dir)
    if not (out_dir / CONSORTIUM_NAME).exists():
        raise ProvisionError(
            f"{out_dir / CONSORTIUM_NAME} does not exist: --out must be a folder made by "
            "`medfed provision`"
        )
    info = read_json(out_dir / CONSORTIUM_NAME, ProvisionError, "consortium file")
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


def _publish(
    con: _Consortium,
    updated: ConsortiumRoster,
    action: str,
    site: SiteEntry,
    written: list[Path] | None = None,
    reason: str = "",
) -> RosterUpdate:
    """Sign ``updated`` and write it into every bundle and the master copy."""
    rosters = _bundle_rosters(con, updated)
    _write_rosters(updated, con.ca_key, rosters)
    return RosterUpdate(
        action=action,
        out_dir=con.out_dir,
        consortium=con.name,
        site=site,
        serial=updated.serial,
        active_sites=updated.site_names,
        updated_rosters=rosters,
        written=list(written or []),
        reason=reason,
    )


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
    entry = SiteEntry(site_id, new.entry.node_id, site_dir)
    return _publish(con, updated, "add-site", entry, written=writer.written)


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
    entry = SiteEntry(site_id, node_id, con.out_dir / SITES_DIR / site_id)
    return _publish(con, roster.with_revoked(site_id, reason), "revoke-site", entry, reason=reason)


@dataclass(frozen=True)
class CoordinatorKeyResult:
    """What :func:`add_coordinator_key` wrote."""

    out_dir: Path
    consortium: str
    key: Path
    certificate: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "action": "coordinator-key",
            "consortium": self.consortium,
            "out_dir": str(self.out_dir),
            "coordinator_key": str(self.key),
            "coordinator_certificate": str(self.certificate),
        }


def add_coordinator_key(out_dir: Path, force: bool = False) -> CoordinatorKeyResult:
    """Write the coordinator's round-record signing key and its CA-issued certificate into
    ``OUT/server`` (for a consortium provisioned before :func:`provision` wrote them).

    Without ``force`` an existing key is an error (nothing is written). The roster and
    every other file are left as they are.
    """
    con = _open_consortium(out_dir)
    server_dir = con.out_dir / SERVER_DIR  # created (0700) if it was deleted after handover
    if not force:
        refuse_existing([server_dir / COORDINATOR_KEY])
    key, cert = _new_coordinator_key(con.ca_key, con.ca_cert, con.name, con.days)
    _private_dir(server_dir)
    _write_coordinator_key(_Writer(force=True), server_dir, key, cert)
    return CoordinatorKeyResult(
        con.out_dir, con.name, server_dir / COORDINATOR_KEY, server_dir / COORDINATOR_CERT
    )
