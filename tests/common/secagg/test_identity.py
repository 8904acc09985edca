"""Authenticated key agreement: roster, signed key bundles, substitution and replay."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medfed.common.secagg.identity import (
    KEYS_TAG,
    IdentityError,
    KeyAuthenticationError,
    Roster,
    RosterError,
    SignedKeys,
    generate_identity,
    load_identity,
    public_key_bytes,
    save_identity,
    sign_keys,
    simulation_roster,
    verify_keys,
    verify_peer_keys,
)

RUN, ROUND = 77, 5


def _x25519() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


@pytest.fixture(scope="module")
def sim() -> tuple[Roster, dict]:
    roster, private = simulation_roster([1, 2, 3])
    return Roster(roster.keys, {1: "hospital-a", 2: "hospital-b"}), private


def _bundle(private: dict, node: int = 1, run: int = RUN, rnd: int = ROUND) -> SignedKeys:
    return sign_keys(private[node], node, run, rnd, _x25519(), _x25519())


def test_simulation_roster_matches_private_keys(sim) -> None:
    roster, private = sim
    assert set(roster.keys) == set(private) == {1, 2, 3}
    for node, key in private.items():
        assert roster.keys[node] == public_key_bytes(key)
    with pytest.raises(ValueError, match="duplicate"):
        simulation_roster([4, 4])


def test_signed_keys_verify(sim) -> None:
    roster, private = sim
    signed = _bundle(private)
    verify_keys(signed, roster, RUN, ROUND)
    verify_keys(signed, roster, RUN, ROUND, expected_node_id=1)
    assert signed.signed_message().startswith(len(KEYS_TAG).to_bytes(4, "big") + KEYS_TAG)


def test_transport_encoding_round_trip(sim) -> None:
    roster, private = sim
    signed = _bundle(private)
    assert SignedKeys.from_bytes(signed.to_bytes()) == signed
    verify_keys(SignedKeys.from_bytes(signed.to_bytes()), roster, RUN, ROUND)
    for bad in (signed.to_bytes()[:-1], signed.to_bytes() + b"\0", b"", b"\0\0\0\5junk"):
        with pytest.raises(KeyAuthenticationError, match="malformed"):
            SignedKeys.from_bytes(bad)


@pytest.mark.parametrize("field", ["mask_public", "share_public"])
def test_server_swapping_a_public_key_is_caught(sim, field: str) -> None:
    roster, private = sim
    swapped = dataclasses.replace(_bundle(private), **{field: _x25519()})
    with pytest.raises(KeyAuthenticationError, match=r"'hospital-a' \(node 1\).*signature") as e:
        verify_keys(swapped, roster, RUN, ROUND)
    assert e.value.node_id == 1


def test_node_id_rewritten_in_a_bundle_is_caught(sim) -> None:
    roster, private = sim
    rewritten = dataclasses.replace(_bundle(private, 1), node_id=2)
    with pytest.raises(KeyAuthenticationError, match=r"'hospital-b' \(node 2\): signature"):
        verify_keys(rewritten, roster, RUN, ROUND, expected_node_id=2)


def test_server_resigning_with_its_own_key_is_caught(sim) -> None:
    roster, _ = sim
    forged = sign_keys(generate_identity(), 2, RUN, ROUND, _x25519(), _x25519())
    with pytest.raises(KeyAuthenticationError, match="'hospital-b' \\(node 2\\)"):
        verify_keys(forged, roster, RUN, ROUND)


def test_bundle_relabelled_as_another_node_is_caught(sim) -> None:
    roster, private = sim
    bundles = {1: _bundle(private, 1), 2: _bundle(private, 1)}  # node 1's keys posing as 2
    with pytest.raises(KeyAuthenticationError, match="relayed as those of node 2"):
        verify_peer_keys(bundles, roster, RUN, ROUND)
    verify_peer_keys({1: bundles[1], 3: _bundle(private, 3)}, roster, RUN, ROUND)


@pytest.mark.parametrize(("run", "rnd"), [(RUN, ROUND - 1), (RUN - 1, ROUND)])
def test_replayed_bundle_is_rejected(sim, run: int, rnd: int) -> None:
    roster, private = sim
    old = _bundle(private, 3, run, rnd)
    with pytest.raises(KeyAuthenticationError, match=r"node 3: keys signed for.*replayed"):
        verify_keys(old, roster, RUN, ROUND)
    # Relabelling the old bundle's round or run breaks its signature.
    relabelled = dataclasses.replace(old, run_id=RUN, server_round=ROUND)
    with pytest.raises(KeyAuthenticationError, match="node 3: signature"):
        verify_keys(relabelled, roster, RUN, ROUND)


def test_unknown_node_is_rejected(sim) -> None:
    roster, _ = sim
    outsider = sign_keys(generate_identity(), 9, RUN, ROUND, _x25519(), _x25519())
    with pytest.raises(KeyAuthenticationError, match="unknown site: node 9") as e:
        verify_keys(outsider, roster, RUN, ROUND)
    assert e.value.node_id == 9


def test_sign_keys_validation() -> None:
    identity = generate_identity()
    with pytest.raises(ValueError, match="mask_public"):
        sign_keys(identity, 1, RUN, ROUND, b"short", _x25519())
    same = _x25519()
    with pytest.raises(ValueError, match="must differ"):
        sign_keys(identity, 1, RUN, ROUND, same, same)
    with pytest.raises(ValueError, match="64-bit"):
        sign_keys(identity, -1, RUN, ROUND, _x25519(), _x25519())


# --- roster JSON ---------------------------------------------------------------------


def test_roster_json_round_trip(sim, tmp_path: Path) -> None:
    roster, _ = sim
    path = tmp_path / "sub" / "roster.json"
    roster.save(path)
    assert Roster.load(path) == roster
    obj = json.loads(path.read_text())
    assert obj["sites"][0] == {
        "node_id": 1,
        "name": "hospital-a",
        "public_key": obj["sites"][0]["public_key"],
    }
    assert "name" not in obj["sites"][2]
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp files left


def _entry(**overrides) -> dict:
    key = public_key_bytes(generate_identity()).hex()
    return {"node_id": 7, "name": "hospital-x", "public_key": key} | overrides


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (_entry(public_key="zz" * 32), "entry 1 \\(node_id 7\\): public_key is not hex"),
        (_entry(public_key="ab" * 31), "entry 1 \\(node_id 7\\): public_key must be 64 hex"),
        (_entry(node_id=-3), "entry 1: node_id must be an unsigned 64-bit"),
        (_entry(node_id="7"), "entry 1: node_id must be"),
        (_entry(name=""), "entry 1 \\(node_id 7\\): name must be"),
        (_entry(extra=1), "entry 1 \\(node_id 7\\): unknown fields \\['extra'\\]"),
        ("not an object", "entry 1: must be an object"),
    ],
)
def test_malformed_roster_entry_is_named(tmp_path: Path, entry, match: str) -> None:
    good = _entry(node_id=1, name="hospital-a")
    path = tmp_path / "roster.json"
    path.write_text(json.dumps({"version": 1, "sites": [good, entry]}))
    with pytest.raises(RosterError, match=match):
        Roster.load(path)


def test_roster_level_errors(tmp_path: Path) -> None:
    path = tmp_path / "roster.json"
    a = _entry(node_id=1, name="a")
    cases = [
        ("{not json", "cannot read roster"),
        (json.dumps({"version": 2, "sites": []}), "version 1"),
        (json.dumps({"version": 1, "sites": {}}), "'sites' must be a list"),
        (json.dumps({"version": 1, "sites": [a, a | {"name": "b"}]}), "entry 1: duplicate"),
        (
            json.dumps({"version": 1, "sites": [a, a | {"node_id": 2, "name": "b"}]}),
            "share one public key",
        ),
        (json.dumps({"version": 1, "sites": [a, _entry(node_id=2, name="a")]}), "share one name"),
    ]
    for text, match in cases:
        path.write_text(text)
        with pytest.raises(RosterError, match=match):
            Roster.load(path)
    with pytest.raises(RosterError, match="cannot read roster"):
        Roster.load(tmp_path / "missing.json")


def test_roster_is_read_only(sim) -> None:
    roster, _ = sim
    with pytest.raises(TypeError):
        roster.keys[99] = b"x" * 32  # type: ignore[index]
    with pytest.raises(RosterError, match="not in the roster"):
        Roster(roster.keys, {42: "ghost"})


# --- identity key files and roster look-up --------------------------------------------


def test_identity_file_round_trip(tmp_path: Path) -> None:
    key = generate_identity()
    path = tmp_path / "keys" / "identity.pem"  # the folder is created
    save_identity(path, key)
    text = path.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS8, unencrypted
    loaded = load_identity(path)
    assert public_key_bytes(loaded) == public_key_bytes(key)
    assert loaded.private_bytes_raw() == key.private_bytes_raw()
    assert list(path.parent.iterdir()) == [path]  # no temp files left


def test_identity_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    old_umask = os.umask(0o022)  # the usual umask, which leaves new files world-readable
    try:
        save_identity(path, generate_identity())
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        path.chmod(0o644)  # overwriting a world-readable file replaces it by a private one
        key = generate_identity()
        save_identity(path, key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_bytes(load_identity(path)) == public_key_bytes(key)


def test_save_identity_refuses_other_keys(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="only save an Ed25519"):
        save_identity(tmp_path / "x.pem", X25519PrivateKey.generate())  # type: ignore[arg-type]
    assert not (tmp_path / "x.pem").exists()


def _pem(key, encryption=None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        ("folder", "cannot read identity key file"),
        (b"", "is not PEM"),
        (b"\x30\x2e\x02\x01\x00", "is not PEM"),  # DER, not PEM
        (
            b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
            "does not hold a readable PEM private key",
        ),
        (
            generate_identity()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "does not hold a readable PEM private key",
        ),
        (_pem(X25519PrivateKey.generate()), "holds a X25519PrivateKey, not an Ed25519 key"),
        (
            _pem(generate_identity(), serialization.BestAvailableEncryption(b"pass phrase")),
            "is encrypted",
        ),
    ],
    ids=["missing", "folder", "empty", "der", "bad-base64", "public-key", "x25519", "encrypted"],
)
def test_load_identity_errors_name_the_path(tmp_path: Path, content, match: str) -> None:
    path = tmp_path / "identity.pem"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(IdentityError, match=match) as info:
        load_identity(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_roster_node_of(sim) -> None:
    roster, private = sim
    for node, key in private.items():
        assert roster.node_of(public_key_bytes(key)) == node
    stranger = public_key_bytes(generate_identity())
    with pytest.raises(RosterError, match=f"{stranger[:8].hex()}.*not enrolled") as info:
        roster.node_of(stranger)
    assert stranger.hex() not in str(info.value)
    with pytest.raises(RosterError, match="not enrolled"):
        roster.node_of(b"")
