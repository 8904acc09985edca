"""Shamir shares of 32-byte secrets and their AEAD transport between sites."""

from __future__ import annotations

import dataclasses
import os

import pytest
from Crypto.Protocol import SecretSharing
from Crypto.Protocol.SecretSharing import Shamir
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.common.secagg.shares import (
    NONCE_BYTES,
    STAGE_SHARE_KEYS,
    Share,
    ShareError,
    ShareHeader,
    SharePayload,
    combine_shares,
    decrypt_share,
    encrypt_share,
    open_payload,
    seal_payload,
    split_secret,
)

SECRETS = st.binary(min_size=32, max_size=32)


@st.composite
def sharing(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """(t, n, a subset of at least t share positions)."""
    n = draw(st.integers(1, 7))
    t = draw(st.integers(1, n))
    k = draw(st.integers(t, n))
    chosen = draw(st.permutations(range(n)))[:k]
    return t, n, chosen


@settings(max_examples=60, deadline=None)
@given(secret=SECRETS, params=sharing())
def test_split_combine_round_trip(secret: bytes, params: tuple[int, int, list[int]]) -> None:
    t, n, chosen = params
    shares = split_secret(secret, t, n)
    assert [s.index for s in shares] == list(range(1, n + 1))
    assert combine_shares([shares[i] for i in chosen], t) == secret


@settings(max_examples=30, deadline=None)
@given(secret=SECRETS, n=st.integers(2, 7), data=st.data())
def test_fewer_than_t_shares_give_a_wrong_secret(secret: bytes, n: int, data) -> None:
    """Shamir raises nothing with t - 1 shares: it silently interpolates a wrong secret.
    Our combine_shares therefore refuses fewer than t shares itself."""
    t = data.draw(st.integers(2, n))
    shares = split_secret(secret, t, n)
    few = shares[: t - 1]
    halves = [Shamir.combine([(s.index, s.value[lo : lo + 16]) for s in few]) for lo in (0, 16)]
    assert halves[0] != secret[:16] and halves[1] != secret[16:]
    with pytest.raises(ValueError, match=f"at least {t} shares"):
        combine_shares(few, t)


def test_shamir_randomness_is_the_os_csprng() -> None:
    """pycryptodome draws the polynomial coefficients from Crypto.Random, i.e. os.urandom."""
    assert SecretSharing.rng is os.urandom
    secret = os.urandom(32)
    assert split_secret(secret, 2, 3) != split_secret(secret, 2, 3)


def test_threshold_one_shares_are_the_secret() -> None:
    secret = os.urandom(32)
    assert {s.value for s in split_secret(secret, 1, 3)} == {secret}


@pytest.mark.parametrize(
    ("secret", "t", "n", "match"),
    [
        (b"x" * 31, 2, 3, "32 bytes"),
        (b"x" * 16, 1, 1, "32 bytes"),
        (b"x" * 32, 0, 3, "1 <= t <= n"),
        (b"x" * 32, 4, 3, "1 <= t <= n"),
        (b"x" * 32, 1, 0, "number of shares"),
    ],
)
def test_split_validation(secret: bytes, t: int, n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_secret(secret, t, n)


def test_combine_rejects_duplicates_and_bad_threshold() -> None:
    shares = split_secret(os.urandom(32), 2, 3)
    with pytest.raises(ValueError, match="duplicate"):
        combine_shares([shares[0], shares[0]], 2)
    with pytest.raises(ValueError, match="threshold"):
        combine_shares(shares, 0)


def test_share_validation() -> None:
    with pytest.raises(ValueError, match="index"):
        Share(0, bytes(32))  # x = 0 would be the secret itself
    with pytest.raises(ValueError, match="32 bytes"):
        Share(1, bytes(16))


# --- AEAD transport -------------------------------------------------------------------

KEY = bytes(range(32))
HEADER = ShareHeader(run_id=11, server_round=3, sender=101, receiver=202)


def test_aead_round_trip() -> None:
    blob = encrypt_share(KEY, b"hello shares", HEADER)
    assert decrypt_share(KEY, blob, HEADER) == b"hello shares"
    assert HEADER.stage == STAGE_SHARE_KEYS


def test_nonces_differ_for_the_same_plaintext() -> None:
    a, b = (encrypt_share(KEY, b"same", HEADER) for _ in range(2))
    assert a[:NONCE_BYTES] != b[:NONCE_BYTES]
    assert a != b


def test_tampered_ciphertext_is_rejected() -> None:
    blob = bytearray(encrypt_share(KEY, b"secret share", HEADER))
    for position in (0, NONCE_BYTES, len(blob) - 1):  # nonce, body, tag
        tampered = bytearray(blob)
        tampered[position] ^= 1
        with pytest.raises(ShareError, match=r"node 101 to node 202.*round 3"):
            decrypt_share(KEY, bytes(tampered), HEADER)
    with pytest.raises(ShareError, match="too short"):
        decrypt_share(KEY, bytes(blob[:20]), HEADER)


def test_wrong_key_is_rejected() -> None:
    blob = encrypt_share(KEY, b"secret share", HEADER)
    with pytest.raises(ShareError, match="failed authentication"):
        decrypt_share(bytes(32), blob, HEADER)


@pytest.mark.parametrize(
    "other",
    [
        dataclasses.replace(HEADER, server_round=2),
        dataclasses.replace(HEADER, run_id=12),
        dataclasses.replace(HEADER, sender=202, receiver=101),
        dataclasses.replace(HEADER, receiver=303),
        dataclasses.replace(HEADER, stage="unmask"),
    ],
    ids=["earlier-round", "other-run", "swapped-pair", "other-receiver", "other-stage"],
)
def test_replay_under_another_header_is_rejected(other: ShareHeader) -> None:
    blob = encrypt_share(KEY, b"secret share", HEADER)
    with pytest.raises(ShareError, match=f"node {other.sender} to node {other.receiver}"):
        decrypt_share(KEY, blob, other)


def test_key_and_header_validation() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt_share(bytes(16), b"x", HEADER)
    with pytest.raises(ValueError, match="64-bit"):
        ShareHeader(run_id=-1, server_round=0, sender=1, receiver=2)
    with pytest.raises(ValueError, match="stage"):
        ShareHeader(run_id=1, server_round=0, sender=1, receiver=2, stage="")


def _payload(sender: int = 101, receiver: int = 202) -> SharePayload:
    seed_shares = split_secret(os.urandom(32), 2, 3)
    key_shares = split_secret(os.urandom(32), 2, 3)
    return SharePayload(sender, receiver, seed_shares[1], key_shares[1])


def test_payload_encoding_round_trip() -> None:
    payload = _payload()
    encoded = payload.encode()
    assert len(encoded) == 85 and encoded[0] == 1
    assert SharePayload.decode(encoded) == payload
    with pytest.raises(ValueError, match="85 bytes"):
        SharePayload.decode(encoded[:-1])
    with pytest.raises(ValueError, match="version"):
        SharePayload.decode(b"\x02" + encoded[1:])


def test_payload_shares_must_share_an_index() -> None:
    seed, key = split_secret(os.urandom(32), 2, 3), split_secret(os.urandom(32), 2, 3)
    with pytest.raises(ValueError, match="same index"):
        SharePayload(1, 2, seed[0], key[1])


def test_sealed_payload_round_trip_and_checks() -> None:
    payload = _payload()
    blob = seal_payload(KEY, payload, HEADER)
    assert open_payload(KEY, blob, HEADER) == payload
    with pytest.raises(ValueError, match="do not match"):
        seal_payload(KEY, _payload(sender=999), HEADER)
    # A correctly encrypted payload whose inner ids contradict the header is refused.
    inner_liar = encrypt_share(KEY, _payload(sender=999).encode(), HEADER)
    with pytest.raises(ShareError, match="payload names sender 999"):
        open_payload(KEY, inner_liar, HEADER)
    garbage = encrypt_share(KEY, b"not a payload", HEADER)
    with pytest.raises(ShareError, match="malformed payload"):
        open_payload(KEY, garbage, HEADER)
