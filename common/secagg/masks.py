"""Masks for secure aggregation, expanded from full-strength keys by a stream cipher.

Threat model: the server is honest but curious and sees every masked vector. A site's update is
hidden by a *self mask* (from a fresh 32-byte seed) plus one *pairwise mask* per neighbour (from
an X25519 shared secret). Pairwise masks cancel in the sum; self masks are removed by the server
only for sites that survive, once it has reconstructed their seeds from secret shares.

Unlike Flower's SecAgg+ (which folds the shared secret to a 32-bit seed for numpy's
``RandomState``), every mask here comes from a 256-bit key through HKDF-SHA256 and ChaCha20:

* **Key derivation.** ``derive_key`` runs X25519 and feeds the shared secret to HKDF-SHA256 with
  ``info`` = the canonical encoding of a :class:`MaskContext` (run id, round, purpose, ordered
  pair of node ids) followed by both public keys in lexicographic byte order. Both ends of a pair
  therefore derive the same key, and a key from one run, round, purpose or pair is useless in any
  other.
* **Expansion.** ``expand_mask`` uses the key as a ChaCha20 key with a fixed all-zero nonce and
  counter. That is safe only because of this invariant: **each derived key expands exactly one
  mask** (one vector, one round, one purpose). The context in ``info`` makes keys unique per
  round and pair, and the workflow must never mask two different vectors under one context.
* **Ring.** Masks live in Z_m with m = 2**k. The keystream is read as little-endian words, 4
  bytes each for k <= 32 and 8 bytes above, and masked to the low k bits: every k-bit value is
  equally likely, so there is no modulo bias. Masks are summed in numpy uint32 (k <= 32) or
  uint64 words, which wrap mod 2**32 or 2**64 and hence are exact mod 2**k after masking; the
  public functions take and return uint64 arrays.

Default modulus: 2**32 (``DEFAULT_MODULUS_BITS``). A masked coordinate then fits in 4 bytes, the
same as a float32 parameter, so the masked upload stays within ~1x the plain one; the fixed-point
capacity at 32 bits (see ``quantize``) still gives a quantisation error of about
``n * (1 + c) * max(c, 1) / 2**31`` on the weighted average of n sites with clip c (3e-8 for 30
sites, c = 1), below float32 resolution. Larger rings (up to 2**62) are accepted.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

DEFAULT_MODULUS_BITS = 32
MAX_MODULUS_BITS = 62
KEY_BYTES = 32
PURPOSES = ("pairwise-mask", "self-mask", "share-key")
_DOMAIN = b"medfed/secagg/v1"
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class MaskContext:
    """What a derived key is for; its canonical encoding is the HKDF ``info``.

    ``low_id`` < ``high_id`` for the pair purposes ("pairwise-mask", "share-key"): the pair is
    ordered by node id so both ends build the same context (use :meth:`for_pair`). For
    "self-mask" the key belongs to one site and ``low_id == high_id`` is that site's id.
    """

    run_id: str
    round: int
    purpose: str
    low_id: int
    high_id: int

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("MaskContext.run_id must be non-empty")
        if self.purpose not in PURPOSES:
            raise ValueError(f"unknown purpose {self.purpose!r}; expected one of {PURPOSES}")
        for name in ("round", "low_id", "high_id"):
            value = getattr(self, name)
            if not 0 <= value <= _U64_MAX:
                raise ValueError(f"MaskContext.{name}={value} is not an unsigned 64-bit integer")
        if self.purpose == "self-mask" and self.low_id != self.high_id:
            raise ValueError("a self-mask context names one node: low_id must equal high_id")
        if self.purpose != "self-mask" and not self.low_id < self.high_id:
            raise ValueError(
                f"pair context needs low_id < high_id, got {self.low_id}, {self.high_id}"
            )

    @classmethod
    def for_pair(cls, run_id: str, round: int, purpose: str, a: int, b: int) -> MaskContext:
        """Context for the unordered pair {a, b}; identical at both ends."""
        return cls(run_id, round, purpose, min(a, b), max(a, b))

    @classmethod
    def for_self(cls, run_id: str, round: int, node_id: int) -> MaskContext:
        """Context for one site's self mask."""
        return cls(run_id, round, "self-mask", node_id, node_id)

    def encode(self) -> bytes:
        """Prefix-free byte encoding: domain, then length-prefixed strings and uint64 fields."""
        run = self.run_id.encode("utf-8")
        purpose = self.purpose.encode("ascii")
        return b"".join(
            (
                _DOMAIN,
                struct.pack(">I", len(run)),
                run,
                struct.pack(">Q", self.round),
                struct.pack(">I", len(purpose)),
                purpose,
                struct.pack(">QQ", self.low_id, self.high_id),
            )
        )


def generate_keypair() -> X25519PrivateKey:
    """A fresh X25519 key pair (the private key object; its public half is ``public_bytes``)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32-byte raw public key, as relayed (signed) through the server."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The 32-byte raw private key, for secret sharing it (dropout recovery)."""
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def load_private(raw: bytes) -> X25519PrivateKey:
    """Inverse of :func:`private_bytes` (the server uses it on a reconstructed key)."""
    return X25519PrivateKey.from_private_bytes(raw)


def new_seed() -> bytes:
    """A fresh 32-byte self-mask seed from the OS CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def derive_key(private: X25519PrivateKey, peer_public_bytes: bytes, context: MaskContext) -> bytes:
    """The 32-byte key shared with the holder of ``peer_public_bytes``, bound to ``context``.

    Raises ``ValueError`` for a malformed or low-order peer key (all-zero shared secret), so a
    server relaying a degenerate key cannot force a predictable mask.
    """
    if context.purpose == "self-mask":
        raise ValueError("self-mask keys come from a seed (self_mask_key), not key agreement")
    if len(peer_public_bytes) != KEY_BYTES:
        raise ValueError(f"X25519 public key must be {KEY_BYTES} bytes")
    mine = public_bytes(private)
    if mine == peer_public_bytes:
        raise ValueError("peer public key equals our own: refusing to derive a self-pair key")
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public_bytes))
    keys = b"".join(sorted((mine, peer_public_bytes)))
    return _hkdf(shared, context.encode() + keys)


def self_mask_key(seed: bytes, context: MaskContext) -> bytes:
    """The key that expands a site's self mask: HKDF of the seed, bound to run/round/site."""
    if len(seed) != KEY_BYTES:
        raise ValueError(f"self-mask seed must be {KEY_BYTES} bytes")
    if context.purpose != "self-mask":
        raise ValueError("self_mask_key needs a 'self-mask' context")
    return _hkdf(seed, context.encode())


def _check_bits(modulus_bits: int) -> int:
    if not 1 <= modulus_bits <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be in [1, {MAX_MODULUS_BITS}], got {modulus_bits}")
    return modulus_bits


def ring_mask(modulus_bits: int) -> np.uint64:
    """The bit mask 2**k - 1 that reduces a uint64 modulo 2**k."""
    return np.uint64((1 << _check_bits(modulus_bits)) - 1)


def keystream(key: bytes, nbytes: int) -> bytes:
    """ChaCha20 keystream (zero nonce, counter 0). Each key must be used for one stream only."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"mask key must be {KEY_BYTES} bytes")
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


def _word_dtype(modulus_bits: int) -> np.dtype:
    """Words the keystream is read as, and masks are summed in: uint32 up to k = 32."""
    return np.dtype("<u4") if _check_bits(modulus_bits) <= 32 else np.dtype("<u8")


def _stream_words(key: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """The keystream as ``length`` words of :func:`_word_dtype`, not yet reduced mod 2**k."""
    if length < 0:
        raise ValueError("mask length must be non-negative")
    dtype = _word_dtype(modulus_bits)
    return np.frombuffer(keystream(key, dtype.itemsize * length), dtype=dtype)


def expand_mask(key: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_{2**k} (uint64) from the keystream of ``key``.

    Word i is keystream bytes [4i, 4i+4) for k <= 32, [8i, 8i+8) above, read little-endian and
    masked to the low k bits. A shorter expansion is a prefix of a longer one under the same key.
    """
    words = _stream_words(key, length, modulus_bits)
    return words.astype(np.uint64) & ring_mask(modulus_bits)


class _Accumulator:
    """An in-place sum mod 2**k in machine words (uint32 wraps for free when k <= 32)."""

    def __init__(self, start: np.ndarray, modulus_bits: int) -> None:
        self.bits = modulus_bits
        self.total = np.asarray(start, np.uint64).astype(_word_dtype(modulus_bits))

    def add(self, words: np.ndarray) -> None:
        np.add(self.total, words, out=self.total, casting="unsafe")

    def sub(self, words: np.ndarray) -> None:
        np.subtract(self.total, words, out=self.total, casting="unsafe")

    def result(self) -> np.ndarray:
        return self.total.astype(np.uint64) & ring_mask(self.bits)


def sum_mod(vectors: list[np.ndarray], modulus_bits: int) -> np.ndarray:
    """Sum of equally long uint64 vectors mod 2**k (what the server computes)."""
    if not vectors:
        raise ValueError("sum_mod needs at least one vector")
    acc = _Accumulator(np.zeros_like(np.asarray(vectors[0], np.uint64)), modulus_bits)
    for vector in vectors:
        acc.add(np.asarray(vector, np.uint64).astype(acc.total.dtype))
    return acc.result()


def pairwise_mask(
    key: bytes, my_id: int, peer_id: int, length: int, modulus_bits: int
) -> np.ndarray:
    """This site's signed share of the pair mask: +mask if ``my_id < peer_id``, else -mask.

    The two ends of a pair add opposite signs of the same expansion, so the pair cancels in the
    sum mod 2**k.
    """
    acc = _Accumulator(np.zeros(length, np.uint64), modulus_bits)
    _add_pair(acc, key, my_id, peer_id, length)
    return acc.result()


def self_mask(
    seed: bytes, *, run_id: str, round: int, node_id: int, length: int, modulus_bits: int
) -> np.ndarray:
    """A site's self mask for one round, expanded from its seed."""
    key = self_mask_key(seed, MaskContext.for_self(run_id, round, node_id))
    return expand_mask(key, length, modulus_bits)


def apply_masks(
    vector: np.ndarray,
    self_seed: bytes,
    pairwise_keys: Mapping[int, bytes],
    my_id: int,
    modulus_bits: int,
    *,
    run_id: str,
    round: int,
) -> np.ndarray:
    """Mask a quantised uint64 vector: ``vector + self_mask + sum_j ±pair_mask_j`` mod 2**k.

    ``pairwise_keys`` maps each neighbour's node id to the key from :func:`derive_key` under the
    "pairwise-mask" context of this run and round.
    """
    x = np.asarray(vector, np.uint64)
    if x.ndim != 1:
        raise ValueError("apply_masks expects a flat vector")
    if np.any(x > ring_mask(modulus_bits)):
        raise ValueError(f"vector has elements outside Z_2**{modulus_bits}")
    n = x.shape[0]
    acc = _Accumulator(x, modulus_bits)
    acc.add(
        _stream_words(
            self_mask_key(self_seed, MaskContext.for_self(run_id, round, my_id)), n, modulus_bits
        )
    )
    for peer_id, key in pairwise_keys.items():
        _add_pair(acc, key, my_id, peer_id, n)
    return acc.result()


def _add_pair(
    acc: _Accumulator, key: bytes, my_id: int, peer_id: int, length: int, remove: bool = False
) -> None:
    """Add this site's signed share of a pair mask (see :func:`pairwise_mask`), or with
    ``remove`` take it away again (the server, for a pair whose other end dropped)."""
    if my_id == peer_id:
        raise ValueError("a node has no pairwise mask with itself")
    words = _stream_words(key, length, acc.bits)
    if (my_id < peer_id) != remove:
        acc.add(words)
    else:
        acc.sub(words)


def unmask_sum(
    masked_sum: np.ndarray,
    *,
    self_seeds: Mapping[int, bytes],
    dangling: Mapping[tuple[int, int], bytes],
    run_id: str,
    round: int,
    modulus_bits: int,
) -> np.ndarray:
    """Server side: remove survivors' self masks and pair masks left by dropped sites.

    ``self_seeds`` maps each survivor to its reconstructed seed. ``dangling`` maps
    ``(survivor_id, dropped_id)`` to the pair key the server recomputed from the dropped site's
    reconstructed private key; the survivor's share of that pair mask did not cancel.
    """
    acc = _Accumulator(masked_sum, modulus_bits)
    n = acc.total.shape[0]
    for node_id, seed in self_seeds.items():
        key = self_mask_key(seed, MaskContext.for_self(run_id, round, node_id))
        acc.sub(_stream_words(key, n, modulus_bits))
    for (survivor, dropped), key in dangling.items():
        _add_pair(acc, key, survivor, dropped, n, remove=True)
    return acc.result()
