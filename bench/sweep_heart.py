"""Small hyperparameter sweep for heart-disease at epsilon 1 (logreg, DP-SGD + secure aggregation).

Each combination is one in-process federation (``medfed.simulations.runner.run``, the
same path as ``medfed simulate --dataset heart-disease``), without the pooled reference
to save time. Everything not swept comes from ``DATASET_DEFAULTS['heart-disease']``
(epsilon 1, test_fraction 0.34); delta is 1e-5 as in the CLI. The figure is FLamby's:
the mean over the four sites of the test accuracy (``final_metrics['mean_site_accuracy']``),
target >= 0.70.

The grid is rounds {3,5,10} x batch_size {8,16,32} x learning_rate {0.05,0.1,0.2,0.5} x
local_epochs {1,2,3}; a full sweep (108 runs, ~1 min each) is too slow, so a fixed list
of combinations is run (``--combos`` replaces it: "rounds,batch,lr,epochs;...").
Results are written after every combination, so an interrupted sweep keeps what it has.

Usage::

    python bench/sweep_heart.py [--seeds N|a,b,..] [--combos "5,16,0.2,2;3,32,0.5,1"]
                                [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from _common import default_out, environment, mean_std, print_table, write_json
from bench_utility import HEART_MIN_ACCURACY, parse_seeds, simulate

NAME = "sweep_heart"

#: (rounds, batch_size, learning_rate, local_epochs); the first is the CLI default.
COMBOS: list[tuple[int, int, float, int]] = [
    (5, 16, 0.2, 2),  # CLI default
    (5, 32, 0.5, 2),
    (5, 32, 0.2, 1),
    (3, 32, 0.5, 1),
    (3, 16, 0.5, 1),
    (10, 32, 0.5, 1),
    (10, 16, 0.1, 1),
    (5, 8, 0.05, 2),
    (5, 16, 0.5, 1),
    (3, 32, 0.5, 3),
    (10, 32, 0.2, 2),
    (3, 8, 0.1, 1),
]
QUICK_COMBOS = COMBOS[:4]


def parse_combos(text: str) -> list[tuple[int, int, float, int]]:
    combos = []
    for part in text.split(";"):
        if part.strip():
            r, b, lr, e = (x.strip() for x in part.split(","))
            combos.append((int(r), int(b), float(lr), int(e)))
    return combos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=parse_seeds, default=[42])
    parser.add_argument("--combos", type=parse_combos, default=None)
    parser.add_argument("--model", default="logreg", choices=("logreg", "mlp"))
    parser.add_argument("--quick", action="store_true", help=f"first {len(QUICK_COMBOS)} combos")
    parser.add_argument("--out", type=Path, default=default_out(NAME))
    args = parser.parse_args()
    combos = args.combos or (QUICK_COMBOS if args.quick else COMBOS)
    env = environment()

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, (rounds, batch, lr, epochs) in enumerate(combos, 1):
        overrides = {
            "rounds": rounds,
            "batch_size": batch,
            "learning_rate": lr,
            "local_epochs": epochs,
            "model": args.model,
        }
        runs = []
        for seed in args.seeds:
            print(
                f"[{i}/{len(combos)}] rounds={rounds} batch={batch} lr={lr} "
                f"epochs={epochs} seed={seed} ...",
                flush=True,
            )
            try:
                r = simulate("heart-disease", seed, overrides, reference=False, progress=False)
            except Exception as exc:
                print(f"  failed: {exc}", flush=True)
                runs.append({"seed": seed, "error": str(exc)[:500]})
                continue
            last = r["rounds"][-1] if r["rounds"] else {}
            runs.append(
                {
                    "seed": seed,
                    "mean_site_accuracy": r["final_metrics"].get("mean_site_accuracy"),
                    "accuracy": r["final_metrics"].get("accuracy"),
                    "auc": r["final_metrics"].get("auc"),
                    "site_accuracy": {
                        k: v.get("accuracy") for k, v in (last.get("site_metrics") or {}).items()
                    },
                    "noise_multiplier": {
                        k: v.get("noise_multiplier") for k, v in (r["sites"] or {}).items()
                    },
                    "epsilon_spent_max": max(
                        (v.get("epsilon_spent", 0) for v in (r["sites"] or {}).values()),
                        default=None,
                    ),
                    "seconds": r["seconds_total"],
                }
            )
            print(f"  mean_site_accuracy={runs[-1]['mean_site_accuracy']:.4f}", flush=True)
        mean, std = mean_std([x.get("mean_site_accuracy") for x in runs])
        rows.append(
            {
                "rounds": rounds,
                "batch_size": batch,
                "learning_rate": lr,
                "local_epochs": epochs,
                "model": args.model,
                "mean_site_accuracy_mean": mean,
                "mean_site_accuracy_std": std,
                "meets_target": mean is not None and mean >= HEART_MIN_ACCURACY,
                "runs": runs,
            }
        )
        write_json(
            args.out,
            {
                "benchmark": NAME,
                "epsilon": 1.0,
                "delta": 1e-5,
                "seeds": args.seeds,
                "target": f"mean_site_accuracy >= {HEART_MIN_ACCURACY}",
                "complete": i == len(combos),
                "seconds": time.perf_counter() - started,
                "results": rows,
                "environment": env,
            },
        )

    def site_acc(row: dict[str, Any]) -> str:
        accs = [x.get("site_accuracy") or {} for x in row["runs"] if "error" not in x]
        if not accs:
            return "-"
        last = accs[-1]
        return " ".join(f"{k.split('-')[0][:5]}={v:.2f}" for k, v in sorted(last.items()))

    def noise(row: dict[str, Any]) -> str:
        ok = [x for x in row["runs"] if "error" not in x]
        if not ok:
            return "-"
        values = [v for v in ok[-1]["noise_multiplier"].values() if v is not None]
        return f"{min(values):.2f}-{max(values):.2f}" if values else "-"

    ordered = sorted(rows, key=lambda r: -(r["mean_site_accuracy_mean"] or 0))
    print_table(
        f"heart-disease sweep, epsilon 1 / delta 1e-5, {args.model}, seeds {args.seeds} "
        f"(sorted; target mean-site accuracy >= {HEART_MIN_ACCURACY})",
        [
            "rounds",
            "batch",
            "lr",
            "epochs",
            "mean-site acc",
            "std",
            "noise sigma",
            "per-site acc (last seed)",
            "target",
        ],
        [
            [
                r["rounds"],
                r["batch_size"],
                r["learning_rate"],
                r["local_epochs"],
                r["mean_site_accuracy_mean"],
                r["mean_site_accuracy_std"] if len(args.seeds) > 1 else None,
                noise(r),
                site_acc(r),
                r["meets_target"],
            ]
            for r in ordered
        ],
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
