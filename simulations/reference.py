"""The pooled, non-private reference: what one model trained on everyone's data reaches.

Only a simulation can compute this (it reads every site's records in one place); it is
the yardstick for the federated DP model. It uses the same validation, the same
per-site train/test splits and the same per-site metric aggregation as the federated
run, so that the two are compared like for like.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import Code as FlwrCode
from flwr.common import EvaluateRes, Status

from medfed.client.data import DataError, load_site_data, split_train_test
from medfed.client.imaging_data import load_imaging_data, split_by_patient
from medfed.client.site import consent_rules_of
from medfed.client.training import evaluate, fit_full_batch, train_plain
from medfed.common.config import RunSettings
from medfed.common.models import build_model
from medfed.common.tasks import ImagingSpec, get_task_spec
from medfed.server.strategy import weighted_means

REFERENCE_ITERATIONS = 200
MLP_EPOCHS = 30
CNN_EPOCHS = 20
CNN_BATCH = 32
CNN_LEARNING_RATE = 0.1


def pooled_reference(
    site_dirs: list[Path], settings: RunSettings, max_iter: int = REFERENCE_ITERATIONS
) -> dict[str, Any]:
    """Train on the pooled training splits without DP; evaluate on each site's test split."""
    spec = get_task_spec(settings.task, settings.dataset)
    if isinstance(spec, ImagingSpec):
        return _imaging_reference(site_dirs, settings, spec)
    splits, unusable = _site_splits(
        site_dirs,
        lambda d: load_site_data(d / spec.csv_name, spec, consent=consent_rules_of(d)),
        lambda data: split_train_test(data, settings.test_fraction, settings.seed),
    )
    X = np.concatenate([train.X for train, _ in splits])
    y = np.concatenate([train.y for train, _ in splits])
    torch.manual_seed(settings.seed)
    model = build_model(settings.model, spec.num_features, settings.seed)
    if settings.model == "logreg":
        fit_full_batch(model, X, y, spec.is_binary, max_iter)
        how = f"full-batch L-BFGS (convex: converged), up to {max_iter} iterations"
    else:
        train_plain(
            model,
            X,
            y,
            spec.is_binary,
            MLP_EPOCHS,
            batch_size=64,
            learning_rate=0.1,
            seed=settings.seed,
        )
        how = f"mini-batch SGD, {MLP_EPOCHS} epochs, batch 64, learning rate 0.1"
    span = spec.target_span
    tests = [test for _, test in splits]
    return _summarise(model, tests, spec.is_binary, span, how, unusable, len(y))


def _site_splits(
    site_dirs: list[Path], load: Callable[[Path], Any], split: Callable[[Any], tuple[Any, Any]]
) -> tuple[list[tuple[Any, Any]], dict[str, str]]:
    """Each usable site's (train, test) split, and why the others are left out."""
    splits, unusable = [], {}
    for d in site_dirs:
        try:
            splits.append(split(load(d)))
        except DataError as exc:
            unusable[str(d)] = str(exc)
    if not splits:
        raise DataError("pooled reference: no site has usable data")
    return splits, unusable


def _summarise(
    model: torch.nn.Module,
    tests: list,
    binary: bool,
    span: float,
    how: str,
    unusable: dict[str, str],
    train_records: int,
) -> dict[str, Any]:
    """Per-site test metrics aggregated as the federated run aggregates them."""
    results = []
    for test in tests:
        metrics = evaluate(model, test.X, test.y, binary, span)
        loss = metrics.pop("loss")
        results.append(EvaluateRes(Status(FlwrCode.OK, ""), loss, len(test), metrics))
    loss, metrics = weighted_means(results)
    return {
        "loss": loss,
        **metrics,
        "train_records": train_records,
        "optimizer": how,
        "sites_left_out": unusable,
    }


def _imaging_reference(
    site_dirs: list[Path], settings: RunSettings, spec: ImagingSpec
) -> dict[str, Any]:
    """Pooled non-private CNN on every site's training split (same splits as the run)."""
    splits, unusable = _site_splits(
        site_dirs,
        lambda d: load_imaging_data(
            d, spec, settings.samples_per_patient, consent=consent_rules_of(d)
        ),
        lambda data: split_by_patient(data, settings.test_fraction, settings.seed),
    )
    X = np.concatenate([train.X for train, _ in splits])
    y = np.concatenate([train.y for train, _ in splits])
    model = build_model(settings.model, spec.model_input, settings.seed)
    train_plain(
        model,
        X,
        y,
        True,
        CNN_EPOCHS,
        batch_size=CNN_BATCH,
        learning_rate=CNN_LEARNING_RATE,
        seed=settings.seed,
    )
    how = (
        f"mini-batch SGD, {CNN_EPOCHS} epochs, batch {CNN_BATCH}, learning rate {CNN_LEARNING_RATE}"
    )
    tests = [test for _, test in splits]
    return _summarise(model, tests, True, 1.0, how, unusable, len(y))
