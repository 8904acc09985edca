"""Empirical privacy audit: the one-run canary audit of the risk sites, with and without DP.

Target: the empirical audit of the risk task completes in under 10 minutes on a 2-core
machine.

What runs (``medfed.audit.empirical.run_empirical_audit``, one torch thread, as the
sites train):

- **defaults**: the three synthetic hospitals ``medfed simulate`` creates
  (``generate_risk_sites(3, seed=42)``, policies as the simulation writes them), at
  ``DATASET_DEFAULTS['synthetic']`` (epsilon 3, delta 1e-5, 3 rounds, 1 local epoch,
  batch 64, learning rate 0.5, clipping 1.0, logreg); each site audited with DP and
  without DP (noise multiplier 0). The timed target is this block for ``logreg``, the
  risk task's default model; ``mlp`` at the same settings follows (not with ``--quick``).
- **power check**: a small site (90 patients, 67 training records) trained for many
  epochs with the mlp (30 local epochs x 3 rounds, batch 16, learning rate 2.0), with
  and without DP, over several audit seeds: where single records do move the model,
  the audit must find leakage without DP and stay below the accountant's epsilon with it.

The figures per audit: canaries m (and how many were drawn in), guesses r, correct v,
the 95% epsilon lower bound, the accountant's epsilon, the noise multiplier, the
sample rate, the steps, the seconds and the verdict.

Usage::

    python bench/bench_empirical_audit.py [--quick] [--canaries N] [--seeds 1,2,3] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import default_out, environment, print_table, write_json

NAME = "bench_empirical_audit"
TARGET_SECONDS = 600.0
POWER_SETTINGS = dict(model="mlp", local_epochs=30, batch_size=16, learning_rate=2.0, num_rounds=3)
POWER_CANARIES = 100


def default_settings(model: str):
    """The run ``medfed simulate`` makes for the synthetic risk task, with ``model``."""
    from medfed.cli.main import DATASET_DEFAULTS
    from medfed.common.config import RunSettings

    d = DATASET_DEFAULTS["synthetic"]
    return RunSettings(
        task="risk",
        dataset="synthetic",
        model=model,
        num_rounds=d["rounds"],
        epsilon=d["epsilon"],
        delta=1e-5,
        local_epochs=d["local_epochs"],
        batch_size=d["batch_size"],
        learning_rate=d["learning_rate"],
        max_grad_norm=1.0,
        test_fraction=d["test_fraction"],
        seed=42,
    )


def make_sites(root: Path, num_sites: int, seed: int, size_scale: float = 1.0) -> list[Path]:
    from medfed.client.policy import POLICY_NAME, SitePolicy, write_policy
    from medfed.simulations.synthetic import generate_risk_sites

    sites = generate_risk_sites(num_sites, root, seed=seed, size_scale=size_scale)
    for i, site in enumerate(sites):
        write_policy(site / POLICY_NAME, SitePolicy(site_id=f"hospital-{chr(97 + i)}"))
    return sites


def audit(site: Path, settings, dp: bool, canaries: int, seed: int, block: str) -> dict[str, Any]:
    from medfed.audit.empirical import run_empirical_audit

    result = run_empirical_audit(site, settings, dp=dp, canaries=canaries, seed=seed)
    row = {"block": block, **result.to_dict()}
    print(
        f"  {block:<9} {result.site_id:<11} {result.model:<6} dp={'yes' if dp else 'no '} "
        f"lower bound {result.epsilon_lower_bound:.3f} (v={result.correct}/r={result.guesses}) "
        f"accountant {_eps(result.accountant_epsilon)}  {result.seconds:.1f} s  {result.verdict}",
        flush=True,
    )
    return row


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(title: str, rows: list[dict[str, Any]]) -> None:
    headers = [
        "site",
        "model",
        "DP",
        "seed",
        "m",
        "in",
        "r",
        "v",
        "eps LB 95%",
        "accountant eps",
        "noise",
        "rate",
        "steps",
        "s",
        "verdict",
    ]
    print_table(
        title,
        headers,
        [
            [
                r["site_id"],
                r["model"],
                r["dp"],
                r["seed"],
                r["canaries"],
                r["canaries_included"],
                r["guesses"],
                r["correct"],
                r["epsilon_lower_bound"],
                r["accountant_epsilon"],
                r["noise_multiplier"],
                r["sample_rate"],
                r["steps"],
                round(r["seconds"], 2),
                r["verdict"],
            ]
            for r in rows
        ],
        digits=3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--canaries", type=int, default=None, help="canaries per audit (default: the audit's)"
    )
    parser.add_argument(
        "--seeds", default="1,2,3", help="audit seeds for the power check (comma list)"
    )
    parser.add_argument("--quick", action="store_true", help="logreg only; one power-check seed")
    parser.add_argument("--out", type=Path, default=default_out(NAME))
    args = parser.parse_args()

    import torch

    from medfed.audit.empirical import DEFAULT_CANARIES

    torch.set_num_threads(1)
    canaries = args.canaries or DEFAULT_CANARIES
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        seeds = seeds[:1]
    models = ("logreg",) if args.quick else ("logreg", "mlp")
    rows: list[dict[str, Any]] = []
    risk_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="medfed-bench-audit-") as tmp:
        sites = make_sites(Path(tmp) / "defaults", 3, seed=42)
        print(f"defaults: {len(sites)} synthetic risk sites, {canaries} canaries per audit")
        for model in models:
            settings = default_settings(model)
            started = time.perf_counter()
            for site in sites:
                for dp in (True, False):
                    rows.append(audit(site, settings, dp, canaries, seed=0, block="defaults"))
            if model == "logreg":
                risk_seconds = time.perf_counter() - started
        [small] = make_sites(Path(tmp) / "small", 1, seed=7, size_scale=0.06)
        power = type(settings)(**{**default_settings("mlp").model_dump(), **POWER_SETTINGS})
        print(f"power check: {POWER_SETTINGS}, {POWER_CANARIES} canaries")
        for seed in seeds:
            for dp in (False, True):
                rows.append(audit(small, power, dp, POWER_CANARIES, seed=seed, block="power"))

    table(
        "defaults (medfed simulate's synthetic risk run)",
        [r for r in rows if r["block"] == "defaults"],
    )
    table("power check (small site, mlp, many epochs)", [r for r in rows if r["block"] == "power"])
    bugs = [r for r in rows if r["verdict"].startswith("BUG")]
    passed = risk_seconds < TARGET_SECONDS and not bugs
    print(
        f"\nrisk-task audit (logreg, {len(sites)} sites, with and without DP): "
        f"{risk_seconds:.1f} s (target < {TARGET_SECONDS:.0f} s) -> "
        f"{'PASS' if passed else 'FAIL'}; bugs: {len(bugs)}"
    )
    results = {
        "benchmark": NAME,
        "target_seconds": TARGET_SECONDS,
        "risk_audit_seconds": risk_seconds,
        "passed": passed,
        "bugs": len(bugs),
        "canaries": canaries,
        "default_settings": default_settings("logreg").model_dump(),
        "power_settings": POWER_SETTINGS,
        "power_canaries": POWER_CANARIES,
        "audits": rows,
        "environment": environment(),
    }
    write_json(args.out, results)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
