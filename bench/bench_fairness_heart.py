"""Heart disease per hospital and per sex: DP federated vs local-only vs pooled.

On the four real UCI hospitals that medfed ships, each model is evaluated on each
hospital's own test split, the split the sites themselves use
(``medfed.client.data.split_train_test`` with the run's ``test_fraction`` and seed), per
sex (the ``sex`` column: 0 female, 1 male) and over all four test splits together:

- **federated DP**: the final checkpoint of ``medfed simulate --dataset heart-disease``
  with the CLI's defaults (``DATASET_DEFAULTS['heart-disease']``: epsilon 1, delta 1e-5
  per site, 5 rounds of 2 local epochs, batch 16, learning rate 0.2, logreg, medfed
  secure aggregation), run in process through ``medfed.simulations.runner``;
- **local DP**: each hospital alone on its own training split, with DP-SGD
  (``medfed.client.training.train_dp``) for the same rounds and epochs from the same
  initial model, the noise calibrated as the site calibrates it for the run
  (``calibrate_noise`` at the run's epsilon and delta over all its steps), so each
  spends the same epsilon;
- **local, no DP**: each hospital alone, non-private logistic regression fitted to
  convergence (full-batch L-BFGS, as the pooled reference);
- **pooled, no DP**: the same non-private fit on every hospital's training split
  pooled (``medfed.simulations.reference``'s optimiser).

Metrics per (hospital or all) x (all, female, male): n, positives, AUC, sensitivity and
specificity at a 0.5 threshold, calibration (mean predicted risk minus observed rate).
A group under 10 patients is marked "small n", never hidden: this is public data, but
its figures are anecdotes; a group with fewer than 5 positives (or negatives) is marked
too. A group with one class has no AUC (and no sensitivity or specificity for the
missing class). For the local models, "all hospitals" pools the scores of four different
models (each hospital's own), so its AUC mixes their scales.

The federated run's DP noise comes from torch's default generator in the simulation's
worker processes, whose state depends on how Flower and Ray schedule the sites, so the
federated figures differ a little from run to run; the local DP models are seeded
(``--seed`` plus the hospital's index).

As a check that the split is the sites' own, the federated model's per-hospital AUC and
accuracy computed here are compared with what the sites released in run.json. The run's
model card (model_card.md) is copied next to the JSON.

Usage::

    python bench/bench_fairness_heart.py [--seed 42] [--out PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import default_out, environment, print_table, write_json

NAME = "bench_fairness_heart"
SMALL_N = 10
#: Fewer positives (or negatives) than this in a group: its AUC and sensitivity (or
#: specificity) rest on a handful of patients, and the table says so.
FEW_EVENTS = 5
THRESHOLD = 0.5
MODELS = ("federated DP", "local DP", "local no DP", "pooled no DP")
GROUPS = {"all": None, "female": 0.0, "male": 1.0}
CHECK_TOLERANCE = 1e-6


# -- the federated run ---------------------------------------------------------------


def cli_settings(seed: int, root: Path):
    """The settings `medfed simulate --dataset heart-disease --seed SEED` would use."""
    from medfed.cli.main import DEFAULT_MODEL, run_defaults
    from medfed.common.config import RunSettings

    d = run_defaults("risk", "heart-disease")
    return RunSettings.from_mapping(
        {
            "task": "risk",
            "dataset": "heart-disease",
            "model": DEFAULT_MODEL["risk"],
            "num_rounds": d["rounds"],
            "epsilon": d["epsilon"],
            "delta": 1e-5,
            "seed": seed,
            "local_epochs": d["local_epochs"],
            "batch_size": d["batch_size"],
            "learning_rate": d["learning_rate"],
            "max_grad_norm": 1.0,
            "test_fraction": d["test_fraction"],
            "data_root": str(root / "sites"),
            "out_dir": str(root / "run"),
            "samples_per_patient": 1,
            "secure_agg": "medfed",
        }
    )


def run_federation(settings) -> tuple[dict[str, Any], list[np.ndarray], Path]:
    """Run the federation; return run.json, the final global weights and the run folder."""
    from medfed.server.checkpoint import load_checkpoint
    from medfed.simulations.runner import SimulationPlan, run

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "round-end":
            m = event.get("aggregate_metrics") or {}
            print(
                f"  round {event.get('round')}: {event.get('status')} "
                f"auc={m.get('auc', float('nan')):.4f}",
                flush=True,
            )

    result = run(SimulationPlan(settings=settings, num_sites=4, reference=False), on_event)
    last = [r for r in result.run["rounds"] if r.get("checkpoint")][-1]
    weights, _ = load_checkpoint(result.out_dir / last["checkpoint"], last["model_sha256"])
    return result.run, weights, result.out_dir


# -- the data, split as the sites split it -------------------------------------------


def site_splits(settings) -> dict[str, tuple[Any, Any]]:
    """Each hospital's (train, test) split, read from the run's own site folders."""
    from medfed.client.data import load_site_data, split_train_test
    from medfed.client.site import consent_rules_of
    from medfed.common.tasks import get_task_spec
    from medfed.simulations.heart_disease import HOSPITALS

    spec = get_task_spec("risk", "heart-disease")
    splits = {}
    for i, hospital in enumerate(HOSPITALS):
        site_dir = Path(settings.data_root) / f"site-{i}"
        data = load_site_data(site_dir / spec.csv_name, spec, consent=consent_rules_of(site_dir))
        splits[hospital] = split_train_test(data, settings.test_fraction, settings.seed)
    return splits


def sex_of(X: np.ndarray) -> np.ndarray:
    """The sex feature (0 female, 1 male; a binary column passes through unscaled)."""
    from medfed.common.tasks import HEART_DISEASE_RISK

    return X[:, HEART_DISEASE_RISK.feature_names().index("sex")]


# -- the comparison models ------------------------------------------------------------


def new_model(settings):
    from medfed.common.models import build_model
    from medfed.common.tasks import HEART_DISEASE_RISK

    return build_model(settings.model, HEART_DISEASE_RISK.num_features, settings.seed)


def train_local_dp(train, settings, seed: int) -> tuple[Any, dict[str, Any]]:
    """DP-SGD at one hospital alone, for the run's rounds, at the noise a site would use.

    The rounds are the empirical audit's (``medfed.audit.empirical``): a fresh model per
    round with the last weights, as a site builds one, the draws seeded by ``seed``.
    """
    from medfed.audit.empirical import _train_rounds
    from medfed.common.privacy import calibrate_noise, epsilon_of, steps_per_round
    from medfed.common.tasks import HEART_DISEASE_RISK

    rate, steps = steps_per_round(len(train), settings.batch_size, settings.local_epochs)
    noise = calibrate_noise(settings.epsilon, settings.delta, rate, steps * settings.num_rounds)
    model, spends = _train_rounds(
        settings, HEART_DISEASE_RISK, train.X, train.y, noise, seed, lambda _: None
    )
    return model, {
        "noise_multiplier": noise,
        "epsilon": epsilon_of(spends, settings.delta),
        "steps": sum(s.steps for s in spends),
        "sample_rate": rate,
    }


def train_converged(X: np.ndarray, y: np.ndarray, settings):
    """Non-private logistic regression to convergence (the pooled reference's optimiser)."""
    from medfed.client.training import fit_full_batch
    from medfed.simulations.reference import REFERENCE_ITERATIONS

    model = new_model(settings)
    fit_full_batch(model, X, y, True, REFERENCE_ITERATIONS)
    return model


# -- metrics --------------------------------------------------------------------------


def group_metrics(prob: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """n, positives, AUC, sensitivity, specificity and calibration of one group."""
    from sklearn.metrics import roc_auc_score

    n, positives = len(y), int(y.sum())
    pred = prob >= THRESHOLD
    out: dict[str, Any] = {"n": n, "positives": positives, "small_n": n < SMALL_N}
    out["auc"] = float(roc_auc_score(y, prob)) if 0 < positives < n else None
    out["sensitivity"] = float(pred[y == 1].mean()) if positives else None
    out["specificity"] = float((~pred[y == 0]).mean()) if positives < n else None
    out["accuracy"] = float((pred == (y == 1)).mean()) if n else None
    out["calibration"] = float(prob.mean() - y.mean()) if n else None
    negatives = n - positives
    if n and not 0 < positives < n:
        out["note"] = "one class only: no AUC"
    elif min(positives, negatives) < FEW_EVENTS:
        k = min(positives, negatives)
        fewer = "positive" if positives < negatives else "negative"
        out["note"] = f"only {k} {fewer}{'s' if k != 1 else ''}"
    return out


def evaluate(models: dict[str, Any], splits: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """Each hospital's model on that hospital's test split, per sex, and over all test
    splits together ("all hospitals": the scores pooled, whichever model gave them)."""
    from scipy.special import expit

    from medfed.client.training import predict

    scopes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for hospital, (_, test) in splits.items():
        prob = expit(predict(models[hospital], test.X))
        scopes[hospital] = (prob, test.y, sex_of(test.X))
    parts = zip(*scopes.values(), strict=True)
    scopes["all hospitals"] = tuple(np.concatenate(p) for p in parts)
    return {scope: _by_sex(*arrays) for scope, arrays in scopes.items()}


def check_against_sites(metrics: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The federated model's per-hospital AUC/accuracy here vs what the sites released."""
    last = [r for r in record["rounds"] if r.get("site_metrics")][-1]["site_metrics"]
    checks = {}
    for hospital, report in last.items():
        if "suppressed" in report or hospital not in metrics:
            continue
        mine = metrics[hospital]["all"]
        checks[hospital] = {
            "n_here": mine["n"],
            "n_site": report.get("num_examples"),
            "auc_diff": abs(mine["auc"] - report["auc"]) if "auc" in report else None,
            "accuracy_diff": abs(mine["accuracy"] - report["accuracy"]),
        }
    ok = all(
        c["n_here"] == c["n_site"]
        and (c["auc_diff"] or 0) <= CHECK_TOLERANCE
        and c["accuracy_diff"] <= CHECK_TOLERANCE
        for c in checks.values()
    )
    return {"same_split_and_model": ok and bool(checks), "sites": checks}


def compare(settings, weights, splits) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every model of the comparison, evaluated per hospital and sex."""
    from medfed.common.params import set_weights

    federated = new_model(settings)
    set_weights(federated, weights)
    results = {"federated DP": evaluate(dict.fromkeys(splits, federated), splits)}
    local_dp, local_models, plain_models = {}, {}, {}
    for i, (hospital, (train, _)) in enumerate(splits.items()):
        local_models[hospital], local_dp[hospital] = train_local_dp(
            train, settings, settings.seed + i
        )
        plain_models[hospital] = train_converged(train.X, train.y, settings)
    results["local DP"] = evaluate(local_models, splits)
    results["local no DP"] = evaluate(plain_models, splits)
    X = np.concatenate([train.X for train, _ in splits.values()])
    y = np.concatenate([train.y for train, _ in splits.values()])
    pooled = train_converged(X, y, settings)
    results["pooled no DP"] = evaluate(dict.fromkeys(splits, pooled), splits)
    return results, local_dp


def _by_sex(prob: np.ndarray, y: np.ndarray, sex: np.ndarray) -> dict[str, Any]:
    return {
        group: group_metrics(prob[mask], y[mask])
        for group, value in GROUPS.items()
        for mask in [np.ones(len(y), bool) if value is None else sex == value]
    }


# -- output ---------------------------------------------------------------------------


def print_results(results: dict[str, dict[str, Any]], scopes: list[str]) -> None:
    for scope in scopes:
        rows = []
        for group in GROUPS:
            for model in MODELS:
                m = results[model][scope][group]
                rows.append(
                    [
                        f"{group:6s} {model}",
                        m["n"],
                        m["positives"],
                        m["auc"],
                        m["sensitivity"],
                        m["specificity"],
                        m["calibration"],
                        "; ".join(
                            x for x in ("small n" if m["small_n"] else "", m.get("note", "")) if x
                        ),
                    ]
                )
        print_table(
            f"{scope}: test split, per sex",
            ["group / model", "n", "pos", "AUC", "sens", "spec", "calib", "note"],
            rows,
            digits=3,
        )
    auc_rows = [
        [f"{scope} / {group}", results[MODELS[0]][scope][group]["n"]]
        + [results[model][scope][group]["auc"] for model in MODELS]
        for scope in scopes
        for group in GROUPS
    ]
    print_table("AUC summary", ["hospital / sex", "n", *MODELS], auc_rows, digits=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42, help="the CLI's default seed: 42")
    parser.add_argument("--out", type=Path, default=default_out(NAME))
    args = parser.parse_args()
    env = environment()
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="medfed-bench-fairness-"))
    try:
        settings = cli_settings(args.seed, root)
        print("federated DP run (medfed simulate --dataset heart-disease defaults) ...")
        record, weights, run_dir = run_federation(settings)
        card = run_dir / "model_card.md"
        card_copy = args.out.with_name(f"{NAME}_model_card.md")
        if card.is_file():
            card_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(card, card_copy)
        splits = site_splits(settings)
        results, local_dp = compare(settings, weights, splits)
        check = check_against_sites(results["federated DP"], record)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    scopes = [*splits, "all hospitals"]
    print_results(results, scopes)
    print_table(
        "privacy: epsilon per hospital (delta 1e-5)",
        ["hospital", "fed eps spent", "fed noise", "local DP eps", "local DP noise", "train n"],
        [
            [
                h,
                (record["sites"].get(h) or {}).get("epsilon_spent"),
                (record["sites"].get(h) or {}).get("noise_multiplier"),
                local_dp[h]["epsilon"],
                local_dp[h]["noise_multiplier"],
                len(splits[h][0]),
            ]
            for h in splits
        ],
    )
    print(
        f"\nsplit check (federated model here vs the sites' released metrics): "
        f"{'same' if check['same_split_and_model'] else 'MISMATCH'} {check['sites']}"
    )
    print(f"model card of the run: {card_copy if card_copy.is_file() else 'not written'}")
    write_json(
        args.out,
        {
            "benchmark": NAME,
            "seed": args.seed,
            "settings": {
                k: v for k, v in settings.model_dump().items() if k not in ("data_root", "out_dir")
            },
            "threshold": THRESHOLD,
            "small_n": SMALL_N,
            "few_events": FEW_EVENTS,
            "models": {
                "federated DP": "final checkpoint of the federated run (DP-SGD at every "
                "site, medfed secure aggregation)",
                "local DP": "each hospital alone, DP-SGD, same rounds/epochs/batch/lr and "
                "the site's noise calibration for the run's epsilon",
                "local no DP": "each hospital alone, logistic regression, full-batch "
                "L-BFGS to convergence",
                "pooled no DP": "all hospitals' training splits pooled, full-batch L-BFGS",
            },
            "train_sizes": {h: len(train) for h, (train, _) in splits.items()},
            "results": results,
            "local_dp_privacy": local_dp,
            "federated": {
                "final_metrics": record.get("final_metrics"),
                "sites": record.get("sites"),
                "fairness": record.get("fairness") or {},
            },
            "split_check": check,
            "model_card": str(card_copy) if card_copy.is_file() else None,
            "seconds": time.perf_counter() - started,
            "environment": env,
        },
    )
    sys.exit(0 if check["same_split_and_model"] else 1)


if __name__ == "__main__":
    main()
