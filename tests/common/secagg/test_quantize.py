"""Fixed-point encoding: exact weighted averages within the bound, unbiased rounding, capacity."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.common.secagg import masks, quantize
from medfed.common.secagg.quantize import OverflowRisk, QuantParams


def _exact_average(updates: list[np.ndarray], weights: list[float], clip: float) -> list[Fraction]:
    """The weighted average of the clipped updates, in exact rational arithmetic."""
    total = sum(Fraction(w) for w in weights)
    dims = len(updates[0])
    sums = [Fraction(0)] * dims
    for u, w in zip(updates, weights, strict=True):
        for j, value in enumerate(np.clip(u, -clip, clip)):
            sums[j] += Fraction(w) * Fraction(float(value))
    return [s / total for s in sums]


@st.composite
def _rounds(draw):
    bits = draw(st.sampled_from([24, 32, 48, 62]))
    sites = draw(st.integers(1, 30))
    dims = draw(st.integers(1, 12))
    clip = draw(st.sampled_from([0.1, 1.0, 3.0, 50.0]))
    max_weight = draw(st.sampled_from([1.0, 100.0, 5000.0]))
    weights = [draw(st.floats(0, max_weight)) for _ in range(sites)]
    weights[0] = draw(st.floats(max_weight / 100, max_weight))  # total weight stays positive
    value = st.floats(-2 * clip, 2 * clip, allow_nan=False)  # also exercises clipping
    updates = [np.array(draw(st.lists(value, min_size=dims, max_size=dims))) for _ in weights]
    return bits, clip, max_weight, weights, updates


@settings(max_examples=60, deadline=None)
@given(_rounds())
def test_masked_secure_sum_matches_weighted_average(case) -> None:
    bits, clip, max_weight, weights, updates = case
    params = QuantParams.auto(len(weights), max_weight, clip, bits)
    run, rnd, ids = "run", 1, list(range(1, len(weights) + 1))
    seeds = {i: bytes([i]) * 32 for i in ids}
    masked = []
    for i, u, w in zip(ids, updates, weights, strict=True):
        encoded = quantize.encode_weighted(u, w, params)
        pair = {j: bytes([min(i, j), max(i, j)]) * 16 for j in ids if j != i}  # shared per pair
        masked.append(masks.apply_masks(encoded, seeds[i], pair, i, bits, run_id=run, round=rnd))
    total = masks.unmask_sum(
        masks.sum_mod(masked, bits),
        self_seeds=seeds,
        dangling={},
        run_id=run,
        round=rnd,
        modulus_bits=bits,
    )
    average = quantize.weighted_average(total, params)
    _, total_weight = quantize.decode_sum(total, params)
    bound = quantize.error_bound(params, total_weight)
    exact = _exact_average(updates, weights, clip)
    errors = [abs(Fraction(float(a)) - e) for a, e in zip(average, exact, strict=True)]
    assert max(errors) <= Fraction(bound)


def test_error_bound_default_ring_is_below_float32_resolution() -> None:
    params = QuantParams.auto(num_sites=30, max_weight=1000.0, clip=1.0)
    assert params.modulus_bits == 32
    assert quantize.error_bound(params, total_weight=30 * 1000.0) < 6e-8


def test_stochastic_rounding_is_unbiased() -> None:
    fractions = np.array([0.0, 0.1, 0.25, 0.5, 0.9, 0.999])
    n = 40_000
    x = np.repeat(fractions - 3.0, n)  # negative values too
    q = quantize.stochastic_round(x, key=bytes([5]) * 32).reshape(len(fractions), n)
    assert set(np.unique(q)) <= {-3, -2}
    means = q.mean(axis=1)
    sigma = np.sqrt(fractions * (1 - fractions) / n)
    assert np.all(np.abs(means - (fractions - 3.0)) <= 5 * sigma + 1e-12)


def test_stochastic_rounding_is_exact_on_integers_and_fresh_by_default() -> None:
    ints = np.arange(-5.0, 6.0)
    assert np.array_equal(quantize.stochastic_round(ints), ints.astype(np.int64))
    halves = np.full(256, 0.5)
    assert not np.array_equal(quantize.stochastic_round(halves), quantize.stochastic_round(halves))


def test_ring_round_trip_is_centred() -> None:
    q = np.array([-(2**31), -1, 0, 1, 2**31 - 1], np.int64)
    ring = quantize.to_ring(q, 32)
    assert int(ring[1]) == 2**32 - 1
    assert np.array_equal(quantize.from_ring(ring, 32), q)


def test_values_outside_clip_are_clipped() -> None:
    params = QuantParams(num_sites=1, max_weight=2.0, clip=1.0, scale=2.0**20)
    encoded = quantize.encode_weighted(np.array([5.0, -7.0, 0.5]), 2.0, params)
    weighted, total = quantize.decode_sum(encoded, params)
    assert total == 2.0
    assert np.array_equal(weighted, [2.0, -2.0, 1.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_rejected(bad: float) -> None:
    params = QuantParams.auto(2, 1.0, 1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize.encode_weighted(np.array([0.0, bad]), 1.0, params)


@pytest.mark.parametrize("weight", [-1.0, 1.5, math.nan])
def test_weight_outside_range_is_rejected(weight: float) -> None:
    params = QuantParams.auto(2, 1.0, 1.0)
    with pytest.raises(ValueError, match="weight"):
        quantize.encode_weighted(np.zeros(3), weight, params)


def test_capacity_is_checked_before_encoding() -> None:
    with pytest.raises(OverflowRisk, match=r"30 sites .* 2\*\*31 - 1"):
        QuantParams(num_sites=30, max_weight=1000.0, clip=1.0, scale=2.0**17)
    with pytest.raises(OverflowRisk):
        quantize.check_capacity(3, 1.0, 1.0, 2.0**62, 62)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 1000),
    st.floats(1e-3, 1e5),
    st.floats(1e-3, 1e3),
    st.integers(8, 62),
)
def test_chosen_scale_is_the_largest_safe_power_of_two(sites, max_weight, clip, bits) -> None:
    try:
        scale = quantize.choose_scale(sites, max_weight, clip, bits)
    except OverflowRisk:
        return  # even the tiniest scale cannot hold the weight counts
    quantize.check_capacity(sites, max_weight, clip, scale, bits)
    with pytest.raises(OverflowRisk):
        quantize.check_capacity(sites, max_weight, clip, 2 * scale, bits)


def test_worst_case_sum_does_not_wrap_at_capacity() -> None:
    sites, bits = 7, 24
    params = QuantParams.auto(sites, 10.0, 2.0, bits)
    plus = [quantize.encode_weighted(np.array([2.0, -2.0]), 10.0, params) for _ in range(sites)]
    weighted, total = quantize.decode_sum(masks.sum_mod(plus, bits), params)
    assert total == pytest.approx(70.0, abs=sites / params.scale)
    assert weighted[0] == pytest.approx(140.0, abs=sites / params.scale)
    assert weighted[1] == pytest.approx(-140.0, abs=sites / params.scale)


def test_average_of_zero_weights_is_refused() -> None:
    params = QuantParams.auto(2, 1.0, 1.0)
    zero = quantize.encode_weighted(np.ones(2), 0.0, params)
    with pytest.raises(ValueError, match="total weight"):
        quantize.weighted_average(zero, params)
    assert quantize.error_bound(params, 0.0) == math.inf
