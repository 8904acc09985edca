"""Signatures for append-only, hash-chained logs (site ledgers, coordinator round records).

Every entry of such a log carries ``prev_hash`` (the ``entry_hash`` of the entry before,
:data:`GENESIS` for the first), ``entry_hash`` (SHA-256 of the entry's canonical JSON
without ``entry_hash`` and ``signature``), ``signer`` (the SHA-256 of the signer's raw
Ed25519 public key) and ``signature`` (Ed25519 over a domain tag and the entry hash).
The chain makes an edit, deletion, insertion or reordering visible; the signature binds
each entry to the key that wrote it, so a party without that key cannot rewrite the log
and re-chain it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
UNSIGNED_FIELDS = ("entry_hash", "signature")


def canonical_json(body: Mapping[str, Any]) -> bytes:
    """The one byte string that is hashed for ``body`` (sorted keys, no spaces)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``entry`` without its ``entry_hash`` and ``signature`` fields."""
    body = {k: v for k, v in entry.items() if k not in UNSIGNED_FIELDS}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """The signer id written into entries: SHA-256 (hex) of the raw public key."""
    raw = key if isinstance(key, bytes) else raw_public_key(key)
    return hashlib.sha256(raw).hexdigest()


def sign_hash(key: Ed25519PrivateKey, tag: bytes, digest: str) -> str:
    """Ed25519 signature (hex) over ``tag`` and the entry hash ``digest``."""
    return key.sign(tag + bytes.fromhex(digest)).hex()


def signature_valid(key: Ed25519PublicKey, tag: bytes, digest: str, signature: str) -> bool:
    """Whether ``signature`` is ``key``'s signature over ``tag`` and ``digest``."""
    try:
        key.verify(bytes.fromhex(signature), tag + bytes.fromhex(digest))
    except (InvalidSignature, ValueError):
        return False
    return True


class SignedEntry:
    """Mixin for an entry dataclass with ``entry_hash``, ``signer`` and ``signature``.

    ``TAG`` is the log's domain-separation tag.
    """

    TAG: ClassVar[bytes] = b""
    entry_hash: str
    signer: str
    signature: str

    def compute_hash(self) -> str:
        return entry_hash(asdict(self))  # type: ignore[call-overload]

    def signed_by(self, public_key: Ed25519PublicKey) -> bool:
        """Whether ``public_key`` is the entry's signer and its signature is valid."""
        return self.signer == key_id(public_key) and signature_valid(
            public_key, self.TAG, self.entry_hash, self.signature
        )
