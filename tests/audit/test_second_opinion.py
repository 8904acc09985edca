"""The second opinion on a site's epsilon (issue 6, requirement 3)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from medfed.audit.second_opinion import (
    OPACUS_ORDERS,
    SecondOpinion,
    rdp_epsilon,
    rdp_subsampled_gaussian,
    second_opinion,
)
from medfed.common.privacy import Spend, epsilon_of, steps_per_round

DELTA = 1e-5

try:
    import dp_accounting  # noqa: F401  (the tight PLD figure needs it)

    HAVE_DP_ACCOUNTING = True
except ImportError:
    HAVE_DP_ACCOUNTING = False
needs_dp_accounting = pytest.mark.skipif(not HAVE_DP_ACCOUNTING, reason="needs dp-accounting")


def _site(num_samples: int, epochs: int, noises: list[float]) -> list[Spend]:
    """One spend per round, as a site records them: the rate is the dataset's, the noise
    the run's (several runs, so several noises)."""
    rate, steps = steps_per_round(num_samples, 64, epochs)
    return [Spend(noise, rate, steps) for noise in noises]


# Three hospitals with 15-20 rounds over two or three runs each (heterogeneous spends).
SITES = {
    "small": _site(600, 5, [1.281] * 5 + [3.579] * 5 + [6.562] * 5),
    "medium": _site(4000, 1, [0.87] * 6 + [1.299] * 5 + [1.445] * 5),
    "large": _site(6400, 1, [1.023] * 10 + [1.514] * 10),
}


@pytest.fixture(scope="module")
def primaries() -> dict[str, float]:
    return {name: epsilon_of(spends, DELTA) for name, spends in SITES.items()}


def test_orders_are_opacus_defaults():
    from opacus.accountants import RDPAccountant

    assert list(OPACUS_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize(
    ("noise", "rate"), [(0.5, 0.2), (1.0, 0.01), (3.0, 0.05), (0.8, 1 / 64), (10.0, 0.5)]
)
def test_rdp_integral_matches_opacus_at_every_order(noise, rate):
    from opacus.accountants.analysis.rdp import compute_rdp

    expected = compute_rdp(q=rate, noise_multiplier=noise, steps=1, orders=list(OPACUS_ORDERS))
    got = rdp_subsampled_gaussian(noise, rate)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_rdp_integral_matches_dp_accounting_at_integer_orders():
    rdp_module = pytest.importorskip("dp_accounting.rdp.rdp_privacy_accountant")
    orders = [2, 3, 5, 8, 13, 21, 34, 55, 63]
    for noise, rate in [(0.7, 0.1), (2.0, 0.01)]:
        expected = rdp_module._compute_rdp_poisson_subsampled_gaussian(rate, noise, orders)
        got = rdp_subsampled_gaussian(noise, rate, orders)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_full_batch_is_the_gaussian_mechanism():
    np.testing.assert_allclose(
        rdp_subsampled_gaussian(2.0, 1.0, [2, 10.5]), [2 / 8, 10.5 / 8], rtol=1e-12
    )
    assert math.isclose(
        rdp_epsilon([Spend(2.0, 1.0, 7)], DELTA), epsilon_of([Spend(2.0, 1.0, 7)], DELTA)
    )


@pytest.mark.parametrize("name", sorted(SITES))
def test_recomputed_epsilon_agrees(name, primaries):
    primary = primaries[name]
    opinion = second_opinion(SITES[name], DELTA, primary)
    assert not opinion.flagged, opinion.note
    assert abs(opinion.relative_difference) < 1e-6
    assert math.isclose(opinion.epsilon, primary, rel_tol=1e-6)
    assert "agrees" in opinion.note
    if not HAVE_DP_ACCOUNTING:
        assert opinion.tight_epsilon is None
        return
    # The tight figure is lower (RDP is conservative) and reported, not flagged.
    assert opinion.tight_epsilon is not None and opinion.tight_error is not None
    assert 0 < opinion.tight_epsilon < primary
    assert 0 < opinion.tight_error < 0.1
    assert "conservative by +" in opinion.note


def test_large_epsilon_is_not_a_false_alarm():
    """Small noise, many steps: the optimal order is fractional and near 1, where
    dp-accounting's RDP exceeds Opacus' by 28%; the integral still agrees."""
    spends = [Spend(1.0, 0.2, 1000), Spend(1.0, 0.2, 1000)]
    primary = epsilon_of(spends, DELTA)
    opinion = second_opinion(spends, DELTA, primary)
    assert primary > 100
    assert not opinion.flagged, opinion.note
    assert abs(opinion.relative_difference) < 1e-6


@pytest.mark.parametrize("factor", [0.8, 1.2, 0.9, 1.07])
def test_wrong_primary_is_flagged(factor, primaries):
    primary = primaries["medium"]
    opinion = second_opinion(SITES["medium"], DELTA, primary * factor)
    assert opinion.flagged
    assert math.isclose(opinion.relative_difference, factor - 1, rel_tol=1e-5)
    assert "DISAGREEMENT" in opinion.note
    assert math.isclose(opinion.epsilon, primary, rel_tol=1e-6)


def test_small_difference_within_threshold_is_not_flagged(primaries):
    primary = primaries["large"]
    for factor in (0.97, 1.03):
        opinion = second_opinion(SITES["large"], DELTA, primary * factor)
        assert not opinion.flagged, opinion.note


@needs_dp_accounting
def test_under_statement_below_tight_figure_is_flagged(primaries):
    """Even when the same-bound check is switched off, a figure below the tight
    accountant's is an under-statement of the privacy loss."""
    spends = SITES["small"]
    reference = second_opinion(spends, DELTA, primaries["small"])
    assert reference.tight_epsilon is not None and reference.tight_error is not None
    below = reference.tight_epsilon - 2 * reference.tight_error
    opinion = second_opinion(spends, DELTA, below, threshold=1.0)
    assert opinion.flagged
    assert "UNDER-STATED" in opinion.note
    # Within the tight figure's error it is not.
    close = reference.tight_epsilon - 0.5 * reference.tight_error
    assert not second_opinion(spends, DELTA, close, threshold=1.0).flagged


def test_empty_spends():
    opinion = second_opinion([], DELTA, 0.0)
    assert opinion.epsilon == 0.0
    assert opinion.relative_difference == 0.0
    assert not opinion.flagged
    assert opinion.tight_epsilon is None
    assert "no DP-SGD spends" in opinion.note
    # A ledger that states a spend with no spends behind it disagrees.
    claimed = second_opinion([], DELTA, 1.5)
    assert claimed.flagged and claimed.relative_difference == math.inf


def test_zero_step_spends_compose_to_nothing():
    assert rdp_epsilon([Spend(1.0, 0.1, 0)], DELTA) == 0.0
    spends = [Spend(1.0, 0.1, 0), Spend(1.2, 0.05, 40)]
    assert math.isclose(rdp_epsilon(spends, DELTA), epsilon_of(spends, DELTA), rel_tol=1e-8)


def test_without_tight_accountant(monkeypatch, primaries):
    opinion = second_opinion(SITES["large"], DELTA, primaries["large"], tight=False)
    assert not opinion.flagged
    assert opinion.tight_accountant is None and opinion.tight_epsilon is None
    monkeypatch.setitem(sys.modules, "dp_accounting.pld", None)
    missing = second_opinion(SITES["large"], DELTA, primaries["large"] * 0.5)
    assert missing.tight_epsilon is None
    assert "dp-accounting is not installed" in missing.note
    assert missing.flagged  # the same-bound check still runs


def test_to_dict_is_json(primaries):
    opinion = second_opinion(SITES["large"], DELTA, primaries["large"])
    data = opinion.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert SecondOpinion(**data) == opinion
    assert set(data) >= {
        "accountant",
        "epsilon",
        "primary_epsilon",
        "relative_difference",
        "flagged",
        "note",
        "tight_accountant",
        "tight_epsilon",
    }


@pytest.mark.parametrize(
    ("spends", "delta", "primary"),
    [
        ([Spend(1.0, 0.1, 10)], 0.0, 1.0),
        ([Spend(1.0, 0.1, 10)], 1.0, 1.0),
        ([Spend(1.0, 0.1, 10)], DELTA, math.nan),
        ([Spend(0.0, 0.1, 10)], DELTA, 1.0),
        ([Spend(1.0, 1.5, 10)], DELTA, 1.0),
        ([Spend(1.0, 0.1, -1)], DELTA, 1.0),
    ],
)
def test_invalid_input_raises(spends, delta, primary):
    with pytest.raises(ValueError):
        second_opinion(spends, delta, primary)
