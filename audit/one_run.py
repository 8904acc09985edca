"""Statistics of the one-run privacy audit (Steinke, Nasr and Jagielski, 2023).

T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023 (arXiv:2305.08846). The auditor draws ``m`` canaries and includes each in
the training set independently with probability 1/2. After one training run it guesses,
for ``r`` of the canaries, whether each was included (abstaining on the rest) and counts
``v`` correct guesses. If training is (epsilon, delta)-DP, the number of correct guesses
is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) up to an additive term
from delta (the paper's Theorem 5.2). A count too large for that is evidence against the
claim, and the largest epsilon rejected at the chosen confidence is a lower bound on the
true epsilon of the training run.

:func:`p_value` and :func:`epsilon_lower_bound` follow the paper's appendix code (the
p-value with the ``2 m delta`` term, then bisection on epsilon); :func:`guess_counts`
and :func:`audit_scores` turn the auditor's per-canary scores into guesses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

#: Fractions of the canaries guessed "in" (top scores) and, as many again, "out" (bottom
#: scores), fixed before any score is seen. :func:`audit_scores` reports the best bound
#: over this grid with a Bonferroni correction for trying all of them.
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)

_BISECTION_STEPS = 40


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses correct] if training is (epsilon, delta)-DP.

    The paper's Theorem 5.2 in the form of its appendix code: with
    ``q = e^eps / (1 + e^eps)`` (the accuracy of epsilon-DP randomized response),

        p = P[B >= v] + 2 m delta * max_{1 <= i <= v} P[v > B >= v - i] / i,  B ~ Binomial(r, q)

    capped at 1. ``m`` canaries in all, ``r`` guesses (abstentions excluded), ``v``
    correct. The p-value grows with ``epsilon``: a larger claimed epsilon explains more
    correct guesses.
    """
    _check_counts(m, r, v)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if v > 0 and delta > 0:
        # cumulative[i - 1] = P[v > Binomial(r, q) >= v - i], for i = 1..v
        cumulative = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(cumulative / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest epsilon that ``v`` correct of ``r`` guesses reject at ``confidence``.

    The training run is, with probability at least ``confidence`` over the canary
    draw, not (epsilon, delta)-DP for any epsilon below the returned value. 0.0 means
    no evidence of leakage (the guesses are explained even by epsilon = 0). Bisection on
    the p-value of :func:`p_value`, which grows with epsilon, as in the paper's code.
    """
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0  # keep p_value(low) < level <= p_value(high)
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < level:
            low = mid
        else:
            high = mid
    return low


def guess_counts(
    scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int
) -> tuple[int, int]:
    """Guess "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest.

    Returns ``(r, v)``: the number of guesses and how many were right. Ties are broken
    by canary order (a stable sort), which does not depend on inclusion.
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != scores.shape:
        raise ValueError("scores and included must have the same length")
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"need k_in, k_out >= 0 and k_in + k_out <= {m}")
    order = np.argsort(-scores, kind="stable")
    guessed_in = order[:k_in]
    guessed_out = order[m - k_out :]
    correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return k_in + k_out, correct


@dataclass(frozen=True)
class AuditOutcome:
    """The guesses behind a lower bound: ``k`` guesses each way, ``r`` in all, ``v`` right."""

    epsilon_lower_bound: float
    k: int
    r: int
    v: int
    confidence: float
    per_guess_confidence: float


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> AuditOutcome:
    """Best lower bound over a fixed grid of guess counts, Bonferroni-corrected.

    For each fraction ``f`` (fixed in advance, never chosen from the scores), the
    auditor guesses "in" for the top ``k = round(f m)`` scores and "out" for the bottom
    ``k``, and computes the bound at confidence ``1 - (1 - confidence) / len(fractions)``.
    By the union bound, the largest of these bounds holds at ``confidence``: picking the
    best ``k`` after seeing the scores is only allowed at this price.
    """
    m = len(scores)
    if not fractions or any(not 0 < f <= 0.5 for f in fractions):
        raise ValueError(f"guess fractions must be in (0, 0.5], got {list(fractions)}")
    per_guess = 1.0 - (1.0 - confidence) / len(fractions)
    best: AuditOutcome | None = None
    for fraction in fractions:
        k = min(max(1, round(fraction * m)), m // 2)
        r, v = guess_counts(scores, included, k, k)
        bound = epsilon_lower_bound(m, r, v, delta, per_guess)
        if best is None or bound > best.epsilon_lower_bound:
            best = AuditOutcome(bound, k, r, v, confidence, per_guess)
    assert best is not None
    return best
