"""Utility of the DP federated imaging model against the pooled non-private reference.

Runs the whole federation in process (``medfed.simulations.runner.run``: Flower's
simulation engine, DP-SGD at every site, secure aggregation) on synthetic DICOM hospitals with the
hyperparameters ``medfed simulate --task xray`` uses (``medfed.cli.main.IMAGING_DEFAULTS``)
and trains the pooled non-private CNN on the same training splits.

Target (issue 3): synthetic x-ray task, 3 sites, epsilon <= 8 per site: global AUC
within 0.05 of the pooled non-private reference (gap = pooled - federated).

Usage::

    python bench/bench_imaging_utility.py [--task xray|ct] [--seeds N|a,b,..]
                                          [--set key=value ...] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import default_out, environment, mean_std, print_table, write_json

NAME = "bench_imaging_utility"
SITES = 3
MAX_GAP = 0.05
MAX_EPSILON = 8.0


def parse_seeds(text: str) -> list[int]:
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return [42 + i for i in range(max(1, int(text)))]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (numbers parsed) over the CLI defaults."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            out[key] = int(raw)
        except ValueError:
            out[key] = float(raw)
    return out


def simulate(task: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """One in-process imaging federation; its folders are removed afterwards."""
    from medfed.cli.main import DEFAULT_MODEL, IMAGING_DEFAULTS
    from medfed.common.config import RunSettings
    from medfed.simulations.runner import SimulationPlan, run

    d = {**IMAGING_DEFAULTS[task], **overrides}
    patients = d.pop("patients", None)
    tmp = Path(tempfile.mkdtemp(prefix=f"medfed-bench-{task}-"))
    try:
        settings = RunSettings.from_mapping(
            {
                "task": task,
                "dataset": "synthetic",
                "model": DEFAULT_MODEL[task],
                "num_rounds": int(d["rounds"]),
                "epsilon": float(d["epsilon"]),
                "seed": seed,
                "local_epochs": int(d["local_epochs"]),
                "batch_size": int(d["batch_size"]),
                "learning_rate": float(d["learning_rate"]),
                "max_grad_norm": float(d.get("max_grad_norm", 1.0)),
                "test_fraction": float(d["test_fraction"]),
                "data_root": str(tmp / "sites"),
                "out_dir": str(tmp / "run"),
            }
        )
        plan = SimulationPlan(
            settings=settings,
            num_sites=SITES,
            reference=True,
            patients_per_site=int(patients) if patients else None,
        )

        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "round-end":
                m = event.get("aggregate_metrics") or {}
                print(
                    f"    round {event.get('round')}: {event.get('status')} "
                    f"auc={m.get('auc', float('nan')):.4f}",
                    flush=True,
                )

        started = time.perf_counter()
        result = run(plan, on_event=on_event)
        record = result.run
        return {
            "task": task,
            "seed": seed,
            "settings": {
                k: v for k, v in settings.model_dump().items() if k not in ("data_root", "out_dir")
            },
            "patients_per_site": patients,
            "federated_auc": (record.get("final_metrics") or {}).get("auc"),
            "pooled_auc": (result.reference or {}).get("auc"),
            "final_metrics": record.get("final_metrics") or {},
            "pooled_reference": result.reference,
            "max_epsilon_spent": max(s["epsilon_spent"] for s in record["sites"].values()),
            "seconds": time.perf_counter() - started,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("xray", "ct"), default="xray")
    parser.add_argument("--seeds", default="1", help="N seeds from 42, or a,b,c")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="one seed (the default)")
    parser.add_argument("--out", type=Path, default=default_out(NAME))
    args = parser.parse_args()
    seeds = parse_seeds("1" if args.quick else args.seeds)
    overrides = parse_overrides(args.set)
    runs = []
    for seed in seeds:
        print(f"{args.task}, seed {seed}: {SITES} sites ...", flush=True)
        r = simulate(args.task, seed, overrides)
        fed, ref = r["federated_auc"], r["pooled_auc"]
        r["gap"] = ref - fed if fed is not None and ref is not None else None
        runs.append(r)
    gap_mean, gap_std = mean_std([r["gap"] for r in runs])
    eps = max(r["max_epsilon_spent"] for r in runs)
    passed = gap_mean is not None and gap_mean <= MAX_GAP and eps <= MAX_EPSILON + 1e-9
    rows = [
        [
            r["seed"],
            r["federated_auc"],
            r["pooled_auc"],
            r["gap"],
            r["max_epsilon_spent"],
            r["seconds"],
        ]
        for r in runs
    ]
    if len(runs) > 1:
        rows.append(
            [
                "mean",
                *mean_std([r["federated_auc"] for r in runs])[:1],
                mean_std([r["pooled_auc"] for r in runs])[0],
                gap_mean,
                None,
                None,
            ]
        )
        rows.append(["std", None, None, gap_std, None, None])
    print_table(
        f"synthetic {args.task}, {SITES} sites, DP federated vs pooled non-private: global AUC",
        ["seed", "federated DP AUC", "pooled AUC", "gap", "max eps spent", "seconds"],
        rows,
    )
    verdict = "PASS" if passed else "FAIL"
    print(f"\ntarget: gap <= {MAX_GAP} at epsilon <= {MAX_EPSILON}: {verdict}")
    write_json(
        args.out,
        {
            "environment": environment(),
            "task": args.task,
            "target": {"max_gap": MAX_GAP, "max_epsilon": MAX_EPSILON},
            "gap_mean": gap_mean,
            "gap_std": gap_std,
            "passed": passed,
            "overrides": overrides,
            "runs": runs,
        },
    )
    print(f"wrote {args.out}")
    sys.exit(0)


if __name__ == "__main__":
    main()
