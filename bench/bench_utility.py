"""Utility of the DP federated model against the pooled non-private reference.

Runs the whole federation in process (``medfed.simulations.runner.run`` with the
Flower simulation engine, DP-SGD at every site and medfed secure aggregation), with the
hyperparameters ``medfed simulate`` uses for each dataset
(``medfed.cli.main.DATASET_DEFAULTS``), and the pooled reference (``reference=True``):

- ``synthetic``: 3 synthetic hospitals, epsilon 3 (delta 1e-5) per site. Figure: the
  global AUC over all sites' test splits (``final_metrics['auc']``) next to the pooled
  reference's; target: gap (pooled - federated) <= 0.03.
- ``heart-disease``: the 4 real UCI hospitals, epsilon 1 (delta 1e-5) per site. Figure:
  the mean of the per-site test accuracies (``final_metrics['mean_site_accuracy']``,
  FLamby's headline metric); target >= 0.70. Printed next to FLamby's published
  figures (simulations/data/uci-heart-disease/README.md) and the pooled reference.

``--seeds N`` runs seeds 42, 43, ... (N of them; 42 is the CLI default); ``--seeds
1,7,9`` runs exactly those. With several seeds, mean and standard deviation are
reported. The seed sets data generation (synthetic), the per-site splits and the model
initialisation.

Usage::

    python bench/bench_utility.py [--dataset synthetic|heart-disease|both] [--seeds N|a,b,..]
                                  [--quick] [--out PATH]
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

NAME = "bench_utility"
SYNTHETIC_SITES = 3
SYNTHETIC_MAX_GAP = 0.03
HEART_MIN_ACCURACY = 0.70

#: FLamby (du Terrail et al., NeurIPS 2022), Fed-Heart-Disease, mean accuracy over the
#: four sites' test sets, logistic regression; from simulations/data/uci-heart-disease/README.md.
FLAMBY_HEART = [
    ("FLamby pooled (no DP)", 0.735),
    ("FLamby local models", "0.57-0.72"),
    ("FLamby FedAvg (benchmark, no DP)", 0.685),
    ("FLamby FedAvg + DP-SGD, eps 1 (delta 1e-3)", 0.7015),
    ("FLamby FedAvg, same DP study without DP", 0.7125),
]


def parse_seeds(text: str) -> list[int]:
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return [42 + i for i in range(count)]


def simulate(
    dataset: str,
    seed: int,
    overrides: dict[str, Any] | None = None,
    reference: bool = True,
    num_sites: int = SYNTHETIC_SITES,
    progress: bool = True,
) -> dict[str, Any]:
    """One in-process federation with the CLI's defaults for ``dataset`` (+ overrides).

    Returns the settings used, the final metrics, the pooled reference, the sites'
    privacy spend and the seconds taken. The run's folders are removed afterwards.
    """
    from medfed.cli.main import DATASET_DEFAULTS
    from medfed.common.config import RunSettings
    from medfed.simulations.runner import SimulationPlan, run

    d = dict(DATASET_DEFAULTS[dataset])
    d.update(overrides or {})
    tmp = Path(tempfile.mkdtemp(prefix=f"medfed-bench-{dataset}-"))
    try:
        settings = RunSettings.from_mapping(
            {
                "task": "risk",
                "dataset": dataset,
                "model": d.get("model", "logreg"),
                "num_rounds": d["rounds"],
                "epsilon": d["epsilon"],
                "delta": d.get("delta", 1e-5),
                "seed": seed,
                "local_epochs": d["local_epochs"],
                "batch_size": d["batch_size"],
                "learning_rate": d["learning_rate"],
                "max_grad_norm": d.get("max_grad_norm", 1.0),
                "test_fraction": d["test_fraction"],
                "data_root": str(tmp / "sites"),
                "out_dir": str(tmp / "run"),
            }
        )
        plan = SimulationPlan(settings=settings, num_sites=num_sites, reference=reference)

        def on_event(event: dict[str, Any]) -> None:
            if progress and event.get("event") == "round-end":
                m = event.get("aggregate_metrics") or {}
                if event.get("status") != "aggregated":
                    print(
                        f"    round {event.get('round')}: {event.get('status')}: "
                        f"note={event.get('note')!r} declined={event.get('declined')} "
                        f"dropped={event.get('dropped')}",
                        flush=True,
                    )
                print(
                    f"    round {event.get('round')}: {event.get('status')} "
                    f"auc={m.get('auc', float('nan')):.4f} "
                    f"mean_site_accuracy={m.get('mean_site_accuracy', float('nan')):.4f}",
                    flush=True,
                )

        started = time.perf_counter()
        result = run(plan, on_event=on_event)
        seconds = time.perf_counter() - started
        record = result.run
        return {
            "dataset": dataset,
            "seed": seed,
            "settings": {
                k: v for k, v in settings.model_dump().items() if k not in ("data_root", "out_dir")
            },
            "final_metrics": record.get("final_metrics") or {},
            "rounds": [
                {
                    "round": r.get("round"),
                    "status": r.get("status"),
                    "note": r.get("note"),
                    "participants": r.get("participants"),
                    "declined": r.get("declined"),
                    "dropped": r.get("dropped"),
                    "aggregate_metrics": r.get("aggregate_metrics"),
                    "site_metrics": r.get("site_metrics"),
                }
                for r in record.get("rounds", [])
            ],
            "sites": record.get("sites"),
            "pooled_reference": result.reference,
            "seconds_flower": result.seconds,
            "seconds_total": seconds,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_synthetic(seeds: list[int]) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        print(f"synthetic, seed {seed}: {SYNTHETIC_SITES} sites ...", flush=True)
        r = simulate("synthetic", seed)
        fed = r["final_metrics"].get("auc")
        ref = (r["pooled_reference"] or {}).get("auc")
        r["federated_auc"], r["pooled_auc"] = fed, ref
        r["gap"] = ref - fed if fed is not None and ref is not None else None
        runs.append(r)
    fed_mean, fed_std = mean_std([r["federated_auc"] for r in runs])
    ref_mean, ref_std = mean_std([r["pooled_auc"] for r in runs])
    gap_mean, gap_std = mean_std([r["gap"] for r in runs])
    passed = gap_mean is not None and gap_mean <= SYNTHETIC_MAX_GAP
    rows = [
        [
            r["seed"],
            r["federated_auc"],
            r["pooled_auc"],
            r["gap"],
            r["final_metrics"].get("mean_site_auc"),
            (r["pooled_reference"] or {}).get("mean_site_auc"),
            max(s["epsilon_spent"] for s in r["sites"].values()),
            r["seconds_total"],
        ]
        for r in runs
    ]
    if len(runs) > 1:
        rows.append(["mean", fed_mean, ref_mean, gap_mean, None, None, None, None])
        rows.append(["std", fed_std, ref_std, gap_std, None, None, None, None])
    print_table(
        f"synthetic risk, {SYNTHETIC_SITES} sites, epsilon 3 / delta 1e-5 per site "
        "(CLI defaults): global AUC",
        [
            "seed",
            "federated DP AUC",
            "pooled AUC",
            "gap",
            "fed mean-site AUC",
            "pooled mean-site AUC",
            "max eps spent",
            "seconds",
        ],
        rows,
    )
    print_table(
        "synthetic verdict",
        ["metric", "value", "target", "pass"],
        [["AUC gap (pooled - federated)", gap_mean, f"<= {SYNTHETIC_MAX_GAP}", passed]],
    )
    return {
        "target": f"gap <= {SYNTHETIC_MAX_GAP}",
        "passed": passed,
        "federated_auc_mean": fed_mean,
        "federated_auc_std": fed_std,
        "pooled_auc_mean": ref_mean,
        "pooled_auc_std": ref_std,
        "gap_mean": gap_mean,
        "gap_std": gap_std,
        "runs": runs,
    }


def bench_heart(seeds: list[int]) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        print(f"heart-disease, seed {seed}: 4 real sites ...", flush=True)
        r = simulate("heart-disease", seed)
        r["federated_mean_site_accuracy"] = r["final_metrics"].get("mean_site_accuracy")
        r["pooled_mean_site_accuracy"] = (r["pooled_reference"] or {}).get("mean_site_accuracy")
        runs.append(r)
    fed_mean, fed_std = mean_std([r["federated_mean_site_accuracy"] for r in runs])
    ref_mean, ref_std = mean_std([r["pooled_mean_site_accuracy"] for r in runs])
    passed = fed_mean is not None and fed_mean >= HEART_MIN_ACCURACY
    per_seed = [
        [
            r["seed"],
            r["federated_mean_site_accuracy"],
            r["pooled_mean_site_accuracy"],
            r["final_metrics"].get("accuracy"),
            r["final_metrics"].get("auc"),
            max(s["epsilon_spent"] for s in r["sites"].values()),
            r["seconds_total"],
        ]
        for r in runs
    ]
    if len(runs) > 1:
        per_seed.append(["mean", fed_mean, ref_mean, None, None, None, None])
        per_seed.append(["std", fed_std, ref_std, None, None, None, None])
    print_table(
        "heart-disease, 4 real sites, epsilon 1 / delta 1e-5 per site (CLI defaults)",
        [
            "seed",
            "fed DP mean-site acc",
            "pooled mean-site acc",
            "fed pooled-test acc",
            "fed AUC",
            "max eps spent",
            "seconds",
        ],
        per_seed,
    )
    last = runs[-1]
    final_sites = (last["rounds"][-1].get("site_metrics") or {}) if last["rounds"] else {}
    if final_sites:
        print_table(
            f"heart-disease per-site test accuracy, seed {last['seed']} (final round)",
            ["site", "test patients", "accuracy", "auc"],
            [
                [k, v.get("num_examples"), v.get("accuracy"), v.get("auc")]
                for k, v in sorted(final_sites.items())
            ],
        )
    comparison = [
        [
            "medfed FedAvg + DP-SGD + secure agg., eps 1 (delta 1e-5)",
            fed_mean if len(runs) == 1 else f"{fed_mean:.4f} +- {fed_std:.4f}",
        ],
        [
            "medfed pooled reference (no DP, converged)",
            ref_mean if len(runs) == 1 else f"{ref_mean:.4f} +- {ref_std:.4f}",
        ],
        *[[name, value] for name, value in FLAMBY_HEART],
    ]
    print_table(
        "heart-disease: mean per-site test accuracy, medfed vs FLamby (published)",
        ["model", "mean-site accuracy"],
        comparison,
    )
    print_table(
        "heart-disease verdict",
        ["metric", "value", "target", "pass"],
        [["mean per-site accuracy (DP, eps 1)", fed_mean, f">= {HEART_MIN_ACCURACY}", passed]],
    )
    return {
        "target": f"mean_site_accuracy >= {HEART_MIN_ACCURACY}",
        "passed": passed,
        "federated_mean_site_accuracy_mean": fed_mean,
        "federated_mean_site_accuracy_std": fed_std,
        "pooled_mean_site_accuracy_mean": ref_mean,
        "pooled_mean_site_accuracy_std": ref_std,
        "flamby_published": {name: value for name, value in FLAMBY_HEART},
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("synthetic", "heart-disease", "both"), default="both")
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=[42],
        help="a count (seeds 42, 43, ...) or a comma list (default: 1 -> 42)",
    )
    parser.add_argument("--quick", action="store_true", help="one seed (the default)")
    parser.add_argument("--out", type=Path, default=default_out(NAME))
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds

    from medfed.cli.main import DATASET_DEFAULTS

    results: dict[str, Any] = {
        "benchmark": NAME,
        "seeds": seeds,
        "dataset_defaults": DATASET_DEFAULTS,
    }
    if args.dataset in ("synthetic", "both"):
        results["synthetic"] = bench_synthetic(seeds)
    if args.dataset in ("heart-disease", "both"):
        results["heart_disease"] = bench_heart(seeds)
    results["environment"] = environment()
    write_json(args.out, results)
    sys.exit(0)


if __name__ == "__main__":
    main()
