"""Privacy accounting: composition, calibration and the Poisson step count."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from medfed.common.privacy import (
    RDP_ORDERS,
    Spend,
    calibrate_noise,
    epsilon_of,
    rebuild_accountant,
    steps_per_round,
)

DELTA = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _replay(spends: list[Spend], delta: float) -> float:
    """Independent replay: step a fresh Opacus accountant once per DP-SGD step."""
    accountant = RDPAccountant()
    for s in spends:
        for _ in range(s.steps):
            accountant.step(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate)
    return float(accountant.get_epsilon(delta=delta))


def test_no_spends_is_zero() -> None:
    assert epsilon_of([], DELTA) == 0.0
    assert epsilon_of(iter(()), DELTA) == 0.0


def test_epsilon_grows_with_more_spends() -> None:
    spend = Spend(2.0, 0.05, 16)
    values = [epsilon_of([spend] * k, DELTA) for k in range(1, 6)]
    assert values[0] > 0
    assert all(b > a for a, b in itertools.pairwise(values))


def test_epsilon_larger_for_less_noise_and_smaller_delta() -> None:
    assert epsilon_of([Spend(0.8, 0.1, 50)], DELTA) > epsilon_of([Spend(1.5, 0.1, 50)], DELTA)
    assert epsilon_of([Spend(1.0, 0.1, 50)], 1e-7) > epsilon_of([Spend(1.0, 0.1, 50)], 1e-3)


@pytest.mark.parametrize(
    ("target", "rate", "steps"),
    [(1.0, 1 / 16, 48), (0.5, 0.02, 100), (2.0, 1.0, 5), (8.0, 1.0, 20)],
)
def test_calibrate_noise_meets_target(target: float, rate: float, steps: int) -> None:
    noise = calibrate_noise(target, DELTA, rate, steps)
    assert noise > 0
    eps = epsilon_of([Spend(noise, rate, steps)], DELTA)
    assert eps <= target
    assert eps >= 0.98 * target
    # Smaller epsilon needs more noise.
    assert calibrate_noise(target / 2, DELTA, rate, steps) > noise


def test_calibrate_noise_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise(1.0, DELTA, 0.1, 0)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(1.0, DELTA, 0.0, 10)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise(1.0, DELTA, 1.5, 10)


@pytest.mark.parametrize("epochs", [1, 3])
def test_steps_per_round_n1000_b64(epochs: int) -> None:
    rate, steps = steps_per_round(1000, 64, epochs)
    assert rate == pytest.approx(1 / 16)
    assert steps == 16 * epochs


def _opacus_loader(n: int, batch_size: int) -> DPDataLoader:
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPDataLoader.from_data_loader(loader)


@pytest.mark.parametrize(("n", "b"), [(1000, 64), (600, 64), (20, 64), (64, 64), (65, 64)])
def test_steps_per_round_matches_opacus_loader(n: int, b: int) -> None:
    dp_loader = _opacus_loader(n, b)
    rate, steps = steps_per_round(n, b, 2)
    assert rate == pytest.approx(dp_loader.sample_rate)
    assert steps == 2 * len(dp_loader)


def test_steps_per_round_matches_opacus_loader_93_batches() -> None:
    dp_loader = _opacus_loader(930, 10)
    _, steps = steps_per_round(930, 10, 1)
    assert steps == len(dp_loader)


def test_steps_per_round_rejects_empty() -> None:
    with pytest.raises(ValueError):
        steps_per_round(0, 64, 1)


def test_composition_equals_independent_opacus_replay() -> None:
    history = [
        Spend(2.0, 1 / 16, 16),
        Spend(2.0, 1 / 16, 16),
        Spend(1.5, 1.0, 8),
        Spend(3.0, 0.05, 40),
    ]
    for k in range(1, len(history) + 1):
        assert math.isclose(
            epsilon_of(history[:k], DELTA), _replay(history[:k], DELTA), rel_tol=1e-9
        )


def test_rebuild_accountant_holds_history() -> None:
    spends = [Spend(1.0, 0.1, 10), Spend(2.0, 0.2, 5)]
    acc = rebuild_accountant(spends)
    assert acc.history == [(1.0, 0.1, 10), (2.0, 0.2, 5)]


def test_replay_orders_are_opacus_defaults() -> None:
    assert list(RDP_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)


def test_epsilon_of_equals_a_stock_accountant_with_the_same_history() -> None:
    spends = [Spend(0.9, 0.02, 150), Spend(1.3, 0.05, 40), Spend(0.7, 1.0, 3)]
    for k in range(1, len(spends) + 1):
        assert epsilon_of(spends[:k], DELTA) == pytest.approx(
            rebuild_accountant(spends[:k]).get_epsilon(delta=DELTA), rel=1e-12
        )


def test_replaying_a_ledger_does_not_import_torch() -> None:
    """The site's answer and `medfed audit verify` replay ledgers in fresh processes."""
    import subprocess
    import sys

    code = (
        "import sys; from medfed.common.privacy import Spend, epsilon_of; "
        "e = epsilon_of([Spend(1.0, 0.1, 10)], 1e-5); "
        "assert e > 0; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
