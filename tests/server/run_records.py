"""A realistic run record for tests of what is built from run.json (the model card).

Four heart-disease hospitals over two rounds: cleveland and hungarian train and release
their test metrics (hungarian's test split is small), switzerland trains but its
metrics are suppressed (test split below its minimum cohort), va declines every round
on its privacy budget. With ``fairness=True`` the record carries per-sex group metrics
in the shape :func:`medfed.server.fairness.combine` writes, one group suppressed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medfed.common.config import RunSettings
from medfed.server.checkpoint import save_checkpoint
from medfed.server.run_record import RoundRecord, RunRecord, SiteSummary

SUPPRESSION = "test split of 14 is below the minimum cohort | policy min 20"
DECLINE = "privacy budget: epsilon 9.990 of 10 is spent"
FINAL = {
    "loss": 0.52,
    "sites": 2,
    "patients": 130,
    "accuracy": 0.79,
    "mean_site_accuracy": 0.77,
    "auc": 0.84,
    "mean_site_auc": 0.83,
}


def _site_metrics() -> dict[str, dict[str, Any]]:
    return {
        "cleveland": {
            "num_examples": 103,
            "loss": 0.5,
            "site-id": "cleveland",
            "accuracy": 0.8,
            "auc": 0.86,
        },
        "hungarian": {
            "num_examples": 27,
            "loss": 0.6,
            "site-id": "hungarian",
            "accuracy": 0.74,
            "auc": 0.80,
        },
        "switzerland": {
            "num_examples": 0,
            "loss": 0.0,
            "site-id": "switzerland",
            "suppressed": SUPPRESSION,
        },
        "va": {"num_examples": 0, "loss": 0.0, "site-id": "va", "suppressed": "not evaluated"},
    }


def _sites() -> dict[str, SiteSummary]:
    return {
        "cleveland": SiteSummary("cleveland", 0.98, 10.0, 1.21, 303, 0, 2, 0),
        "hungarian": SiteSummary("hungarian", 0.97, 10.0, 1.30, 290, 4, 2, 0),
        "switzerland": SiteSummary("switzerland", 2.4, 10.0, 1.9, 123, 0, 2, 0),
        "va": SiteSummary("va", 9.99, 10.0, 0.0, 200, 0, 0, 2),
    }


def fairness_record() -> dict[str, Any]:
    """Per-sex metrics as the coordinator combines them (female suppressed at hungarian)."""
    female = {
        "n": 31,
        "sites": ["cleveland"],
        "positives": 9,
        "auc": 0.81,
        "auc_method": "the one site's AUC",
        "sensitivity": 0.56,
        "specificity": 0.91,
        "observed_rate": 0.29,
        "mean_predicted": 0.33,
        "calibration_gap": 0.04,
        "ece": 0.08,
    }
    male = {
        "n": 99,
        "sites": ["cleveland", "hungarian"],
        "positives": 52,
        "auc": 0.83,
        "auc_method": "n-weighted mean of per-site AUCs",
        "sensitivity": 0.81,
        "specificity": 0.72,
        "observed_rate": 0.53,
        "mean_predicted": 0.49,
        "calibration_gap": -0.04,
        "ece": 0.07,
    }
    return {
        "attributes": ["sex"],
        "kind": "binary",
        "threshold": 0.5,
        "groups": {"sex=female": female, "sex=male": male},
        "by_site": {
            "cleveland": {"sex=female": {**female, "sites": []}, "sex=male": {"n": 72}},
            "hungarian": {"sex=male": {"n": 27}},
        },
        "gaps": {
            "sex": {
                "auc": 0.02,
                "sensitivity": 0.25,
                "specificity": 0.19,
                "calibration_gap": 0.08,
                "ece": 0.01,
                "worst_group": {"auc": "sex=female", "sensitivity": "sex=female"},
            }
        },
        "suppressed": {"hungarian": ["sex=female"]},
        "unavailable": {},
        "not_reported": {"switzerland": SUPPRESSION},
        "ignored": {},
        "note": "AUC is the n-weighted mean of per-site AUCs (not a pooled AUC).",
    }


def realistic_record(out_dir: Path, fairness: bool = False) -> RunRecord:
    """The record of a finished two-round run whose checkpoints exist under ``out_dir``."""
    settings = RunSettings(
        task="risk",
        dataset="heart-disease",
        num_rounds=2,
        epsilon=1.0,
        data_root=str(out_dir / "sites"),
        out_dir=str(out_dir),
        test_fraction=0.34,
    )
    record = RunRecord(
        run_id="heart-run",
        settings=settings.model_dump(),
        secure_aggregation={"protocol": "medfed", "note": "X25519 | ChaCha20 masks"},
        started=1_800_000_000.0,
        finished=1_800_000_100.0,
        status="completed",
        flower_run_id="123",
        sites=_sites(),
        final_metrics=dict(FINAL),
    )
    for n in (1, 2):
        weights = [np.full((1, 32), 0.1 * n, np.float32), np.zeros(1, np.float32)]
        path, digest = save_checkpoint(out_dir, n, weights, {"task": "risk"})
        record.rounds.append(
            RoundRecord(
                round=n,
                status="aggregated",
                participants=["cleveland", "hungarian", "switzerland"],
                declined={"va": DECLINE},
                aggregate_metrics=dict(FINAL),
                site_metrics=_site_metrics(),
                checkpoint=str(path.relative_to(out_dir)),
                model_sha256=digest,
            )
        )
    if fairness:
        record.fairness = fairness_record()
    return record
