"""Secret shares for secure aggregation, and their encrypted transport between sites.

In SecAgg+ (Bell et al., CCS 2020) every site Shamir-shares two 32-byte secrets with its
neighbours: the seed of its self mask and the private key of its mask key pair. If the site
drops out after sending its masked update, t surviving neighbours hand the server their
shares of the *private key* so that the pairwise masks can be removed; if it survives, they
hand over shares of the *self-mask seed* instead, never both. The shares travel through the
server, so each one is encrypted for its receiver with an AEAD under a pairwise share key.

Threat model (ARCHITECTURE.md, "Encrypted updates"): the server relays every share and is
honest-but-curious; the network is hostile. Hence:

* t - 1 shares reveal nothing about a secret (Shamir is information-theoretically hiding);
* a share can only be read by its receiver (AEAD under the pairwise key);
* a ciphertext replayed by the server into another run, round, stage or pair fails to
  decrypt, because those are bound into the AEAD's associated data.

Secret sharing uses pycryptodome's ``Shamir`` (already a Flower dependency): a maintained
implementation over GF(2^128), whose random polynomial coefficients come from
``Crypto.Random.get_random_bytes``, which *is* ``os.urandom`` (the OS CSPRNG; checked in
the tests). It shares 16-byte secrets only, so a 32-byte secret is split into two 16-byte
halves, each shared with its own, independently random polynomial, at the same indices
(x-coordinates). A :class:`Share` holds both halves; t - 1 shares still reveal nothing
about either half, because the two polynomials are independent.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

SECRET_BYTES = 32
"""Length of every shared secret (self-mask seed, X25519 private key)."""
_HALF = 16
MAX_SHARES = 0xFFFF
"""Largest number of shares (indices are encoded on 2 bytes)."""
KEY_BYTES = 32
"""Length of a pairwise share key (ChaCha20-Poly1305)."""
NONCE_BYTES = 12
_TAG_BYTES = 16
_U64 = 2**64
_HEADER_TAG = b"medfed-secagg-share-v1"
_PLAINTEXT_VERSION = 1
_PLAINTEXT = struct.Struct(f">BQQH{SECRET_BYTES}sH{SECRET_BYTES}s")
STAGE_SHARE_KEYS = "share-keys"
"""The SecAgg+ stage in which encrypted shares are sent."""


class ShareError(Exception):
    """An encrypted share failed to decrypt or to parse: abort the round for this pair."""


@dataclass(frozen=True)
class Share:
    """One Shamir share of a 32-byte secret.

    ``index`` is the x-coordinate (1..n; 0 would be the secret itself and is refused);
    ``value`` is the share of the first 16-byte half followed by that of the second.
    """

    index: int
    value: bytes

    def __post_init__(self) -> None:
        if not 1 <= self.index <= MAX_SHARES:
            raise ValueError(f"share index must be in 1..{MAX_SHARES}, got {self.index}")
        if len(self.value) != SECRET_BYTES:
            raise ValueError(f"share value must be {SECRET_BYTES} bytes, got {len(self.value)}")


def _check_threshold(threshold: int, num_shares: int) -> None:
    if not 1 <= num_shares <= MAX_SHARES:
        raise ValueError(f"number of shares must be in 1..{MAX_SHARES}, got {num_shares}")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"threshold must satisfy 1 <= t <= n = {num_shares}, got t = {threshold}")


def split_secret(secret: bytes, threshold: int, num_shares: int) -> list[Share]:
    """Split a 32-byte ``secret`` into ``num_shares`` shares, any ``threshold`` of which
    reconstruct it; fewer reveal nothing. Share i (1-based) has index i."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    _check_threshold(threshold, num_shares)
    first = Shamir.split(threshold, num_shares, secret[:_HALF])
    second = Shamir.split(threshold, num_shares, secret[_HALF:])
    # pycryptodome returns indices 1..n in order for both halves.
    return [Share(i, a + b) for (i, a), (_, b) in zip(first, second, strict=True)]


def combine_shares(shares: Sequence[Share], threshold: int) -> bytes:
    """Reconstruct the 32-byte secret from at least ``threshold`` distinct shares.

    Shamir itself never fails: interpolating t - 1 shares (or corrupted ones) silently
    yields a wrong secret. So this refuses fewer than ``threshold`` shares and duplicate
    indices with a ``ValueError``. The ``threshold`` lowest indices are used. Integrity of
    each share is the AEAD's job (:func:`decrypt_share`), not Shamir's.
    """
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1, got {threshold}")
    indices = [share.index for share in shares]
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate share indices: {sorted(indices)}")
    if len(shares) < threshold:
        raise ValueError(f"need at least {threshold} shares to reconstruct, got {len(shares)}")
    chosen = sorted(shares, key=lambda share: share.index)[:threshold]
    first = Shamir.combine([(s.index, s.value[:_HALF]) for s in chosen])
    second = Shamir.combine([(s.index, s.value[_HALF:]) for s in chosen])
    return first + second


@dataclass(frozen=True)
class ShareHeader:
    """Context a share ciphertext is bound to (AEAD associated data).

    Changing any field, e.g. replaying last round's ciphertext or swapping sender and
    receiver, makes decryption fail. Ids are unsigned 64-bit, as Flower's node/run ids.
    """

    run_id: int
    server_round: int
    sender: int
    receiver: int
    stage: str = STAGE_SHARE_KEYS

    def __post_init__(self) -> None:
        for name in ("run_id", "server_round", "sender", "receiver"):
            value = getattr(self, name)
            if not 0 <= value < _U64:
                raise ValueError(f"{name} must be an unsigned 64-bit integer, got {value}")
        if not self.stage or not self.stage.isascii() or len(self.stage) > 64:
            raise ValueError(f"stage must be 1..64 ASCII characters, got {self.stage!r}")

    def encode(self) -> bytes:
        """Canonical encoding: tag, four big-endian u64 ids, length-prefixed stage."""
        stage = self.stage.encode("ascii")
        ids = struct.pack(">QQQQ", self.run_id, self.server_round, self.sender, self.receiver)
        return _HEADER_TAG + ids + struct.pack(">B", len(stage)) + stage

    def describe(self) -> str:
        """Human-readable context for error messages."""
        return (
            f"share from node {self.sender} to node {self.receiver} "
            f"(run {self.run_id}, round {self.server_round}, stage {self.stage!r})"
        )


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"share key must be {KEY_BYTES} bytes, got {len(key)}")


def encrypt_share(key: bytes, plaintext: bytes, header: ShareHeader) -> bytes:
    """Encrypt ``plaintext`` for ``header.receiver``: ``nonce (12 B) || ciphertext || tag``.

    ChaCha20-Poly1305 with a fresh random 96-bit nonce from ``os.urandom`` per message, so
    no nonce is ever deliberately reused. Bound: q messages under one key collide with
    probability <= q^2 / 2^97; a share key encrypts two messages per round (one each way),
    far below the 2^32 messages per key that keeps this under 2^-33.
    """
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, header.encode())


def decrypt_share(key: bytes, blob: bytes, header: ShareHeader) -> bytes:
    """Decrypt a blob from :func:`encrypt_share`; ``ShareError`` if it was tampered with,
    made under another key, or made for another run, round, stage, sender or receiver."""
    _check_key(key)
    if len(blob) < NONCE_BYTES + _TAG_BYTES:
        raise ShareError(f"{header.describe()}: ciphertext too short ({len(blob)} bytes)")
    nonce, body = blob[:NONCE_BYTES], blob[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, header.encode())
    except InvalidTag:
        raise ShareError(
            f"{header.describe()} failed authentication: wrong key, tampered ciphertext, "
            "or a ciphertext replayed from another run, round, stage or pair"
        ) from None


@dataclass(frozen=True)
class SharePayload:
    """What one site sends another: its shares of its self-mask seed and private key.

    Both shares carry the receiver's index. Canonical encoding (85 bytes, big-endian):
    version (1 B, = 1) | sender (u64) | receiver (u64) | seed index (u16) | seed share
    (32 B) | key index (u16) | key share (32 B).
    """

    sender: int
    receiver: int
    seed_share: Share
    key_share: Share

    def __post_init__(self) -> None:
        for name in ("sender", "receiver"):
            if not 0 <= getattr(self, name) < _U64:
                raise ValueError(f"{name} must be an unsigned 64-bit integer")
        if self.seed_share.index != self.key_share.index:
            raise ValueError(
                f"seed and key shares must have the same index, got "
                f"{self.seed_share.index} and {self.key_share.index}"
            )

    def encode(self) -> bytes:
        """The canonical byte encoding (see the class docstring)."""
        return _PLAINTEXT.pack(
            _PLAINTEXT_VERSION,
            self.sender,
            self.receiver,
            self.seed_share.index,
            self.seed_share.value,
            self.key_share.index,
            self.key_share.value,
        )

    @classmethod
    def decode(cls, data: bytes) -> SharePayload:
        """Parse :meth:`encode`'s output; ``ValueError`` if it is malformed."""
        if len(data) != _PLAINTEXT.size:
            raise ValueError(f"share payload must be {_PLAINTEXT.size} bytes, got {len(data)}")
        version, sender, receiver, i_seed, seed, i_key, key = _PLAINTEXT.unpack(data)
        if version != _PLAINTEXT_VERSION:
            raise ValueError(f"unknown share payload version {version}")
        return cls(sender, receiver, Share(i_seed, seed), Share(i_key, key))


def seal_payload(key: bytes, payload: SharePayload, header: ShareHeader) -> bytes:
    """Encode and encrypt ``payload``; its sender/receiver must match the header's."""
    if (payload.sender, payload.receiver) != (header.sender, header.receiver):
        raise ValueError(f"payload sender/receiver do not match the {header.describe()}")
    return encrypt_share(key, payload.encode(), header)


def open_payload(key: bytes, blob: bytes, header: ShareHeader) -> SharePayload:
    """Decrypt and parse a sealed payload, checking that the sender/receiver inside
    match the header (as in Bell et al.); ``ShareError`` on any failure."""
    plaintext = decrypt_share(key, blob, header)
    try:
        payload = SharePayload.decode(plaintext)
    except ValueError as exc:
        raise ShareError(f"{header.describe()}: malformed payload: {exc}") from None
    if (payload.sender, payload.receiver) != (header.sender, header.receiver):
        raise ShareError(
            f"{header.describe()}: payload names sender {payload.sender} and "
            f"receiver {payload.receiver}"
        )
    return payload
