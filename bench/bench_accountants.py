"""How far apart the privacy accountants are on medfed's DP-SGD ledgers, and how long the
second opinion (``medfed.audit.second_opinion``) takes.

For each ledger (a grid of single spends, realistic site ledgers of 15-20 heterogeneous
rounds, random heterogeneous ledgers) it computes epsilon at delta 1e-5 with

- ``opacus_rdp``: Opacus' RDP accountant, the ledger's figure (``epsilon_of``);
- ``integral_rdp``: the second opinion's independent RDP (numerical integration);
- ``dpa_rdp``: dp-accounting's RDP accountant at Opacus' orders (``dpa_rdp_default``: at
  its own default orders, which add 11 and 128-1024);
- ``pld``: dp-accounting's PLD accountant, pessimistic, at interval 2e-3 (what the second
  opinion reports) and, unless ``--quick``, 1e-4 (``pld_ref``);
- ``prv``: Opacus' PRV accountant at its default ``eps_error`` 0.01 (unless ``--quick``;
  slow: seconds to minutes per ledger).

and prints each as a relative difference from ``opacus_rdp``. Then it times
``second_opinion`` on three realistic sites (after a warm-up that imports dp-accounting).

    python bench/bench_accountants.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import logging
import random
import time
import warnings
from typing import Any

from _common import default_out, environment, print_table, write_json

from medfed.audit.second_opinion import (
    OPACUS_ORDERS,
    PLD_INTERVAL,
    _merge,
    _pld_epsilon,
    rdp_epsilon,
    second_opinion,
)
from medfed.common.privacy import Spend, epsilon_of

DELTA = 1e-5

# Realistic site ledgers: (1 / sample rate, steps per round, [(noise, rounds), ...]), one
# noise per run, calibrated by ``calibrate_noise`` for run budgets of epsilon 1-8 at
# 250-6400 records, batch 64, 1-5 local epochs.
REALISTIC = [
    (10, 50, [(6.5625, 5), (1.2805, 5), (3.5791, 5)]),
    (63, 63, [(1.4453, 5), (0.8698, 5), (1.2988, 6)]),
    (100, 100, [(1.0229, 10), (1.5137, 10)]),
    (10, 20, [(3.2422, 10), (2.0093, 3), (4.2871, 5)]),
    (100, 500, [(0.9229, 3), (1.2793, 10), (0.7814, 7)]),
    (10, 20, [(1.1954, 10), (4.2871, 5)]),
    (10, 50, [(3.5791, 5), (3.4863, 10)]),
    (63, 315, [(1.311, 3), (1.2024, 5), (3.7109, 10)]),
    (4, 8, [(1.6736, 10), (2.9883, 3), (5.293, 3)]),
]


def ledgers(seed: int = 0) -> list[tuple[str, list[Spend]]]:
    cases = []
    for sigma in (0.5, 1.0, 2.0, 3.0):
        for inv in (5, 100):
            for steps in (10, 2000):
                cases.append((f"s={sigma} q=1/{inv} T={steps}", [Spend(sigma, 1 / inv, steps)]))
    for i, (inv, steps, runs) in enumerate(REALISTIC):
        spends = [Spend(noise, 1 / inv, steps) for noise, rounds in runs for _ in range(rounds)]
        cases.append((f"site {i} ({len(spends)} rounds)", spends))
    rng = random.Random(seed)
    for i in range(4):
        spends = [
            Spend(
                round(rng.uniform(0.5, 3), 4),
                1 / rng.choice([5, 10, 20, 50, 100]),
                rng.choice([10, 50, 100, 500, 2000]),
            )
            for _ in range(rng.choice([5, 10, 20]))
        ]
        cases.append((f"hetero {i} ({len(spends)} spends)", spends))
    return cases


def dpa_rdp(spends: list[Spend], orders: Any = None) -> float:
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    accountant = rdp.RdpAccountant(list(orders) if orders is not None else None)
    for (sigma, q), steps in _merge(spends).items():
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(DELTA))


def prv(spends: list[Spend]) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(s, q, n) for (s, q), n in _merge(spends).items()]
    return float(accountant.get_epsilon(DELTA))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip PRV and the 1e-4 PLD")
    parser.add_argument("--out", default=str(default_out("bench_accountants")))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    accountants = {
        "integral_rdp": lambda sp: rdp_epsilon(sp, DELTA),
        "dpa_rdp": lambda sp: dpa_rdp(sp, OPACUS_ORDERS),
        "dpa_rdp_default": dpa_rdp,
        "pld": lambda sp: _pld_epsilon(_merge(sp), DELTA, PLD_INTERVAL),
    }
    if not args.quick:
        accountants["pld_ref"] = lambda sp: _pld_epsilon(_merge(sp), DELTA, 1e-4)
        accountants["prv"] = prv
    rows, records = [], []
    seconds = dict.fromkeys(["opacus_rdp", *accountants], 0.0)
    for name, spends in ledgers():
        start = time.perf_counter()
        primary = epsilon_of(spends, DELTA)
        seconds["opacus_rdp"] += time.perf_counter() - start
        record: dict[str, Any] = {"ledger": name, "opacus_rdp": primary}
        for key, fn in accountants.items():
            start = time.perf_counter()
            record[key] = fn(spends)
            seconds[key] += time.perf_counter() - start
        records.append(record)
        rel = [f"{(record[k] - primary) / primary:+.2%}" for k in accountants]
        rows.append([name, f"{primary:.4g}", *rel])
        print(name, flush=True)
    print_table(
        "epsilon at delta 1e-5: Opacus RDP and the others' relative difference from it",
        ["ledger", "opacus_rdp", *accountants],
        rows,
    )
    print("\nseconds per accountant, all ledgers:", {k: round(v, 2) for k, v in seconds.items()})

    sites = [spends for name, spends in ledgers() if name.startswith("site")][:3]
    primaries = [epsilon_of(spends, DELTA) for spends in sites]
    second_opinion(sites[0][:1], DELTA, 1.0)  # warm-up: imports dp-accounting
    timings = {}
    for tight in (True, False):
        start = time.perf_counter()
        opinions = [
            second_opinion(sp, DELTA, p, tight=tight)
            for sp, p in zip(sites, primaries, strict=True)
        ]
        timings[f"three_sites_tight_{tight}"] = time.perf_counter() - start
        assert not any(o.flagged for o in opinions), [o.note for o in opinions]
    print("second_opinion, three sites (s):", {k: round(v, 3) for k, v in timings.items()})
    write_json(
        args.out,
        {
            "environment": environment(),
            "delta": DELTA,
            "pld_interval": PLD_INTERVAL,
            "ledgers": records,
            "seconds_per_accountant": seconds,
            "second_opinion_seconds": timings,
        },
    )


if __name__ == "__main__":
    main()
