"""Privacy accounting for DP-SGD: calibrating noise and composing spends.

The accountant is Opacus' RDP accountant. Its state is a history of
``(noise_multiplier, sample_rate, steps)`` triples; a site rebuilds it from its ledger
before every round, so epsilon composes across rounds, runs and process restarts.

Replaying a history (:func:`epsilon_of`) runs Opacus' own RDP analysis module, which
needs only numpy and scipy, loaded without the ``opacus`` package (whose ``__init__``
imports torch): the ledger, the site's "will you train?" answer and ``medfed audit
verify`` replay ledgers in processes that must start fast. Calibrating noise imports
Opacus in full.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

ACCOUNTANT = "rdp"
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""Opacus' ``RDPAccountant.DEFAULT_ALPHAS`` (a test keeps the two equal)."""
_RDP_MODULE = "opacus.accountants.analysis.rdp"


@dataclass(frozen=True)
class Spend:
    """One application of the subsampled Gaussian mechanism, repeated ``steps`` times."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def rebuild_accountant(spends: Iterable[Spend]) -> RDPAccountant:
    """Return an RDP accountant whose history holds ``spends`` in order."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in spends]
    return accountant


@functools.cache
def _rdp_analysis() -> ModuleType:
    """Opacus' RDP analysis module, loaded from its file when opacus is not imported."""
    if _RDP_MODULE in sys.modules:
        return sys.modules[_RDP_MODULE]
    package = importlib.util.find_spec("opacus")
    if package is None or not package.submodule_search_locations:
        raise ImportError("opacus is not installed")
    path = Path(package.submodule_search_locations[0]) / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("medfed_opacus_rdp_analysis", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def epsilon_of(spends: Iterable[Spend], delta: float) -> float:
    """Epsilon at ``delta`` after composing every spend (0.0 when there are none).

    Exactly what a stock Opacus ``RDPAccountant`` holding the same history reports
    (same analysis code, same default orders), so anyone can replay a ledger with it.
    """
    history = list(spends)
    if not history:
        return 0.0
    return epsilon_from_rdp(rdp_of(history), delta)


def rdp_of(spends: Iterable[Spend]) -> np.ndarray:
    """The composed RDP curve over :data:`RDP_ORDERS` (Opacus: per-step RDP x steps, summed)."""
    total = np.zeros(len(RDP_ORDERS))
    for s in spends:
        total = total + np.asarray(_rdp_per_step(s.noise_multiplier, s.sample_rate)) * s.steps
    return total


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` from a composed RDP curve (Opacus' conversion)."""
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is valid, only not tightest.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        epsilon, _ = _rdp_analysis().get_privacy_spent(
            orders=list(RDP_ORDERS), rdp=rdp, delta=delta
        )
    return float(epsilon)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """One step's RDP curve; a run repeats the same (noise, rate), so it is cached."""
    curve = _rdp_analysis().compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    return tuple(float(v) for v in curve)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier that keeps ``steps`` steps within ``target_epsilon``."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        noise = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=ACCOUNTANT,
            epsilon_tolerance=0.005,
        )
    return float(noise)


def calibrate_noise_within(
    history: list[Spend],
    budget: float,
    delta: float,
    sample_rate: float,
    steps: int,
    max_noise: float,
) -> float | None:
    """Smallest noise multiplier keeping ``history`` plus ``steps`` new steps within budget.

    Returns None when even ``max_noise`` does not fit (the budget is spent). Bisection
    on the composed epsilon, which falls as the noise grows; the returned value always
    satisfies the budget.
    """

    def fits(noise: float) -> bool:
        return epsilon_of([*history, Spend(noise, sample_rate, steps)], delta) <= budget

    if not fits(max_noise):
        return None
    lo, hi = 0.0, max_noise
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if mid > 0 and fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def steps_per_round(num_samples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """Sampling rate and number of DP-SGD steps a site takes in one round.

    Mirrors what Opacus' Poisson loader does and what its accountant records: with
    ``b = ceil(n / batch_size)`` batches, the loader samples at ``1 / b`` and one epoch
    takes ``s = int(b)`` steps computed as ``int(1 / (1 / b))``, which floating point
    makes ``b - 1`` for some ``b`` (e.g. 93); the accountant then records rate ``1 / s``,
    slightly above the true rate, which only over-states epsilon.
    """
    if num_samples <= 0:
        raise ValueError("a site needs at least one training record")
    if batch_size <= 0 or local_epochs <= 0:
        raise ValueError("batch_size and local_epochs must be positive")
    steps_per_epoch = int(1 / (1.0 / math.ceil(num_samples / batch_size)))
    return 1.0 / steps_per_epoch, local_epochs * steps_per_epoch
