"""Authenticated key agreement: site identities, the consortium roster, signed public keys.

In SecAgg+ the server relays every site's key-agreement public keys to its neighbours. If
those keys were not authenticated, a server could substitute its own and then derive the
pairwise masks and share keys of a site, and so read its update (the weakness of Flower's
SecAgg+ that issue 4 fixes). Here each site holds a long-term Ed25519 identity key, known
to every peer through the consortium :class:`Roster`, and signs its two X25519 public keys
(one for masks, one for share encryption) together with the run id, the round and its node
id. A peer verifies the bundle (:func:`verify_keys`) before encrypting any share to it and
aborts the round, naming the site, on: an unknown node, a bad signature (substituted or
tampered keys), or a bundle for another run or round (replay).

Identities come from the deployment enrolment where it exists; simulations make fresh
ones per simulation with :func:`simulation_roster`. A site keeps its identity key in a file
of its own (:func:`save_identity`, :func:`load_identity`: unencrypted PKCS8 PEM, mode 0o600,
so it is protected by the file system like an SSH host key), and finds its roster entry
from it with :meth:`Roster.node_of`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from medfed.common.atomic import atomic_write_bytes, atomic_write_json

KEYS_TAG = b"medfed-secagg-keys-v1"
"""Domain separation: an identity signature over key bundles means nothing else."""
ROSTER_VERSION = 1
_U64 = 2**64
_PUBLIC_BYTES = 32
_SIGNATURE_BYTES = 64


class KeyAuthenticationError(Exception):
    """A site's key-agreement keys cannot be trusted: abort the round.

    ``node_id`` is the site concerned (``None`` when a bundle is too malformed to tell).
    """

    def __init__(self, message: str, node_id: int | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id


class RosterError(ValueError):
    """The roster file or one of its entries is malformed, or a key is not in the roster."""


class IdentityError(ValueError):
    """An identity key file is missing, unreadable, or not an unencrypted Ed25519 PEM key.

    The message names the file, never its contents.
    """


def generate_identity() -> Ed25519PrivateKey:
    """A fresh Ed25519 identity key (OS CSPRNG)."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(identity: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of an identity, as stored in the roster."""
    return identity.public_key().public_bytes_raw()


def _check_u64(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _U64:
        raise ValueError(f"{name} must be an unsigned 64-bit integer, got {value!r}")


@dataclass(frozen=True)
class Roster:
    """The consortium's sites: node id -> raw Ed25519 public key, plus optional names.

    Read-only after construction. Keys and names must be unique: two sites sharing an
    identity key, or a name, is a configuration error.
    """

    keys: Mapping[int, bytes]
    names: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = {int(k): bytes(v) for k, v in self.keys.items()}
        names = dict(self.names)
        for node_id, key in keys.items():
            _check_u64("node id", node_id)
            _load_ed25519(key, f"node {node_id}")
        if len(set(keys.values())) != len(keys):
            raise RosterError("two roster entries share one public key")
        if unknown := set(names) - set(keys):
            raise RosterError(f"names given for nodes not in the roster: {sorted(unknown)}")
        if len(set(names.values())) != len(names):
            raise RosterError("two roster entries share one name")
        object.__setattr__(self, "keys", MappingProxyType(keys))
        object.__setattr__(self, "names", MappingProxyType(names))

    def describe(self, node_id: int) -> str:
        """``site 'name' (node 7)`` or ``node 7``, for error messages."""
        name = self.names.get(node_id)
        return f"site {name!r} (node {node_id})" if name else f"node {node_id}"

    def node_of(self, public_key: bytes) -> int:
        """The node id enrolled with this raw 32-byte Ed25519 public key (e.g.
        ``public_key_bytes(load_identity(path))``); :class:`RosterError` if none is."""
        key = bytes(public_key)
        for node_id, enrolled in self.keys.items():
            if enrolled == key:
                return node_id
        raise RosterError(
            f"public key {key[:8].hex()}... ({len(key)} bytes) is not enrolled in the roster"
        )

    def public_key(self, node_id: int) -> Ed25519PublicKey:
        """The identity public key of ``node_id``; ``KeyError`` if it is not enrolled."""
        return Ed25519PublicKey.from_public_bytes(self.keys[node_id])

    def to_json(self) -> dict[str, Any]:
        """JSON form: ``{"version": 1, "sites": [{"node_id", "name"?, "public_key" (hex)}]}``."""
        sites = []
        for node_id in sorted(self.keys):
            entry: dict[str, Any] = {"node_id": node_id}
            if node_id in self.names:
                entry["name"] = self.names[node_id]
            entry["public_key"] = self.keys[node_id].hex()
            sites.append(entry)
        return {"version": ROSTER_VERSION, "sites": sites}

    @classmethod
    def from_json(cls, obj: Any, source: str = "roster") -> Roster:
        """Parse :meth:`to_json`'s form; ``RosterError`` naming the bad entry."""
        if not isinstance(obj, dict) or obj.get("version") != ROSTER_VERSION:
            raise RosterError(f"{source}: expected an object with version {ROSTER_VERSION}")
        sites = obj.get("sites")
        if not isinstance(sites, list):
            raise RosterError(f"{source}: 'sites' must be a list")
        keys: dict[int, bytes] = {}
        names: dict[int, str] = {}
        for position, entry in enumerate(sites):
            node_id, name, key = _parse_entry(entry, f"{source}: entry {position}")
            if node_id in keys:
                raise RosterError(f"{source}: entry {position}: duplicate node_id {node_id}")
            keys[node_id] = key
            if name is not None:
                names[node_id] = name
        try:
            return cls(keys, names)
        except ValueError as exc:
            raise RosterError(f"{source}: {exc}") from None

    def save(self, path: Path) -> None:
        """Write the roster as JSON, atomically."""
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Roster:
        """Read and validate a roster written by :meth:`save`."""
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RosterError(f"cannot read roster {path}: {exc}") from None
        return cls.from_json(obj, source=str(path))


def _load_ed25519(key: bytes, what: str) -> Ed25519PublicKey:
    if len(key) != _PUBLIC_BYTES:
        raise RosterError(f"{what}: public key must be {_PUBLIC_BYTES} bytes, got {len(key)}")
    try:
        return Ed25519PublicKey.from_public_bytes(key)
    except ValueError as exc:
        raise RosterError(f"{what}: not an Ed25519 public key: {exc}") from None


def _parse_entry(entry: Any, where: str) -> tuple[int, str | None, bytes]:
    """One roster entry -> (node id, name or None, raw public key)."""
    if not isinstance(entry, dict):
        raise RosterError(f"{where}: must be an object")
    node_id = entry.get("node_id")
    try:
        _check_u64("node_id", node_id)
    except ValueError as exc:
        raise RosterError(f"{where}: {exc}") from None
    where = f"{where} (node_id {node_id})"
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise RosterError(f"{where}: name must be a non-empty string")
    if extra := set(entry) - {"node_id", "name", "public_key"}:
        raise RosterError(f"{where}: unknown fields {sorted(extra)}")
    hex_key = entry.get("public_key")
    if not isinstance(hex_key, str) or len(hex_key) != 2 * _PUBLIC_BYTES:
        raise RosterError(f"{where}: public_key must be {2 * _PUBLIC_BYTES} hex characters")
    try:
        key = bytes.fromhex(hex_key)
    except ValueError:
        raise RosterError(f"{where}: public_key is not hex") from None
    _load_ed25519(key, where)
    return int(node_id), name, key


def simulation_roster(
    node_ids: Iterable[int],
) -> tuple[Roster, dict[int, Ed25519PrivateKey]]:
    """Fresh identities for a simulation: the roster and each node's private key."""
    ids = list(node_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate node ids: {sorted(ids)}")
    private = {node_id: generate_identity() for node_id in ids}
    roster = Roster({node_id: public_key_bytes(key) for node_id, key in private.items()})
    return roster, private


def save_identity(path: Path, key: Ed25519PrivateKey) -> None:
    """Write an identity key as unencrypted PKCS8 PEM, readable by its owner only.

    Written atomically (:func:`~medfed.common.atomic.atomic_write_bytes`): the bytes go to a
    temporary file that ``tempfile.mkstemp`` creates with mode 0o600 before anything is written,
    which then replaces ``path``; so the key is never readable by others, not even briefly, and
    an existing file is never left half-written. Parent folders are created as needed.
    """
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"{path}: can only save an Ed25519 identity key, not {type(key).__name__}"
        )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write_bytes(Path(path), pem)


def load_identity(path: Path) -> Ed25519PrivateKey:
    """Read an identity key written by :func:`save_identity`.

    :class:`IdentityError` naming the path if the file is missing or unreadable, is not a PEM
    private key, is encrypted, or holds a key of another type.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"identity key file {path} does not exist") from None
    except OSError as exc:
        raise IdentityError(f"cannot read identity key file {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise IdentityError(f"identity key file {path} is not PEM")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise IdentityError(
            f"identity key file {path} is encrypted; expected an unencrypted PKCS8 key"
        ) from None
    except ValueError:
        raise IdentityError(
            f"identity key file {path} does not hold a readable PEM private key"
        ) from None
    except UnsupportedAlgorithm:
        raise IdentityError(
            f"identity key file {path} holds a key of an unsupported type"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"identity key file {path} holds a {type(key).__name__}, not an Ed25519 key"
        )
    return key


def _lp(data: bytes) -> bytes:
    """Length-prefixed field (u32 big-endian length), so field boundaries are unambiguous."""
    return struct.pack(">I", len(data)) + data


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


@dataclass(frozen=True)
class SignedKeys:
    """A site's two X25519 public keys, signed by its identity key with their context.

    ``mask_public`` agrees the pairwise mask secrets, ``share_public`` the keys that
    encrypt secret shares. :meth:`signed_message` is what the signature covers.
    """

    node_id: int
    run_id: int
    server_round: int
    mask_public: bytes
    share_public: bytes
    signature: bytes

    def __post_init__(self) -> None:
        for name in ("node_id", "run_id", "server_round"):
            _check_u64(name, getattr(self, name))
        for name in ("mask_public", "share_public"):
            if len(getattr(self, name)) != _PUBLIC_BYTES:
                raise ValueError(f"{name} must be {_PUBLIC_BYTES} bytes (X25519)")
        if self.mask_public == self.share_public:
            raise ValueError("mask and share public keys must differ (two key pairs)")
        if len(self.signature) != _SIGNATURE_BYTES:
            raise ValueError(f"signature must be {_SIGNATURE_BYTES} bytes (Ed25519)")

    def signed_message(self) -> bytes:
        """The canonical encoding the signature covers."""
        return _keys_message(
            self.node_id, self.run_id, self.server_round, self.mask_public, self.share_public
        )

    def to_bytes(self) -> bytes:
        """Transport encoding: the signed message followed by the length-prefixed signature."""
        return self.signed_message() + _lp(self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedKeys:
        """Parse :meth:`to_bytes`; ``KeyAuthenticationError`` if malformed."""
        try:
            fields = _split_lp(data, count=7)
            if fields[0] != KEYS_TAG:
                raise ValueError("wrong domain-separation tag")
            if any(len(f) != 8 for f in fields[1:4]):
                raise ValueError("ids must be 8 bytes")
            ids = [int.from_bytes(f, "big") for f in fields[1:4]]
            return cls(*ids, fields[4], fields[5], fields[6])
        except ValueError as exc:
            raise KeyAuthenticationError(f"malformed signed key bundle: {exc}") from None


def _keys_message(
    node_id: int, run_id: int, server_round: int, mask_public: bytes, share_public: bytes
) -> bytes:
    parts = (KEYS_TAG, _u64(node_id), _u64(run_id), _u64(server_round))
    return b"".join(_lp(p) for p in (*parts, mask_public, share_public))


def _split_lp(data: bytes, count: int) -> list[bytes]:
    """Split exactly ``count`` length-prefixed fields; ``ValueError`` otherwise."""
    fields, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(data):
            raise ValueError("truncated")
        (length,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise ValueError("truncated")
        fields.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise ValueError("trailing bytes")
    return fields


def sign_keys(
    identity: Ed25519PrivateKey,
    node_id: int,
    run_id: int,
    server_round: int,
    mask_public: bytes,
    share_public: bytes,
) -> SignedKeys:
    """Sign a site's raw X25519 public keys for one run and round with its identity key."""
    for name, value in (("node_id", node_id), ("run_id", run_id), ("server_round", server_round)):
        _check_u64(name, value)
    for name, key in (("mask_public", mask_public), ("share_public", share_public)):
        try:
            X25519PublicKey.from_public_bytes(key)
        except ValueError as exc:
            raise ValueError(f"{name} is not an X25519 public key: {exc}") from None
    message = _keys_message(node_id, run_id, server_round, mask_public, share_public)
    signature = identity.sign(message)
    return SignedKeys(node_id, run_id, server_round, mask_public, share_public, signature)


def verify_keys(
    signed: SignedKeys,
    roster: Roster,
    run_id: int,
    server_round: int,
    *,
    expected_node_id: int | None = None,
) -> None:
    """Check a relayed key bundle before trusting it; ``KeyAuthenticationError`` naming the
    site if the node is not enrolled, the bundle is relabelled as another node's, it was
    made for another run or round (replay), or the signature does not verify (keys or
    fields substituted by the relay). The signature is checked over the *expected* run id
    and round, so no field of the bundle is trusted before it is authenticated."""
    node = signed.node_id
    if node not in roster.keys:
        raise KeyAuthenticationError(f"unknown site: node {node} is not in the roster", node)
    site = roster.describe(node)
    if expected_node_id is not None and expected_node_id != node:
        raise KeyAuthenticationError(
            f"{site}: its keys were relayed as those of node {expected_node_id}", node
        )
    if (signed.run_id, signed.server_round) != (run_id, server_round):
        raise KeyAuthenticationError(
            f"{site}: keys signed for run {signed.run_id} round {signed.server_round}, "
            f"expected run {run_id} round {server_round} (replayed bundle)",
            node,
        )
    message = _keys_message(node, run_id, server_round, signed.mask_public, signed.share_public)
    try:
        roster.public_key(node).verify(signed.signature, message)
    except InvalidSignature:
        raise KeyAuthenticationError(
            f"{site}: signature on its key-agreement keys does not verify "
            "(keys substituted or tampered with in transit)",
            node,
        ) from None


def verify_peer_keys(
    bundles: Mapping[int, SignedKeys], roster: Roster, run_id: int, server_round: int
) -> None:
    """:func:`verify_keys` for every relayed bundle, keyed by the node the server says
    sent it; the first failure aborts."""
    for node_id in sorted(bundles):
        verify_keys(bundles[node_id], roster, run_id, server_round, expected_node_id=node_id)
