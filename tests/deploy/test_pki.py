"""The consortium PKI: CA, server and identity certificates, SuperNode keys, signed roster."""

import base64
import contextlib
import ipaddress
import json
import os
import re
import ssl
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.common.secagg.identity import Roster, public_key_bytes
from medfed.deploy.pki import (
    CertificateError,
    ProvisionError,
    certificate_pem,
    check_host,
    create_ca,
    generate_supernode_key,
    issue_identity_certificate,
    issue_server_certificate,
    load_ca_certificate,
    private_pem,
    supernode_private_openssh,
    supernode_public_openssh,
    verify_certificate_signed_by,
    write_private_key,
    write_public_file,
)
from medfed.deploy.roster import (
    ROSTER_TAG,
    ConsortiumRoster,
    RosterSignatureError,
    RosterSite,
    UnknownSiteError,
    canonical_bytes,
    load_signed_roster,
    write_signed_roster,
)


@pytest.fixture(scope="module")
def ca():
    return create_ca("North Imaging", days=30)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- certificates ---------------------------------------------------------------------


def test_ca_certificate_is_a_self_signed_ca(ca):
    key, cert = ca
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.subject == cert.issuer
    org = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert org == "North Imaging"
    cert.verify_directly_issued_by(cert)
    verify_certificate_signed_by(cert, cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=10)


def test_server_certificate_covers_names_and_addresses(ca):
    ca_key, ca_cert = ca
    hosts = ["fl.example.org", "10.0.0.5", "::1", "superlink.local"]
    key, cert = issue_server_certificate(ca_key, ca_cert, hosts, days=30)
    assert key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "superlink.local"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fl.example.org"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    verify_certificate_signed_by(cert, ca_cert)
    cert.verify_directly_issued_by(ca_cert)


def test_server_certificate_passes_tls_hostname_checks(ca, tmp_path):
    """A real TLS handshake (Python's ssl, in memory) accepts the server certificate for
    each of its names and addresses when the client trusts only the consortium CA."""
    ca_key, ca_cert = ca
    key, cert = issue_server_certificate(ca_key, ca_cert, ["fl.example.org", "10.0.0.5"], 30)
    (tmp_path / "server.pem").write_bytes(certificate_pem(cert))
    (tmp_path / "server.key").write_bytes(private_pem(key))

    def handshake(server_hostname):
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
        client_ctx = ssl.create_default_context(cadata=certificate_pem(ca_cert).decode())
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for end, outbox, peer_inbox in (
                (client, c_out, s_in),
                (server, s_out, c_in),
            ):
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
                peer_inbox.write(outbox.read())
            if client.version() and server.version():
                return
        raise AssertionError("handshake did not finish")

    handshake("fl.example.org")
    handshake("10.0.0.5")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake("other.example.org")


def test_identity_certificate_binds_the_ed25519_key(ca):
    ca_key, ca_cert = ca
    identity = Ed25519PrivateKey.generate()
    cert = issue_identity_certificate(
        ca_key, ca_cert, "hospital-a", "North Imaging", identity.public_key(), days=30
    )
    assert cert.public_key().public_bytes_raw() == public_key_bytes(identity)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-a"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "North Imaging"
    )
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    verify_certificate_signed_by(cert, ca_cert)


def test_certificate_from_another_ca_is_rejected(ca):
    _, ca_cert = ca
    other_key, other_cert = create_ca("North Imaging", days=30)  # same name, other key
    cert = issue_identity_certificate(
        other_key,
        other_cert,
        "hospital-a",
        "North Imaging",
        Ed25519PrivateKey.generate().public_key(),
        30,
    )
    with pytest.raises(CertificateError, match=re.escape("identity.pem is not signed by")):
        verify_certificate_signed_by(cert, ca_cert, what="identity.pem")
    third_key, third_cert = create_ca("Elsewhere", days=30)
    cert = issue_identity_certificate(
        third_key, third_cert, "x", "Elsewhere", Ed25519PrivateKey.generate().public_key(), 30
    )
    with pytest.raises(CertificateError, match="not issued by"):
        verify_certificate_signed_by(cert, ca_cert)


def test_expired_certificate_is_rejected(ca):
    ca_key, ca_cert = ca
    cert = issue_identity_certificate(
        ca_key, ca_cert, "a", "North Imaging", Ed25519PrivateKey.generate().public_key(), 1
    )
    later = datetime.now(UTC) + timedelta(days=2)
    with pytest.raises(CertificateError, match="expired"):
        verify_certificate_signed_by(cert, ca_cert, at=later)


def test_leaf_certificates_end_no_later_than_the_ca(ca):
    ca_key, ca_cert = ca
    _, cert = issue_server_certificate(ca_key, ca_cert, ["fl.example.org"], days=10_000)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_supernode_keys_load_as_flower_loads_them(tmp_path):
    key = generate_supernode_key()
    write_private_key(tmp_path / "supernode.key", supernode_private_openssh(key), force=False)
    line = supernode_public_openssh(key, "hospital-a")
    write_public_file(tmp_path / "supernode.pub", (line + "\n").encode())
    loaded = serialization.load_ssh_private_key(
        (tmp_path / "supernode.key").read_bytes(), password=None
    )
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key((tmp_path / "supernode.pub").read_bytes())
    assert public.public_numbers() == loaded.public_key().public_numbers()
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and line.endswith(" hospital-a")
    assert _mode(tmp_path / "supernode.key") == 0o600
    assert _mode(tmp_path / "supernode.pub") == 0o644


def test_private_key_is_never_overwritten_without_force(tmp_path):
    path = tmp_path / "k.key"
    write_private_key(path, b"first", force=False)
    with pytest.raises(ProvisionError, match=re.escape(str(path)) + ".*--force"):
        write_private_key(path, b"second", force=False)
    assert path.read_bytes() == b"first"
    write_private_key(path, b"second", force=True)
    assert path.read_bytes() == b"second" and _mode(path) == 0o600


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("FL.Example.org", "fl.example.org"),
        ("10.0.0.5", "10.0.0.5"),
        ("[::1]", "::1"),
        ("localhost", "localhost"),
    ],
)
def test_hosts_are_normalised(host, expected):
    assert check_host(host) == expected


@pytest.mark.parametrize("host", ["", "fl.example.org:9092", "bad_name", "-x.org", "a..b"])
def test_bad_hosts_are_refused(host):
    with pytest.raises(ProvisionError, match="--server"):
        check_host(host)


def test_bad_ca_certificate_files_are_named(ca, tmp_path):
    ca_key, ca_cert = ca
    with pytest.raises(CertificateError, match=re.escape("missing.pem does not exist")):
        load_ca_certificate(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(CertificateError, match=re.escape("junk.pem is not a PEM")):
        load_ca_certificate(tmp_path / "junk.pem")
    _, leaf = issue_server_certificate(ca_key, ca_cert, ["a.org"], 30)
    (tmp_path / "leaf.pem").write_bytes(certificate_pem(leaf))
    with pytest.raises(CertificateError, match=re.escape("leaf.pem is not a CA")):
        load_ca_certificate(tmp_path / "leaf.pem")


# -- signed roster --------------------------------------------------------------------


def _site(name, node_id):
    return RosterSite(
        name,
        node_id,
        public_key_bytes(Ed25519PrivateKey.generate()),
        supernode_public_openssh(generate_supernode_key(), name),
    )


@pytest.fixture
def signed(ca, tmp_path):
    ca_key, _ = ca
    roster = ConsortiumRoster(
        "North Imaging",
        1,
        "2025-01-01T00:00:00Z",
        (_site("hospital-a", 1), _site("hospital-b", 2), _site("hospital-c", 3)),
    )
    path = tmp_path / "roster.json"
    write_signed_roster(path, roster, ca_key)
    return roster, path


def test_signed_roster_round_trips_and_is_public(ca, signed):
    roster, path = signed
    assert load_signed_roster(path, ca[1]) == roster
    assert _mode(path) == 0o644
    obj = json.loads(path.read_text())
    unsigned = roster.to_unsigned_json()
    assert {k: v for k, v in obj.items() if k != "signature"} == unsigned
    assert [s["node_id"] for s in obj["sites"]] == [1, 2, 3]
    assert set(obj["supernode_keys"]) == {"hospital-a", "hospital-b", "hospital-c"}
    # the signature is over the domain tag and the canonical JSON
    signature = base64.b64decode(obj["signature"])
    ca[1].public_key().verify(signature, canonical_bytes(unsigned), ec.ECDSA(hashes.SHA384()))
    assert canonical_bytes(unsigned).startswith(ROSTER_TAG)


def test_secagg_roster_loader_reads_the_signed_file(ca, signed):
    roster, path = signed
    plain = Roster.load(path)
    assert dict(plain.keys) == {s.node_id: s.identity_public_key for s in roster.sites}
    assert dict(plain.names) == {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}
    assert roster.secagg_roster() == plain


def _edit(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _other_key(obj):
    obj["sites"][0]["public_key"] = public_key_bytes(Ed25519PrivateKey.generate()).hex()


def _rename(obj):
    old = obj["sites"][1]["name"]
    obj["sites"][1]["name"] = "impostor"
    obj["supernode_keys"]["impostor"] = obj["supernode_keys"].pop(old)


def _drop(obj):
    obj["sites"].pop()
    obj["supernode_keys"].pop("hospital-c")


def _add(obj):
    site = _site("intruder", 9)
    obj["sites"].append(
        {"node_id": 9, "name": "intruder", "public_key": site.identity_public_key.hex()}
    )
    obj["supernode_keys"]["intruder"] = site.supernode_public_key


def _other_supernode_key(obj):
    obj["supernode_keys"]["hospital-a"] = supernode_public_openssh(generate_supernode_key(), "x")


def _serial(obj):
    obj["serial"] = 0


def _unrevoke(obj):
    obj["revoked"] = []


@pytest.mark.parametrize(
    "change",
    [_other_key, _rename, _drop, _add, _other_supernode_key, _serial, _unrevoke],
    ids=lambda f: f.__name__.strip("_"),
)
def test_every_edit_breaks_the_signature(ca, signed, change):
    roster, path = signed
    if change is _unrevoke:
        write_signed_roster(path, roster.with_revoked("hospital-c", "left"), ca[0])
    _edit(path, change)
    with pytest.raises(RosterSignatureError, match=re.escape(f"{path}: signature does not match")):
        load_signed_roster(path, ca[1])


def test_missing_or_bad_signature_is_named(ca, signed):
    _, path = signed
    _edit(path, lambda obj: obj.pop("signature"))
    with pytest.raises(RosterSignatureError, match=re.escape(f"{path}: not signed")):
        load_signed_roster(path, ca[1])
    _edit(path, lambda obj: obj.update(signature="###"))
    with pytest.raises(RosterSignatureError, match="not base64"):
        load_signed_roster(path, ca[1])
    _edit(path, lambda obj: obj.update(signature=base64.b64encode(b"x" * 96).decode()))
    with pytest.raises(RosterSignatureError, match="signature does not match"):
        load_signed_roster(path, ca[1])


def test_roster_signed_by_another_ca_is_rejected(ca, signed, tmp_path):
    roster, path = signed
    other_key, _ = create_ca("North Imaging", days=30)
    write_signed_roster(path, roster, other_key)
    with pytest.raises(RosterSignatureError, match="not signed by this consortium's CA"):
        load_signed_roster(path, ca[1])


def test_unreadable_roster_files_are_named(ca, tmp_path):
    with pytest.raises(RosterSignatureError, match=re.escape("nope.json does not exist")):
        load_signed_roster(tmp_path / "nope.json", ca[1])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RosterSignatureError, match=re.escape("bad.json is not JSON")):
        load_signed_roster(tmp_path / "bad.json", ca[1])


def test_malformed_entry_with_a_valid_signature_is_named(ca, tmp_path):
    """Even a roster the CA signed is refused when an entry is malformed."""
    ca_key, ca_cert = ca
    good = ConsortiumRoster("C", 1, "t", (_site("a", 1), _site("b", 2))).to_unsigned_json()
    good["sites"][1]["public_key"] = "zz"
    signature = ca_key.sign(canonical_bytes(good), ec.ECDSA(hashes.SHA384()))
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**good, "signature": base64.b64encode(signature).decode()}))
    with pytest.raises(RosterSignatureError, match="site 'b': public_key is not a hex"):
        load_signed_roster(path, ca_cert)


def test_roster_changes_bump_the_serial_and_never_reuse_node_ids():
    roster = ConsortiumRoster("C", 1, "t", (_site("a", 1), _site("b", 2), _site("c", 3)))
    revoked = roster.with_revoked("c", "left the consortium")
    assert revoked.serial == 2 and revoked.site_names == ["a", "b"]
    assert revoked.is_revoked("c") and not revoked.is_revoked("a")
    assert revoked.next_node_id() == 4
    added = revoked.with_site(_site("d", revoked.next_node_id()))
    assert added.serial == 3 and added.site("d").node_id == 4
    with pytest.raises(UnknownSiteError, match="'c' was revoked"):
        added.site("c")
    with pytest.raises(UnknownSiteError, match="unknown site 'zz'; the roster lists: a, b, d"):
        added.site("zz")
    with pytest.raises(ValueError, match="revoked"):
        added.with_site(_site("c", 9))


def test_roster_refuses_duplicates():
    a = _site("a", 1)
    with pytest.raises(ValueError, match="listed twice"):
        ConsortiumRoster("C", 1, "t", (a, replace(_site("a", 2))))
    with pytest.raises(ValueError, match="node_id 1 is used twice"):
        ConsortiumRoster("C", 1, "t", (a, _site("b", 1)))
    with pytest.raises(ValueError, match="shares its identity key"):
        ConsortiumRoster(
            "C", 1, "t", (a, replace(_site("b", 2), identity_public_key=a.identity_public_key))
        )
