"""Mask expansion and key derivation: known answers, context binding, cancellation, uniformity."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from scipy import stats

from medfed.common.secagg import masks
from medfed.common.secagg.masks import MaskContext

KEY = bytes(range(32))
RUN = "run-kat"


def _raw_keystream(key: bytes, nbytes: int) -> bytes:
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return encryptor.update(bytes(nbytes))


def _fixed_private(byte: int):
    return masks.load_private(bytes([byte]) * 32)


# --- known answers -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 8, 32, 48, 62])
def test_expand_mask_matches_raw_keystream_words(bits: int) -> None:
    width = 4 if bits <= 32 else 8  # bytes per word
    stream = _raw_keystream(KEY, width * 16)
    expected = [
        int.from_bytes(stream[width * i : width * (i + 1)], "little") & ((1 << bits) - 1)
        for i in range(16)
    ]
    got = masks.expand_mask(KEY, 16, bits)
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == expected


def test_expand_mask_rfc8439_zero_key_vector() -> None:
    # RFC 8439 A.1 test vector #1: all-zero key, nonce and counter; keystream starts
    # 76 b8 e0 ad a0 f1 3d 90 | 40 5d 6a e5 53 86 bd 28.
    words = masks.expand_mask(bytes(32), 2, 62)
    assert int(words[0]) == 0x903DF1A0ADE0B876 & (2**62 - 1)
    assert int(words[1]) == 0x28BD8653E56A5D40
    # Up to 32 bits, each word is 4 keystream bytes.
    assert [int(v) for v in masks.expand_mask(bytes(32), 4, 32)] == [
        0xADE0B876,
        0x903DF1A0,
        0xE56A5D40,
        0x28BD8653,
    ]


def test_expand_mask_pinned_values() -> None:
    assert [int(v) for v in masks.expand_mask(KEY, 4, 32)] == [
        2100034873,
        1780073945,
        1996733837,
        1229642936,
    ]
    assert [int(v) for v in masks.expand_mask(KEY, 2, 48)] == [217537898609977, 242684828827021]


def test_context_encoding_is_pinned() -> None:
    ctx = MaskContext.for_pair(RUN, 3, "pairwise-mask", 42, 7)
    assert ctx.encode() == (
        b"medfed/secagg/v1"
        + b"\x00\x00\x00\x07run-kat"
        + (3).to_bytes(8, "big")
        + b"\x00\x00\x00\x0dpairwise-mask"
        + (7).to_bytes(8, "big")
        + (42).to_bytes(8, "big")
    )


def test_derive_key_known_answer() -> None:
    a, b = _fixed_private(1), _fixed_private(2)
    ctx = MaskContext.for_pair(RUN, 3, "pairwise-mask", 7, 42)
    pa, pb = masks.public_bytes(a), masks.public_bytes(b)
    shared = a.exchange(b.public_key())
    info = ctx.encode() + b"".join(sorted((pa, pb)))
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    key = masks.derive_key(a, pb, ctx)
    assert key == expected
    assert key.hex() == "fcb8e3608dc45141c9c8ebad00bf6a6a831fb45ff7d32a8def37a65d84790b34"


def test_self_mask_key_known_answer() -> None:
    key = masks.self_mask_key(bytes([9]) * 32, MaskContext.for_self(RUN, 3, 7))
    assert key.hex() == "ac2ae00c0de14e23ca4f1ab638f4dec003d61f360bab333203176fa6f38b5058"


# --- expansion properties ------------------------------------------------------------------


def test_expand_mask_prefix_range_and_key_sensitivity() -> None:
    long = masks.expand_mask(KEY, 1000, 20)
    assert np.array_equal(masks.expand_mask(KEY, 10, 20), long[:10])
    assert int(long.max()) < 2**20
    other = masks.expand_mask(bytes(31) + b"\x01", 1000, 20)
    assert np.count_nonzero(long == other) < 5
    assert masks.expand_mask(KEY, 0, 32).shape == (0,)


@pytest.mark.parametrize("bits", [0, 63, 64])
def test_expand_mask_rejects_bad_modulus(bits: int) -> None:
    with pytest.raises(ValueError, match="modulus_bits"):
        masks.expand_mask(KEY, 4, bits)


def test_expand_mask_rejects_short_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        masks.expand_mask(KEY[:16], 4, 32)


# --- key derivation ------------------------------------------------------------------------


def test_both_ends_derive_the_same_key() -> None:
    a, b = masks.generate_keypair(), masks.generate_keypair()
    ctx_a = MaskContext.for_pair("run", 1, "pairwise-mask", 5, 9)
    ctx_b = MaskContext.for_pair("run", 1, "pairwise-mask", 9, 5)
    assert ctx_a == ctx_b
    key_a = masks.derive_key(a, masks.public_bytes(b), ctx_a)
    key_b = masks.derive_key(b, masks.public_bytes(a), ctx_b)
    assert key_a == key_b and len(key_a) == 32


@pytest.mark.parametrize(
    "other",
    [
        MaskContext("run-2", 1, "pairwise-mask", 5, 9),
        MaskContext("run", 2, "pairwise-mask", 5, 9),
        MaskContext("run", 1, "share-key", 5, 9),
        MaskContext("run", 1, "pairwise-mask", 5, 10),
        MaskContext("run", 1, "pairwise-mask", 4, 9),
    ],
)
def test_key_depends_on_every_context_field(other: MaskContext) -> None:
    a, b = _fixed_private(1), _fixed_private(2)
    base = MaskContext("run", 1, "pairwise-mask", 5, 9)
    pb = masks.public_bytes(b)
    assert masks.derive_key(a, pb, base) != masks.derive_key(a, pb, other)


def test_key_depends_on_the_peer() -> None:
    a, b, c = _fixed_private(1), _fixed_private(2), _fixed_private(3)
    ctx = MaskContext("run", 1, "pairwise-mask", 5, 9)
    assert masks.derive_key(a, masks.public_bytes(b), ctx) != masks.derive_key(
        a, masks.public_bytes(c), ctx
    )


def test_self_mask_key_depends_on_round_and_node() -> None:
    seed = bytes([9]) * 32
    base = masks.self_mask_key(seed, MaskContext.for_self("run", 1, 5))
    assert base != masks.self_mask_key(seed, MaskContext.for_self("run", 2, 5))
    assert base != masks.self_mask_key(seed, MaskContext.for_self("run", 1, 6))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("", 1, "pairwise-mask", 1, 2), "run_id"),
        (("r", 1, "mask", 1, 2), "purpose"),
        (("r", -1, "pairwise-mask", 1, 2), "round"),
        (("r", 1, "pairwise-mask", 2, 2), "low_id < high_id"),
        (("r", 1, "pairwise-mask", 3, 2), "low_id < high_id"),
        (("r", 1, "self-mask", 1, 2), "low_id must equal"),
        (("r", 1, "pairwise-mask", 1, 2**64), "high_id"),
    ],
)
def test_context_validation(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MaskContext(*args)


def test_derive_key_rejects_degenerate_peer_keys() -> None:
    a = _fixed_private(1)
    ctx = MaskContext("run", 1, "pairwise-mask", 1, 2)
    with pytest.raises(ValueError):
        masks.derive_key(a, bytes(32), ctx)  # low-order point: all-zero shared secret
    with pytest.raises(ValueError, match="our own"):
        masks.derive_key(a, masks.public_bytes(a), ctx)
    with pytest.raises(ValueError, match="32 bytes"):
        masks.derive_key(a, bytes(31), ctx)
    with pytest.raises(ValueError, match="seed"):
        masks.derive_key(a, masks.public_bytes(_fixed_private(2)), MaskContext.for_self("r", 1, 1))


def test_private_key_round_trip() -> None:
    a = masks.generate_keypair()
    assert masks.public_bytes(masks.load_private(masks.private_bytes(a))) == masks.public_bytes(a)


# --- masking -------------------------------------------------------------------------------


def _pair_keys(ids: list[int], run: str, rnd: int) -> dict[int, dict[int, bytes]]:
    privs = {i: _fixed_private(i) for i in ids}
    keys: dict[int, dict[int, bytes]] = {i: {} for i in ids}
    for i in ids:
        for j in ids:
            if i != j:
                ctx = MaskContext.for_pair(run, rnd, "pairwise-mask", i, j)
                keys[i][j] = masks.derive_key(privs[i], masks.public_bytes(privs[j]), ctx)
    return keys


def test_pairwise_masks_cancel_in_the_sum() -> None:
    ids, bits, n = [3, 11, 12, 40], 32, 257
    keys = _pair_keys(ids, "run", 4)
    parts = [masks.pairwise_mask(keys[i][j], i, j, n, bits) for i in ids for j in ids if i != j]
    assert not np.any(masks.sum_mod(parts, bits))


@pytest.mark.parametrize("bits", [16, 32, 62])
def test_masked_sum_unmasks_to_plain_sum(bits: int) -> None:
    ids, n, run, rnd = [2, 5, 9], 100, "run", 7
    keys = _pair_keys(ids, run, rnd)
    seeds = {i: bytes([i]) * 32 for i in ids}
    plain = {i: masks.expand_mask(bytes([100 + i]) * 32, n, bits) for i in ids}
    masked = [
        masks.apply_masks(plain[i], seeds[i], keys[i], i, bits, run_id=run, round=rnd) for i in ids
    ]
    total = masks.unmask_sum(
        masks.sum_mod(masked, bits),
        self_seeds=seeds,
        dangling={},
        run_id=run,
        round=rnd,
        modulus_bits=bits,
    )
    assert np.array_equal(total, masks.sum_mod(list(plain.values()), bits))


def test_dropped_site_pair_masks_are_recovered() -> None:
    ids, bits, n, run, rnd = [1, 4, 6, 8], 32, 50, "run", 2
    keys = _pair_keys(ids, run, rnd)
    seeds = {i: masks.new_seed() for i in ids}
    plain = {i: np.full(n, i, np.uint64) for i in ids}
    survivors, dropped = [1, 6, 8], 4  # 4 sent keys, then dropped before its masked input
    masked = [
        masks.apply_masks(plain[i], seeds[i], keys[i], i, bits, run_id=run, round=rnd)
        for i in survivors
    ]
    sk_dropped = _fixed_private(dropped)  # as reconstructed from its shares
    dangling = {
        (i, dropped): masks.derive_key(
            sk_dropped,
            masks.public_bytes(_fixed_private(i)),
            MaskContext.for_pair(run, rnd, "pairwise-mask", i, dropped),
        )
        for i in survivors
    }
    total = masks.unmask_sum(
        masks.sum_mod(masked, bits),
        self_seeds={i: seeds[i] for i in survivors},
        dangling=dangling,
        run_id=run,
        round=rnd,
        modulus_bits=bits,
    )
    assert np.array_equal(total, np.full(n, 1 + 6 + 8, np.uint64))


def test_apply_masks_rejects_out_of_ring_vector() -> None:
    with pytest.raises(ValueError, match="outside"):
        masks.apply_masks(np.array([2**16], np.uint64), bytes(32), {}, 1, 16, run_id="r", round=0)


@pytest.mark.parametrize("bits", [32, 48])
def test_single_masked_vector_is_uniform(bits: int) -> None:
    """A masked vector of a highly structured input: top 8 bits over 256 buckets, chi-square."""
    n, run, rnd = 1 << 16, "run-uniform", 1
    keys = _pair_keys([1, 2, 3], run, rnd)
    plain = np.zeros(n, np.uint64)  # worst case: a constant input
    masked = masks.apply_masks(plain, bytes([7]) * 32, keys[2], 2, bits, run_id=run, round=rnd)
    buckets = np.bincount((masked >> np.uint64(bits - 8)).astype(np.int64), minlength=256)
    assert buckets.shape == (256,)
    assert stats.chisquare(buckets).pvalue > 1e-4
    low = np.bincount((masked & np.uint64(0xFF)).astype(np.int64), minlength=256)
    assert stats.chisquare(low).pvalue > 1e-4


def _generator_uses(source: str) -> list[str]:
    """Imports of ``random`` and any use of numpy's generators, found in the code (not prose)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "random"]
            found += [a.name for a in node.names if a.name.startswith("numpy.random")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] == "random" or node.module.startswith("numpy.random"):
                found.append(node.module)
            found += [a.name for a in node.names if a.name == "random"]
        elif isinstance(node, ast.Attribute) and node.attr in {"random", "RandomState"}:
            found.append(node.attr)
        elif isinstance(node, ast.Name) and node.id in {"random", "RandomState", "default_rng"}:
            found.append(node.id)
    return found


def test_no_non_cryptographic_generator_in_secagg_sources() -> None:
    root = Path(masks.__file__).parent
    for name in ("masks.py", "quantize.py"):
        source = (root / name).read_text()
        assert _generator_uses(source) == [], name
        assert not re.search(r"^\s*(import|from)\s+random\b", source, re.M), name
        assert not re.search(r"\b(np|numpy)\.random\b", source), name


def test_generator_check_catches_offenders() -> None:
    assert _generator_uses("import random") == ["random"]
    assert _generator_uses("import numpy as np\nx = np.random.rand(3)") == ["random"]
    assert _generator_uses("from numpy.random import default_rng") == ["numpy.random"]
