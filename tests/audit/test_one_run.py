"""The one-run audit's statistics (Steinke, Nasr and Jagielski, 2023)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from medfed.audit.one_run import (
    DEFAULT_GUESS_FRACTIONS,
    audit_scores,
    epsilon_lower_bound,
    guess_counts,
    p_value,
)


def _paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 5.2 written out term by term, as a loop (independent of the vectorised code)."""
    q = 1 / (1 + math.exp(-eps))
    tail = sum(binom.pmf(j, r, q) for j in range(v, r + 1))
    alpha = max(
        (sum(binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1)),
        default=0.0,
    )
    return min(1.0, tail + alpha * delta * 2 * m)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (1000, 100, 80, 1.0, 1e-5),
        (100, 20, 20, 0.5, 1e-3),
        (50, 10, 3, 0.0, 0.0),
        (200, 60, 45, 2.0, 1e-5),
    ],
)
def test_p_value_matches_the_theorem(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(
        _paper_p_value(m, r, v, eps, delta), rel=1e-9
    )


def test_p_value_grows_with_epsilon_and_delta() -> None:
    values = [p_value(200, 60, 50, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values)
    assert p_value(200, 60, 50, 1.0, 1e-3) > p_value(200, 60, 50, 1.0, 0.0)
    # the delta term is at most 2 m delta
    assert p_value(200, 60, 50, 1.0, 1e-3) - p_value(200, 60, 50, 1.0, 0.0) <= 2 * 200 * 1e-3


def test_all_correct_without_delta_has_a_closed_form() -> None:
    # P[Binomial(r, q) >= r] = q^r = 0.05  =>  eps = log(q / (1 - q))
    r = 40
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(expected, abs=1e-6)


def test_lower_bound_sits_where_the_p_value_crosses_the_level() -> None:
    bound = epsilon_lower_bound(1000, 200, 170, 1e-5, 0.95)
    assert bound > 0
    assert (
        p_value(1000, 200, 170, bound - 1e-4, 1e-5)
        < 0.05
        <= p_value(1000, 200, 170, bound + 1e-4, 1e-5)
    )


def test_no_evidence_gives_zero() -> None:
    assert epsilon_lower_bound(100, 50, 25, 1e-5) == 0.0
    assert epsilon_lower_bound(100, 50, 10, 1e-5) == 0.0
    assert epsilon_lower_bound(100, 0, 0, 1e-5) == 0.0
    # four of four right is still chance at 95% (0.5^4 > 0.05)
    assert epsilon_lower_bound(10, 4, 4, 0.0) == 0.0


def test_lower_bound_grows_with_correct_guesses_and_falls_with_confidence() -> None:
    bounds = [epsilon_lower_bound(500, 100, v, 1e-5) for v in (60, 70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(500, 100, 90, 1e-5, 0.99) < epsilon_lower_bound(
        500, 100, 90, 1e-5, 0.95
    )


def test_large_delta_caps_the_bound() -> None:
    # the 2 m delta term weakens the bound, and once it is far above the level (here
    # 2 * 1000 * 0.01 = 20 times a weight of about 1/60) nothing can be rejected
    bounds = [epsilon_lower_bound(1000, 100, 100, d, 0.95) for d in (0.0, 1e-5, 1e-4, 1e-3)]
    assert bounds == sorted(bounds, reverse=True) and bounds[-1] > 0
    assert epsilon_lower_bound(1000, 100, 100, 1e-2, 0.95) == 0.0


@pytest.mark.parametrize(("m", "r", "v"), [(10, 11, 5), (10, 5, 6), (10, 5, -1)])
def test_impossible_counts_are_rejected(m: int, r: int, v: int) -> None:
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(m, r, v, 1.0, 1e-5)


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        p_value(10, 5, 5, -1.0, 0.0)
    with pytest.raises(ValueError, match="delta"):
        p_value(10, 5, 5, 1.0, 2.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, 0.0, 1.0)


def test_guess_counts_top_in_bottom_out() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.4])
    included = np.array([True, False, False, True, True, False])
    # top 2: idx 0 (in, right), 2 (out, wrong); bottom 2: idx 1 (out, right), 3 (in, wrong)
    assert guess_counts(scores, included, 2, 2) == (4, 2)
    assert guess_counts(scores, included, 1, 1) == (2, 2)
    assert guess_counts(scores, included, 0, 0) == (0, 0)
    with pytest.raises(ValueError):
        guess_counts(scores, included, 4, 3)


def test_audit_scores_bonferroni_over_the_grid() -> None:
    rng = np.random.default_rng(0)
    m = 200
    included = rng.random(m) < 0.5
    perfect = included.astype(float) + rng.random(m) * 0.1
    outcome = audit_scores(perfect, included, 1e-5)
    per_guess = 1 - 0.05 / len(DEFAULT_GUESS_FRACTIONS)
    assert outcome.per_guess_confidence == pytest.approx(per_guess)
    assert outcome.confidence == 0.95
    # perfect separation: the largest grid k with k <= min(#in, #out) is all right and wins
    fewest = min(int(included.sum()), m - int(included.sum()))
    k = max(round(f * m) for f in DEFAULT_GUESS_FRACTIONS if round(f * m) <= fewest)
    assert (outcome.k, outcome.r, outcome.v) == (k, 2 * k, 2 * k)
    assert outcome.epsilon_lower_bound == epsilon_lower_bound(m, 2 * k, 2 * k, 1e-5, per_guess)
    # the correction costs something: the same counts at 95% would give more
    assert outcome.epsilon_lower_bound < epsilon_lower_bound(m, 2 * k, 2 * k, 1e-5, 0.95)


def test_audit_scores_of_noise_give_zero() -> None:
    rng = np.random.default_rng(1)
    included = rng.random(500) < 0.5
    assert audit_scores(rng.random(500), included, 1e-5).epsilon_lower_bound == 0.0


def test_audit_scores_rejects_a_bad_grid() -> None:
    with pytest.raises(ValueError, match="fractions"):
        audit_scores(np.zeros(10), np.zeros(10, bool), 1e-5, fractions=(0.7,))
