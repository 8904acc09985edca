"""A second opinion on a site's epsilon, recomputed from the ledger's raw parameters.

The ledger states epsilon with Opacus' RDP accountant (:func:`medfed.common.privacy.
epsilon_of`). This module recomputes it twice, without Opacus, and flags a ledger whose
figure cannot be right.

1. **The same bound, independently** (``accountant``, ``epsilon``). The Rényi DP of the
   Poisson-subsampled Gaussian mechanism at order ``alpha`` is ``log(A) / (alpha - 1)`` with
   ``A = E_{z ~ N(0, σ²)}[((1 - q) + q·exp((2z - 1) / (2σ²)))^alpha]`` (Mironov, Talwar and
   Zhang 2019). Opacus and Google's dp-accounting both evaluate ``A`` with the same
   binomial series (both descend from TF Privacy's ``rdp_accountant.py``), so this module
   evaluates the defining integral itself, by the trapezoidal rule on a fine grid (spectrally
   accurate for this smooth, Gaussian-tailed integrand: it matches Opacus to ~1e-8 relative
   at every order). Spends compose by adding RDP (``steps`` times each), and epsilon at
   ``delta`` follows from the same conversion at the same orders as Opacus (Balle et al. 2020,
   Theorem 21; Opacus' default orders). An honest ledger therefore agrees to ~1e-8, and a
   relative difference above ``threshold`` (5%) in either direction means the ledger's
   arithmetic or an accountant is wrong: **flagged**.

   dp-accounting's own RDP accountant is not used for this check: at fractional orders it
   sums the series' terms in absolute value, a deliberately looser upper bound, which is
   exact at integer orders (agrees with Opacus to 1e-12) and within 2.5% of Opacus below
   epsilon 30, but exceeds Opacus by 5% to 154% on honest ledgers with epsilon 39-517 (small
   noise, many steps: the optimal order is fractional and close to 1), so a two-sided 5%
   rule on it would raise false alarms.

2. **The tight figure, as information** (``tight_accountant``, ``tight_epsilon``). RDP is an
   upper bound that is loose: the privacy-loss-distribution (PLD) accountant of
   dp-accounting (pessimistic "connect the dots" discretisation, an upper estimate of the
   true epsilon) is 4-68% lower on every ledger measured (8-15% on realistic medfed
   ledgers; Opacus' PRV accountant agrees with it within PRV's 0.01 error). So a ledger
   above the tight figure is **not** flagged: the note says by how much it is conservative.
   A ledger **below** the tight figure by more than the discretisation error under-states
   the privacy loss, a real privacy bug: **flagged**. ``tight_error`` is that error,
   estimated per call as ``PLD(2h) - PLD(h)`` (the pessimistic estimate falls towards the
   truth like ``h²``, so this is about three times the error at ``h``) plus 0.02. At
   ``h = 2e-3`` the overshoot over the truth, bounded above with Opacus' PRV lower bound
   (eps_error 0.01, itself up to 0.01-0.02 below the truth), was at most 0.022 on 29
   grid, realistic and heterogeneous ledgers and 0.10 (3.5%) at 20 x 2000 steps of σ = 3,
   q = 1/100 (error estimate 0.29); the estimate covered it on all 34 ledgers.

The PLD part needs ``dp-accounting``; without it (or with ``tight=False``) the tight fields
are ``None`` and only the same-bound check runs. Timing on 2 cores: the RDP recomputation
takes ~25 ms per ledger (identical ``(σ, q)`` spends are merged first), the PLD ~100-300 ms
per ledger of 10-20 spends, plus ~2 s to import dp-accounting once per process.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medfed.common.privacy import Spend

#: Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` (the ledger's orders), copied so that the
#: recomputation does not import Opacus; a test checks that they still agree.
OPACUS_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
)

RDP_ACCOUNTANT = "rdp (numerical integration, Opacus orders)"
#: Grid of the integral: points per noise standard deviation and tails in standard
#: deviations (e^-98 of the mass beyond them).
_POINTS_PER_SIGMA = 16
_TAIL_SIGMAS = 14.0
_MAX_GRID_CELLS = 1_000_000

#: PLD discretisation interval: 2e-3 is within 0.3% of 1e-4 on realistic ledgers (3% at
#: 40 000 steps of σ = 3, q = 1/100) and 10-20 times faster.
PLD_INTERVAL = 2e-3
TIGHT_ERROR_FLOOR = 0.02


@dataclass(frozen=True)
class SecondOpinion:
    """The recomputed epsilon of one site's spends and whether the ledger's figure holds.

    ``relative_difference`` is ``(primary_epsilon - epsilon) / epsilon``: positive when the
    ledger states more than the independent recomputation, infinite when the recomputation
    is 0 and the ledger is not. ``tight_epsilon`` is an upper estimate of the true epsilon
    within ``tight_error``.
    """

    accountant: str
    epsilon: float
    primary_epsilon: float
    relative_difference: float
    flagged: bool
    note: str
    tight_accountant: str | None = None
    tight_epsilon: float | None = None
    tight_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rdp_subsampled_gaussian(
    noise_multiplier: float, sample_rate: float, orders: Sequence[float] = OPACUS_ORDERS
) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism at each order.

    Integrates ``A`` numerically (see the module docstring); with ``sample_rate`` 1 it is
    the Gaussian mechanism's ``alpha / (2σ²)``.
    """
    sigma, q = float(noise_multiplier), float(sample_rate)
    _check_spend(sigma, q, 1)
    alphas = np.asarray(orders, dtype=float)
    if np.any(alphas <= 1):
        raise ValueError("RDP orders must be above 1")
    if q == 1.0:
        return alphas / (2 * sigma**2)
    h = sigma / _POINTS_PER_SIGMA
    # The integrand peaks near z = 0 (the 1 - q part) and near z = alpha (the q part).
    z = np.arange(-_TAIL_SIGMAS * sigma, alphas.max() + _TAIL_SIGMAS * sigma + h, h)
    log_density = -(z * z) / (2 * sigma**2)
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
    # Dividing by the grid's own normalisation cancels the quadrature error of N(0, σ²).
    log_norm = _logsumexp_rows(log_density[None, :])[0]
    rdp = np.empty_like(alphas)
    block = max(1, _MAX_GRID_CELLS // z.size)
    for start in range(0, alphas.size, block):
        a = alphas[start : start + block, None]
        log_a = _logsumexp_rows(log_density[None, :] + a * log_ratio[None, :]) - log_norm
        rdp[start : start + block] = np.maximum(log_a, 0.0) / (a[:, 0] - 1)
    return rdp


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1)
    return top + np.log(np.exp(x - top[:, None]).sum(axis=1))


def rdp_epsilon(
    spends: Iterable[Spend], delta: float, orders: Sequence[float] = OPACUS_ORDERS
) -> float:
    """Epsilon at ``delta`` of the composed spends by the independent RDP recomputation."""
    _check_delta(delta)
    merged = _merge(spends)
    if not merged:
        return 0.0
    alphas = np.asarray(orders, dtype=float)
    rdp = sum(steps * rdp_subsampled_gaussian(s, q, alphas) for (s, q), steps in merged.items())
    eps = rdp - (math.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    return max(float(np.nanmin(eps)), 0.0)


def tight_epsilon(
    spends: Iterable[Spend], delta: float, interval: float = PLD_INTERVAL
) -> tuple[float, float]:
    """``(epsilon, error)`` by dp-accounting's PLD accountant (pessimistic estimate).

    ``epsilon`` is an upper estimate of the true epsilon at ``delta`` and ``error`` bounds
    how far above it may be (see the module docstring). Raises ImportError without
    dp-accounting.
    """
    _check_delta(delta)
    merged = _merge(spends)
    if not merged:
        return 0.0, 0.0
    fine = _pld_epsilon(merged, delta, interval)
    coarse = _pld_epsilon(merged, delta, 2 * interval)
    return fine, max(coarse - fine, 0.0) + TIGHT_ERROR_FLOOR


def _pld_epsilon(merged: dict[tuple[float, float], int], delta: float, interval: float) -> float:
    from dp_accounting.pld import privacy_loss_distribution as pld

    total = None
    for (sigma, q), steps in merged.items():
        one = pld.from_gaussian_mechanism(
            standard_deviation=sigma,
            sampling_prob=q,
            value_discretization_interval=interval,
            pessimistic_estimate=True,
        ).self_compose(steps)
        total = one if total is None else total.compose(one)
    assert total is not None
    return float(total.get_epsilon_for_delta(delta))


def second_opinion(
    spends: Sequence[Spend],
    delta: float,
    primary_epsilon: float,
    threshold: float = 0.05,
    *,
    tight: bool = True,
) -> SecondOpinion:
    """Recompute epsilon from ``spends`` and judge the ledger's ``primary_epsilon``.

    Flagged when the independent RDP recomputation differs from ``primary_epsilon`` by more
    than ``threshold`` (relative, either way), or when ``primary_epsilon`` is below the
    tight PLD figure by more than its error (an under-statement). With ``tight`` False, or
    without dp-accounting, only the first check runs.
    """
    if math.isnan(primary_epsilon):
        raise ValueError("primary_epsilon is NaN")
    if not threshold >= 0:
        raise ValueError(f"threshold must be non-negative, got {threshold}")
    spends = list(spends)
    epsilon = rdp_epsilon(spends, delta)
    if epsilon > 0:
        relative = (primary_epsilon - epsilon) / epsilon
    else:
        relative = 0.0 if primary_epsilon == 0 else math.copysign(math.inf, primary_epsilon)
    disagrees = abs(relative) > threshold
    notes = [_same_bound_note(epsilon, primary_epsilon, relative, threshold, disagrees)]

    tight_name = tight_eps = tight_err = None
    understated = False
    if tight and spends:
        try:
            tight_eps, tight_err = tight_epsilon(spends, delta)
        except ImportError:
            notes.append("dp-accounting is not installed: no tight (PLD) figure")
        else:
            tight_name = f"pld (dp-accounting, pessimistic, interval {PLD_INTERVAL:g})"
            understated = primary_epsilon < tight_eps - tight_err
            notes.append(_tight_note(primary_epsilon, tight_eps, tight_err, understated))
    if not spends:
        notes.append("no DP-SGD spends")
    return SecondOpinion(
        accountant=RDP_ACCOUNTANT,
        epsilon=epsilon,
        primary_epsilon=float(primary_epsilon),
        relative_difference=relative,
        flagged=disagrees or understated,
        note="; ".join(notes),
        tight_accountant=tight_name,
        tight_epsilon=tight_eps,
        tight_error=tight_err,
    )


def _same_bound_note(
    epsilon: float, primary: float, relative: float, threshold: float, disagrees: bool
) -> str:
    if not disagrees:
        return (
            f"independent RDP recomputation {epsilon:.4g} agrees with the ledger's "
            f"{primary:.4g} ({relative:+.2%})"
        )
    return (
        f"DISAGREEMENT: the ledger states epsilon {primary:.4g}, the independent RDP "
        f"recomputation of its spends gives {epsilon:.4g} ({relative:+.2%}, threshold "
        f"{threshold:.0%}): the ledger's arithmetic or an accountant is wrong"
    )


def _tight_note(primary: float, tight: float, error: float, understated: bool) -> str:
    if understated:
        return (
            f"UNDER-STATED: the ledger's epsilon {primary:.4g} is below the tight PLD "
            f"accountant's {tight:.4g} (error {error:.2g}): the privacy loss is under-stated"
        )
    conservative = f"conservative by {(primary - tight) / tight:+.1%}" if tight > 0 else "above it"
    return (
        f"the tight PLD accountant says epsilon {tight:.4g} (±{error:.2g}); "
        f"the ledger is {conservative}"
    )


def _merge(spends: Iterable[Spend]) -> dict[tuple[float, float], int]:
    """Steps per ``(noise_multiplier, sample_rate)``, in first-seen order (both compose)."""
    merged: dict[tuple[float, float], int] = {}
    for s in spends:
        _check_spend(s.noise_multiplier, s.sample_rate, s.steps)
        if s.steps:
            key = (float(s.noise_multiplier), float(s.sample_rate))
            merged[key] = merged.get(key, 0) + int(s.steps)
    return merged


def _check_spend(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
