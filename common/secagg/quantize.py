"""Fixed-point encoding of weighted updates into Z_{2**k}, so that masked sums are exact.

A site with weight w (its sample count, 0 <= w <= ``max_weight``) and update u sends

    q = round_s([w * clip(u)_1, ..., w * clip(u)_d, w] * scale)  in Z_{2**k},

where ``clip`` clamps each coordinate to [-clip, clip] (values outside are clipped, not
rejected: this is the same per-coordinate bound the capacity check relies on; NaN or infinite
values are rejected) and ``round_s`` is stochastic rounding (floor(x) + 1 with probability
frac(x)), which is unbiased. Its random bits come from a ChaCha20 keystream under a fresh
``secrets`` key (never numpy's generator), so a curious server cannot predict the rounding and
learn the low-order bits of an update from the aggregate.

Representation: centred. A signed integer q in [-2**(k-1), 2**(k-1)) is stored as q mod 2**k
(two's complement in k bits); a decoded sum s >= 2**(k-1) means s - 2**k.

Capacity: ``check_capacity`` guarantees, before anything is encoded or sent, that the sum over
``num_sites`` sites of the largest possible |q| (``max_weight * max(clip, 1) * scale``, rounded
up) is at most 2**(k-1) - 1, so the true integer sum never wraps and the centred decoding is
exact. ``choose_scale`` returns the largest power of two that passes (powers of two keep the
``* scale`` step exact in floating point).

Error bound (``error_bound``), per coordinate of the weighted average, for n summed sites with
clip c and observed total weight W' (the dequantised weight sum):

    |avg' - avg| <= B + (c + B) * 2**-52,    B = (e_u + c * e_w) / W',
    e_u = (n / scale)(1 + 2**-49) + n * max_weight * c * 2**-49,
    e_w = (n / scale)(1 + 2**-49) + n * max_weight * 2**-49.

Stochastic rounding moves each encoded value by less than one step 1/scale, so each summed
coordinate is off by less than n / scale (e_u, e_w; the 2**-49 terms are a generous allowance for
float64 rounding). Writing S_u' = S_u + d_u and S_w' = S_w + d_w, the ratio error is
(d_u - avg * d_w) / S_w' with |avg| <= c, which gives B; the last term covers the final
division. With ``choose_scale`` on the default 32-bit ring and all weights at ``max_weight`` it
is about n * (1 + c) * max(c, 1) / 2**31, e.g. 3e-8 for 30 sites and c = 1 (float32 resolution
is 6e-8); smaller total weights scale it up by n * max_weight / W'. avg is the weighted average
of the *clipped* updates.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from medfed.common.secagg.masks import (
    DEFAULT_MODULUS_BITS,
    KEY_BYTES,
    MAX_MODULUS_BITS,
    keystream,
    ring_mask,
)

FLOAT_SLACK = 2.0**-49  # allowance for float64 rounding in encode/decode (see module docstring)
_UNIFORM_BITS = 53  # float64 mantissa: uniforms k / 2**53 are exact


class OverflowRisk(ValueError):
    """The configured sum could wrap modulo 2**k; raised before anything is encoded."""


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")


def _peak(max_weight: float, clip: float, scale: float) -> int:
    """Largest |q| one site can produce (same float operations as ``encode_weighted``)."""
    largest = max(max_weight * clip, max_weight)
    return math.floor(largest * scale) + 1


def check_capacity(
    num_sites: int,
    max_weight: float,
    clip: float,
    scale: float,
    modulus_bits: int = DEFAULT_MODULUS_BITS,
) -> None:
    """Raise :class:`OverflowRisk` unless ``num_sites`` encoded vectors always sum without wrap."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    for name, value in (("max_weight", max_weight), ("clip", clip), ("scale", scale)):
        _check_positive(name, value)
    if not 2 <= modulus_bits <= MAX_MODULUS_BITS:
        raise ValueError(f"modulus_bits must be in [2, {MAX_MODULUS_BITS}], got {modulus_bits}")
    limit = 2 ** (modulus_bits - 1) - 1
    need = num_sites * _peak(max_weight, clip, scale)
    if need > limit:
        raise OverflowRisk(
            f"secure-aggregation sum may wrap: {num_sites} sites x max |value| "
            f"{max(max_weight * clip, max_weight):g} (max_weight={max_weight:g}, clip={clip:g}) "
            f"x scale {scale:g} reaches {need} > 2**{modulus_bits - 1} - 1 = {limit}; "
            f"lower the scale, clip or max_weight, or raise modulus_bits"
        )


def choose_scale(
    num_sites: int, max_weight: float, clip: float, modulus_bits: int = DEFAULT_MODULUS_BITS
) -> float:
    """The largest power-of-two scale that passes :func:`check_capacity`."""
    check_capacity(num_sites, max_weight, clip, 2.0**-1074, modulus_bits)
    largest = max(max_weight * clip, max_weight)
    exponent = math.floor(math.log2((2 ** (modulus_bits - 1) - 1) / num_sites / largest))
    exponent = min(exponent, 1000)  # keep 2.0**e finite for absurdly small max_weight * clip
    for e in range(exponent + 1, exponent - 4, -1):  # log2 may be off by one near powers of 2
        try:
            check_capacity(num_sites, max_weight, clip, 2.0**e, modulus_bits)
            return 2.0**e
        except OverflowRisk:
            continue
    raise OverflowRisk(f"no power-of-two scale fits {num_sites} sites in 2**{modulus_bits}")


@dataclass(frozen=True)
class QuantParams:
    """Public, agreed parameters of the fixed-point encoding; validated on construction."""

    num_sites: int
    max_weight: float
    clip: float
    scale: float
    modulus_bits: int = DEFAULT_MODULUS_BITS

    def __post_init__(self) -> None:
        check_capacity(self.num_sites, self.max_weight, self.clip, self.scale, self.modulus_bits)

    @classmethod
    def auto(
        cls,
        num_sites: int,
        max_weight: float,
        clip: float,
        modulus_bits: int = DEFAULT_MODULUS_BITS,
    ) -> QuantParams:
        """Parameters with the finest scale the ring allows (:func:`choose_scale`)."""
        scale = choose_scale(num_sites, max_weight, clip, modulus_bits)
        return cls(num_sites, max_weight, clip, scale, modulus_bits)


def uniform01(length: int, key: bytes | None = None) -> np.ndarray:
    """``length`` uniforms in [0, 1) (multiples of 2**-53) from a ChaCha20 keystream.

    ``key`` defaults to a fresh ``secrets`` key; pass one only for reproducible tests.
    """
    key = secrets.token_bytes(KEY_BYTES) if key is None else key
    if length < 0:
        raise ValueError("length must be non-negative")
    words = np.frombuffer(keystream(key, 8 * length), dtype="<u8")  # as expand_mask(key, n, 53)
    uniforms = (words & np.uint64(2**_UNIFORM_BITS - 1)).astype(np.float64)
    uniforms *= 2.0**-_UNIFORM_BITS
    return uniforms


def stochastic_round(x: np.ndarray, key: bytes | None = None) -> np.ndarray:
    """Round each value to floor(x) or floor(x) + 1, up with probability frac(x); int64."""
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("stochastic_round needs finite values")
    low = np.floor(x)
    up = uniform01(x.size, key).reshape(x.shape) < (x - low)
    rounded = low.astype(np.int64)
    rounded += up
    return rounded


def to_ring(q: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Signed int64 -> Z_{2**k} as uint64 (two's complement in k bits)."""
    return np.asarray(q, np.int64).astype(np.uint64) & ring_mask(modulus_bits)


def from_ring(v: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Z_{2**k} (uint64) -> centred signed int64 in [-2**(k-1), 2**(k-1))."""
    v = np.asarray(v, np.uint64) & ring_mask(modulus_bits)
    signed = v.astype(np.int64)
    return np.where(v >= np.uint64(1 << (modulus_bits - 1)), signed - (1 << modulus_bits), signed)


def encode_weighted(
    update: np.ndarray, weight: float, params: QuantParams, key: bytes | None = None
) -> np.ndarray:
    """Encode ``[weight * clip(update)..., weight]`` into Z_{2**k} (uint64, length d + 1).

    ``key`` seeds the stochastic rounding; leave it ``None`` outside tests.
    """
    u = np.asarray(update, np.float64).ravel()
    if not np.all(np.isfinite(u)):
        raise ValueError("update contains NaN or infinite values")
    if not (math.isfinite(weight) and 0 <= weight <= params.max_weight):
        raise ValueError(f"weight {weight} outside [0, max_weight={params.max_weight}]")
    values = np.empty(u.size + 1, np.float64)
    np.clip(u, -params.clip, params.clip, out=values[:-1])
    values[:-1] *= weight  # the same float operations as (weight * clipped) * scale
    values[-1] = weight
    values *= params.scale
    q = stochastic_round(values, key)
    peak = _peak(params.max_weight, params.clip, params.scale)
    if q.size and max(int(q.max()), -int(q.min())) > peak:
        raise OverflowRisk("encoded value exceeds the checked capacity")  # defensive, unreachable
    return to_ring(q, params.modulus_bits)


def decode_sum(ring_sum: np.ndarray, params: QuantParams) -> tuple[np.ndarray, float]:
    """Unmasked ring sum -> (sum of weight * update per coordinate, total weight), float64."""
    signed = from_ring(ring_sum, params.modulus_bits).astype(np.float64) / params.scale
    return signed[:-1], float(signed[-1])


def weighted_average(ring_sum: np.ndarray, params: QuantParams) -> np.ndarray:
    """The weighted average sum(w * u) / sum(w) from an unmasked ring sum."""
    weighted, total = decode_sum(ring_sum, params)
    if total <= 0:
        raise ValueError(f"total weight {total} is not positive; nothing to average")
    return weighted / total


def error_bound(params: QuantParams, total_weight: float, num_summed: int | None = None) -> float:
    """Per-coordinate bound on |weighted_average - exact average of the clipped updates|.

    ``total_weight`` is the decoded weight sum; ``num_summed`` the number of sites in the sum
    (default ``params.num_sites``; fewer after dropouts). See the module docstring.
    """
    n = params.num_sites if num_summed is None else num_summed
    c, m = params.clip, params.max_weight
    step = n / params.scale * (1 + FLOAT_SLACK)
    e_u = step + n * m * c * FLOAT_SLACK
    e_w = step + n * m * FLOAT_SLACK
    if total_weight <= 0:
        return math.inf
    main = (e_u + c * e_w) / total_weight
    return main + (c + main) * 2.0**-52
