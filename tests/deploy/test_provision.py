"""`medfed provision`: the on-disk layout, add-site, revoke-site, bundle checks, the CLI."""

import json
import os
import re
import shutil
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from medfed.audit.trust import load_trusted_keys
from medfed.cli.main import app
from medfed.client.policy import load_policy
from medfed.common.secagg.identity import (
    Roster,
    generate_identity,
    load_identity,
    public_key_bytes,
    save_identity,
)
from medfed.deploy import layout
from medfed.deploy.bundles import BundleError, load_server_bundle, load_site_bundle
from medfed.deploy.pki import (
    ProvisionError,
    certificate_pem,
    create_ca,
    issue_identity_certificate,
    load_ca_certificate,
    verify_certificate_signed_by,
)
from medfed.deploy.provision import add_coordinator_key, add_site, provision, revoke_site
from medfed.deploy.roster import RosterSignatureError, UnknownSiteError, load_signed_roster
from medfed.server import round_log

SITES = ["hospital-a", "hospital-b", "hospital-c"]
HOSTS = ["fl.example.org", "10.0.0.5"]
runner = CliRunner()
COORDINATOR_KEY = "server/coordinator-identity.pem"
COORDINATOR_CERT = "server/coordinator.pem"


@pytest.fixture
def pki(tmp_path):
    out = tmp_path / "pki"
    result = provision(out, "North Imaging", HOSTS, SITES, port=9443, days=30)
    return out, result


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _snapshot(root):
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns, _mode(p))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _private_keys(out):
    return [out / "ca/ca.key", out / "server/server.key", out / COORDINATOR_KEY] + [
        out / "sites" / s / name for s in SITES for name in ("identity.key", "supernode.key")
    ]


# -- the layout -------------------------------------------------------------------------


def test_provision_writes_the_layout(pki):
    out, result = pki
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {
        "ca/ca.key",
        "ca/ca.pem",
        "roster.json",
        "consortium.json",
        *(f"server/{n}" for n in ("server.key", "server.pem", "ca.pem", "roster.json")),
        COORDINATOR_KEY,
        COORDINATOR_CERT,
        "server/server.json",
        *(
            f"sites/{s}/{n}"
            for s in SITES
            for n in (
                "identity.key",
                "identity.pem",
                "supernode.key",
                "supernode.pub",
                "ca.pem",
                "roster.json",
                "site.toml",
                "bundle.json",
            )
        ),
    }
    assert [(e.site_id, e.node_id) for e in result.sites] == list(
        zip(SITES, [1, 2, 3], strict=True)
    )
    assert result.superlink == "fl.example.org:9443"
    assert json.loads((out / "consortium.json").read_text())["servers"] == HOSTS
    assert json.loads((out / "server/server.json").read_text()) == {
        "consortium": "North Imaging",
        "hosts": HOSTS,
        "port": 9443,
    }
    assert json.loads((out / "sites/hospital-b/bundle.json").read_text()) == {
        "consortium": "North Imaging",
        "site_id": "hospital-b",
        "node_id": 2,
        "superlink": "fl.example.org:9443",
    }
    assert load_policy(out / "sites/hospital-b/site.toml").site_id == "hospital-b"
    # the CA key is in no bundle
    ca_key = (out / "ca/ca.key").read_bytes()
    for path in out.rglob("*"):
        if path.is_file() and path != out / "ca/ca.key":
            assert path.read_bytes() != ca_key


def test_private_keys_are_0600_and_public_files_0644(pki):
    out, _ = pki
    private = set(_private_keys(out))
    for path in out.rglob("*"):
        if path.is_file():
            assert _mode(path) == (0o600 if path in private else 0o644), path
    assert _mode(out / "ca") == 0o700


def test_bundle_certificates_chain_to_the_ca(pki):
    out, _ = pki
    ca_cert = load_ca_certificate(out / "ca/ca.pem")
    for folder in ("server", *(f"sites/{s}" for s in SITES)):
        assert (out / folder / "ca.pem").read_bytes() == certificate_pem(ca_cert)
    server = x509.load_pem_x509_certificate((out / "server/server.pem").read_bytes())
    verify_certificate_signed_by(server, ca_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    key = serialization.load_pem_private_key((out / "server/server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for site in SITES:
        cert = x509.load_pem_x509_certificate((out / "sites" / site / "identity.pem").read_bytes())
        verify_certificate_signed_by(cert, ca_cert)
        identity = load_identity(out / "sites" / site / "identity.key")
        assert cert.public_key().public_bytes_raw() == public_key_bytes(identity)


def test_supernode_keys_are_what_flower_loads(pki):
    out, _ = pki
    roster = load_signed_roster(out / "roster.json", load_ca_certificate(out / "ca/ca.pem"))
    for site in SITES:
        folder = out / "sites" / site
        private = serialization.load_ssh_private_key((folder / "supernode.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        public = serialization.load_ssh_public_key((folder / "supernode.pub").read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert (folder / "supernode.pub").read_text().strip().endswith(f" {site}")
        assert roster.matches_supernode_key(site, public)


def test_roster_lists_the_sites_and_is_the_same_everywhere(pki):
    out, _ = pki
    ca_cert = load_ca_certificate(out / "ca/ca.pem")
    roster = load_signed_roster(out / "roster.json", ca_cert)
    assert roster.serial == 1 and roster.consortium == "North Imaging"
    assert [(s.name, s.node_id) for s in roster.sites] == list(zip(SITES, [1, 2, 3], strict=True))
    master = (out / "roster.json").read_bytes()
    for folder in ("server", *(f"sites/{s}" for s in SITES)):
        assert (out / folder / "roster.json").read_bytes() == master
    plain = Roster.load(out / "sites/hospital-a/roster.json")
    assert dict(plain.names) == {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}
    identity = load_identity(out / "sites/hospital-c/identity.key")
    assert plain.node_of(public_key_bytes(identity)) == 3


def test_coordinator_key_is_certified_by_the_ca(pki):
    out, _ = pki
    ca_cert = load_ca_certificate(out / "ca/ca.pem")
    key = load_identity(out / COORDINATOR_KEY)
    cert = x509.load_pem_x509_certificate((out / COORDINATOR_CERT).read_bytes())
    verify_certificate_signed_by(cert, ca_cert)
    assert cert.public_key().public_bytes_raw() == public_key_bytes(key)
    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {
        x509.NameOID.COMMON_NAME: "medfed coordinator",
        x509.NameOID.ORGANIZATION_NAME: "North Imaging",
    }
    # not a site's identity key: the roster does not list it
    roster = load_signed_roster(out / "roster.json", ca_cert).secagg_roster()
    assert public_key_bytes(key) not in roster.keys.values()
    bundle = load_server_bundle(out / "server")
    assert (bundle.coordinator_key, bundle.coordinator_cert) == (
        out / COORDINATOR_KEY,
        out / COORDINATOR_CERT,
    )


def test_layout_names_are_the_coordinators(pki):
    """The bundle's file names are the ones the ServerApp looks for beside its key."""
    assert layout.COORDINATOR_KEY == round_log.COORDINATOR_KEY_NAME == "coordinator-identity.pem"
    assert layout.COORDINATOR_CERT == round_log.COORDINATOR_CERT_NAME == "coordinator.pem"


def test_the_run_publishes_a_certificate_the_audit_accepts(pki, tmp_path):
    """What the ServerApp copies into --out from a provisioned bundle passes `audit --ca`."""
    out, _ = pki
    bundle = load_server_bundle(out / "server")
    audit = tmp_path / "audit"
    audit.mkdir()
    key = load_identity(bundle.coordinator_key)
    round_log.publish_audit_keys(audit, key, bundle.roster, bundle.coordinator_key)
    assert (audit / "coordinator.pem").read_bytes() == bundle.coordinator_cert.read_bytes()
    trusted = load_trusted_keys(audit, None, out / "ca/ca.pem")
    assert trusted.problems == ()
    assert "certified by the CA" in trusted.source


# -- never overwrite ----------------------------------------------------------------------


def test_rerun_refuses_and_changes_nothing(pki):
    out, _ = pki
    before = _snapshot(out)
    with pytest.raises(ProvisionError, match=re.escape(str(out / "ca/ca.key")) + ".*--force"):
        provision(out, "North Imaging", HOSTS, SITES, days=30)
    assert _snapshot(out) == before


def test_one_existing_site_key_blocks_everything(tmp_path):
    out = tmp_path / "pki"
    key = out / "sites/hospital-b/supernode.key"
    key.parent.mkdir(parents=True)
    key.write_bytes(b"keep me")
    with pytest.raises(ProvisionError, match=re.escape(str(key))):
        provision(out, "North Imaging", HOSTS, SITES, days=30)
    assert [p for p in out.rglob("*") if p.is_file()] == [key]
    assert key.read_bytes() == b"keep me"


def test_an_existing_coordinator_key_blocks_everything(tmp_path):
    out = tmp_path / "pki"
    key = out / COORDINATOR_KEY
    key.parent.mkdir(parents=True)
    key.write_bytes(b"keep me")
    with pytest.raises(ProvisionError, match=re.escape(str(key)) + ".*--force"):
        provision(out, "North Imaging", HOSTS, SITES, days=30)
    assert [p for p in out.rglob("*") if p.is_file()] == [key]
    assert key.read_bytes() == b"keep me"


def test_force_overwrites_every_key(pki):
    out, _ = pki
    before = {p: p.read_bytes() for p in _private_keys(out)}
    provision(out, "North Imaging", HOSTS, SITES, days=30, force=True)
    for path, data in before.items():
        assert path.read_bytes() != data, path
        assert _mode(path) == 0o600
    for site in SITES:
        load_site_bundle(out / "sites" / site)


@pytest.mark.parametrize(
    ("sites", "hosts", "message"),
    [
        (["a"], HOSTS, "at least 2 sites"),
        (["a", "a"], HOSTS, "'a' is given twice"),
        (["a", "b c"], HOSTS, "invalid site id 'b c'"),
        (["a", "x" * 65], HOSTS, "invalid site id"),
        (["a", ".."], HOSTS, "invalid site id '..'"),
        (["a", "b"], [], "--server"),
        (["a", "b"], ["fl.example.org:9092"], "'fl.example.org:9092'"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, sites, hosts, message):
    with pytest.raises(ProvisionError, match=re.escape(message)):
        provision(tmp_path / "pki", "C", hosts, sites)
    assert not (tmp_path / "pki").exists()


# -- add-site and revoke-site --------------------------------------------------------------


def test_add_site_enrols_with_the_next_node_id(pki):
    out, _ = pki
    ca_cert = load_ca_certificate(out / "ca/ca.pem")
    update = add_site(out, "hospital-d")
    assert (update.site.node_id, update.serial) == (4, 2)
    bundle = load_site_bundle(out / "sites/hospital-d")
    assert (bundle.node_id, bundle.serial, bundle.superlink) == (4, 2, "fl.example.org:9443")
    assert _mode(out / "sites/hospital-d/identity.key") == 0o600
    master = (out / "roster.json").read_bytes()
    for folder in ("server", *(f"sites/{s}" for s in [*SITES, "hospital-d"])):
        path = out / folder / "roster.json"
        assert path.read_bytes() == master
        assert load_signed_roster(path, ca_cert).site_names == [*SITES, "hospital-d"]
    for site in SITES:
        assert load_site_bundle(out / "sites" / site).serial == 2
    assert load_server_bundle(out / "server").serial == 2


def test_add_site_refuses_known_and_existing(pki):
    out, _ = pki
    with pytest.raises(ProvisionError, match="already in the roster"):
        add_site(out, "hospital-a")
    stray = out / "sites/hospital-x/identity.key"
    stray.parent.mkdir()
    stray.write_bytes(b"old")
    before = _snapshot(out)
    with pytest.raises(ProvisionError, match=re.escape(str(stray)) + ".*--force"):
        add_site(out, "hospital-x")
    assert _snapshot(out) == before
    assert add_site(out, "hospital-x", force=True).site.node_id == 4
    with pytest.raises(ProvisionError, match="made by `medfed provision`"):
        add_site(out / "nowhere", "hospital-y")


def test_revoke_site_moves_it_out_and_its_id_is_never_reused(pki):
    out, _ = pki
    ca_cert = load_ca_certificate(out / "ca/ca.pem")
    update = revoke_site(out, "hospital-c", "left the consortium")
    assert (update.site.node_id, update.serial) == (3, 2)
    roster = load_signed_roster(out / "roster.json", ca_cert)
    assert roster.site_names == ["hospital-a", "hospital-b"]
    assert [(r.name, r.node_id, r.reason) for r in roster.revoked] == [
        ("hospital-c", 3, "left the consortium")
    ]
    assert dict(Roster.load(out / "server/roster.json").names) == {1: "hospital-a", 2: "hospital-b"}
    master = (out / "roster.json").read_bytes()
    for folder in ("server", *(f"sites/{s}" for s in SITES)):
        assert (out / folder / "roster.json").read_bytes() == master
    assert (out / "sites/hospital-c/identity.key").exists()  # the folder stays
    with pytest.raises(BundleError, match=r"'hospital-c' was revoked.*left the consortium"):
        load_site_bundle(out / "sites/hospital-c")
    assert load_site_bundle(out / "sites/hospital-a").serial == 2
    assert add_site(out, "hospital-d").site.node_id == 4
    assert add_site(out, "hospital-e").site.node_id == 5
    with pytest.raises(ProvisionError, match="'hospital-c' was revoked"):
        add_site(out, "hospital-c")
    with pytest.raises(ProvisionError, match="already revoked"):
        revoke_site(out, "hospital-c")


def test_revoke_unknown_site_lists_the_known_ones(pki):
    out, _ = pki
    before = _snapshot(out)
    with pytest.raises(UnknownSiteError, match=r"'nope'.*hospital-a, hospital-b, hospital-c"):
        revoke_site(out, "nope")
    assert _snapshot(out) == before


def test_tampered_master_roster_stops_updates(pki):
    out, _ = pki
    obj = json.loads((out / "roster.json").read_text())
    obj["serial"] = 7
    (out / "roster.json").write_text(json.dumps(obj))
    with pytest.raises(RosterSignatureError, match="signature does not match"):
        add_site(out, "hospital-d")


def test_roster_updates_leave_the_coordinator_key_alone(pki):
    out, _ = pki
    before = {p: _snapshot(out)[p] for p in (out / COORDINATOR_KEY, out / COORDINATOR_CERT)}
    add_site(out, "hospital-d")
    revoke_site(out, "hospital-a")
    assert {p: _snapshot(out)[p] for p in before} == before
    assert load_server_bundle(out / "server").serial == 3


def _make_old(out):
    """A bundle as provisioned before the coordinator signed its round records."""
    (out / COORDINATOR_KEY).unlink()
    (out / COORDINATOR_CERT).unlink()


def test_coordinator_key_can_be_added_to_an_old_consortium(pki):
    out, _ = pki
    _make_old(out)
    with pytest.raises(BundleError, match=r"coordinator-identity\.pem is missing.*coordinator-key"):
        load_server_bundle(out / "server")
    result = add_coordinator_key(out)
    assert (result.key, result.certificate) == (out / COORDINATOR_KEY, out / COORDINATOR_CERT)
    assert _mode(out / COORDINATOR_KEY) == 0o600 and _mode(out / COORDINATOR_CERT) == 0o644
    assert load_server_bundle(out / "server").coordinator_key == out / COORDINATOR_KEY
    before = _snapshot(out)
    with pytest.raises(ProvisionError, match=r"coordinator-identity\.pem already exists.*--force"):
        add_coordinator_key(out)
    assert _snapshot(out) == before
    add_coordinator_key(out, force=True)
    assert (out / COORDINATOR_KEY).read_bytes() != before[out / COORDINATOR_KEY][0]
    assert (out / "roster.json").read_bytes() == before[out / "roster.json"][0]
    load_server_bundle(out / "server")
    with pytest.raises(ProvisionError, match="made by `medfed provision`"):
        add_coordinator_key(out / "nowhere")
    shutil.rmtree(out / "server")  # deleted from the CA machine after handover
    add_coordinator_key(out)
    assert _mode(out / "server") == 0o700 and _mode(out / COORDINATOR_KEY) == 0o600


# -- bundle checks ------------------------------------------------------------------------


def test_site_bundle_loads(pki):
    out, _ = pki
    bundle = load_site_bundle(out / "sites/hospital-b")
    assert (bundle.site_id, bundle.node_id, bundle.consortium) == ("hospital-b", 2, "North Imaging")
    assert bundle.superlink == "fl.example.org:9443"
    assert bundle.identity_key == out / "sites/hospital-b/identity.key"
    assert bundle.policy_template.name == "site.toml"
    server = load_server_bundle(out / "server")
    assert (server.hosts, server.port, server.address) == (HOSTS, 9443, "fl.example.org:9443")


@pytest.mark.parametrize("name", ["identity.key", "supernode.key"])
def test_site_bundle_refuses_a_readable_key(pki, name):
    out, _ = pki
    key = out / "sites/hospital-a" / name
    key.chmod(0o644)
    with pytest.raises(BundleError, match=re.escape(f"{key}") + ".*0644.*chmod 600"):
        load_site_bundle(out / "sites/hospital-a")


def test_server_bundle_refuses_a_readable_key(pki):
    out, _ = pki
    (out / "server/server.key").chmod(0o640)
    with pytest.raises(BundleError, match=r"server\.key.*chmod 600"):
        load_server_bundle(out / "server")


def test_server_bundle_refuses_a_missing_coordinator_key_or_certificate(pki):
    out, _ = pki
    (out / COORDINATOR_CERT).unlink()
    with pytest.raises(BundleError, match=r"server/coordinator\.pem is missing.*coordinator-key"):
        load_server_bundle(out / "server")
    (out / COORDINATOR_KEY).unlink()
    with pytest.raises(BundleError, match=r"coordinator-identity\.pem is missing"):
        load_server_bundle(out / "server")


def test_server_bundle_refuses_a_readable_coordinator_key(pki):
    out, _ = pki
    key = out / COORDINATOR_KEY
    key.chmod(0o640)
    with pytest.raises(BundleError, match=re.escape(str(key)) + ".*0640.*chmod 600"):
        load_server_bundle(out / "server")


def test_server_bundle_refuses_a_coordinator_certificate_from_another_ca(pki):
    out, _ = pki
    other_key, other_cert = create_ca("North Imaging", days=30)
    cert = issue_identity_certificate(
        other_key,
        other_cert,
        "medfed coordinator",
        "North Imaging",
        load_identity(out / COORDINATOR_KEY).public_key(),
        30,
    )
    (out / COORDINATOR_CERT).write_bytes(certificate_pem(cert))
    with pytest.raises(BundleError, match=r"coordinator\.pem is not signed by"):
        load_server_bundle(out / "server")


def test_server_bundle_refuses_a_coordinator_certificate_for_another_key(pki):
    out, _ = pki
    # another key in the key file, the certificate left as it is
    save_identity(out / COORDINATOR_KEY, generate_identity())
    with pytest.raises(BundleError, match=r"coordinator\.pem is not for the key in"):
        load_server_bundle(out / "server")
    # a site's identity key and its CA-issued certificate: right CA, wrong holder
    site = out / "sites/hospital-a"
    save_identity(out / COORDINATOR_KEY, load_identity(site / "identity.key"))
    (out / COORDINATOR_CERT).write_bytes((site / "identity.pem").read_bytes())
    with pytest.raises(BundleError, match=r"names \['hospital-a'\], expected 'medfed coordinator'"):
        load_server_bundle(out / "server")
    (out / COORDINATOR_KEY).write_bytes(b"not a key")
    with pytest.raises(BundleError, match=re.escape(str(out / COORDINATOR_KEY))):
        load_server_bundle(out / "server")


def test_site_bundle_refuses_identity_from_another_ca(pki):
    out, _ = pki
    folder = out / "sites/hospital-a"
    other_key, other_cert = create_ca("North Imaging", days=30)
    cert = issue_identity_certificate(
        other_key,
        other_cert,
        "hospital-a",
        "North Imaging",
        load_identity(folder / "identity.key").public_key(),
        30,
    )
    (folder / "identity.pem").write_bytes(certificate_pem(cert))
    with pytest.raises(BundleError, match=r"identity\.pem is not signed by"):
        load_site_bundle(folder)


def test_site_bundle_refuses_a_tampered_roster(pki):
    out, _ = pki
    path = out / "sites/hospital-a/roster.json"
    obj = json.loads(path.read_text())
    obj["sites"][1]["public_key"] = obj["sites"][0]["public_key"][::-1]
    path.write_text(json.dumps(obj))
    with pytest.raises(BundleError, match=re.escape(str(path)) + ".*signature does not match"):
        load_site_bundle(out / "sites/hospital-a")


def test_site_bundle_refuses_swapped_keys_and_missing_files(pki):
    out, _ = pki
    a, b = out / "sites/hospital-a", out / "sites/hospital-b"
    (a / "supernode.pub").write_bytes((b / "supernode.pub").read_bytes())
    with pytest.raises(BundleError, match=r"supernode\.pub is not the public key"):
        load_site_bundle(a)
    (b / "identity.pem").unlink()
    with pytest.raises(BundleError, match=r"identity\.pem is missing"):
        load_site_bundle(b)
    c = out / "sites/hospital-c"
    (c / "identity.key").write_bytes((a / "identity.key").read_bytes())
    with pytest.raises(BundleError, match="is not for the key in"):
        load_site_bundle(c)


# -- the command ----------------------------------------------------------------------------


def _provision_args(out, *extra):
    return [
        "provision",
        "--consortium",
        "North Imaging",
        "--server",
        "fl.example.org,10.0.0.5",
        "--site",
        "hospital-a",
        "--site",
        "hospital-b",
        "--out",
        str(out),
        *extra,
    ]


def test_cli_provision_add_and_revoke(tmp_path):
    out = tmp_path / "pki"
    result = runner.invoke(app, _provision_args(out), terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "hospital-a" in result.output and "offline" in result.output
    assert load_site_bundle(out / "sites/hospital-b").node_id == 2

    result = runner.invoke(app, ["provision", "add-site", "hospital-c", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "node 3" in result.output

    result = runner.invoke(
        app,
        ["provision", "revoke-site", "hospital-a", "--out", str(out), "--reason", "closed"],
    )
    assert result.exit_code == 0, result.output
    ca_cert = load_ca_certificate(out / "ca/ca.pem")
    roster = load_signed_roster(out / "roster.json", ca_cert)
    assert roster.site_names == ["hospital-b", "hospital-c"] and roster.serial == 3


def test_cli_json_output(tmp_path):
    out = tmp_path / "pki"
    result = runner.invoke(app, _provision_args(out, "--port", "9443", "--json"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["superlink"] == "fl.example.org:9443"
    assert [(s["site_id"], s["node_id"]) for s in summary["sites"]] == [
        ("hospital-a", 1),
        ("hospital-b", 2),
    ]
    assert summary["ca_key"] == str(out / "ca/ca.key")

    result = runner.invoke(app, ["provision", "add-site", "h-c", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    assert (added["action"], added["node_id"], added["serial"]) == ("add-site", 3, 2)

    args = ["provision", "revoke-site", "h-c", "--out", str(out), "--json"]
    revoked = json.loads(runner.invoke(app, args).stdout)
    assert (revoked["action"], revoked["serial"], revoked["active_sites"]) == (
        "revoke-site",
        3,
        ["hospital-a", "hospital-b"],
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site", "a b", "--site", "c"], "invalid site id 'a b'"),
        (["--site", "a", "--site", "a"], "'a' is given twice"),
        (["--site", "a"], "at least 2 sites"),
    ],
)
def test_cli_bad_sites_exit_2(tmp_path, args, message):
    base = ["provision", "--consortium", "C", "--server", "fl.example.org"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "pki"), *args])
    assert result.exit_code == 2
    assert message in result.output and "--site" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "pki").exists()


def test_cli_errors_exit_2(tmp_path):
    out = tmp_path / "pki"
    assert runner.invoke(app, _provision_args(out)).exit_code == 0
    again = runner.invoke(app, _provision_args(out))
    assert again.exit_code == 2 and "--force" in again.output and "ca.key" in again.output
    assert runner.invoke(app, _provision_args(out, "--force")).exit_code == 0

    unknown = runner.invoke(app, ["provision", "revoke-site", "nope", "--out", str(out)])
    assert unknown.exit_code == 2
    assert "unknown site 'nope'" in unknown.output and "hospital-a" in unknown.output

    missing = runner.invoke(app, ["provision", "--server", "a.org", "--site", "a", "--site", "b"])
    assert missing.exit_code == 2 and "--consortium" in missing.output

    nowhere = runner.invoke(app, ["provision", "add-site", "x", "--out", str(tmp_path / "no")])
    assert nowhere.exit_code == 2 and "consortium.json" in nowhere.output


def test_cli_coordinator_key(tmp_path):
    out = tmp_path / "pki"
    assert runner.invoke(app, _provision_args(out)).exit_code == 0
    args = ["provision", "coordinator-key", "--out", str(out)]
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    _make_old(out)
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["coordinator_key"] == str(out / COORDINATOR_KEY)
    assert summary["coordinator_certificate"] == str(out / COORDINATOR_CERT)
    load_server_bundle(out / "server")
    result = runner.invoke(app, [*args, "--force"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "copy both into the coordinator's bundle" in result.output


def test_cli_help(tmp_path):
    for args in (["provision", "--help"], ["provision"], ["provision", "add-site", "--help"]):
        result = runner.invoke(app, args, terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output
    text = runner.invoke(app, ["provision", "--help"], terminal_width=200).output
    for word in ("--consortium", "--server", "--site", "--force", "add-site", "revoke-site"):
        assert word in text


def test_grpc_tls_with_the_bundles(tmp_path):
    """The transport Flower uses: a gRPC server with the server bundle's key and certificate
    is reached over TLS by a client that trusts only a site bundle's ca.pem."""
    from concurrent import futures

    import grpc

    out = tmp_path / "pki"
    provision(out, "C", ["localhost", "127.0.0.1"], ["a", "b"], days=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    creds = grpc.ssl_server_credentials(
        [((out / "server/server.key").read_bytes(), (out / "server/server.pem").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        trust = grpc.ssl_channel_credentials((out / "sites/a/ca.pem").read_bytes())
        for target in (f"localhost:{port}", f"127.0.0.1:{port}"):
            with grpc.secure_channel(target, trust) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
    finally:
        server.stop(0)
