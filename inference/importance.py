"""Global importance of each input, computed at a site on its own held-out patients.

The held-out split is the one training used: :func:`split_train_test` with the run's
``test_fraction`` and ``seed`` (from run.json; with only a checkpoint, its seed and a
given test fraction), over the site's CSV read under its policy (``on_bad_row``) and its
consent rules (:func:`consent_rules_of`: a withdrawn patient is never read). When
the site's ledger recorded the run, the training part's fingerprint is compared with
the ledger's, so a changed dataset is noticed.

- Linear model: its coefficients (ranked by magnitude), plus permutation importance.
- MLP: permutation importance.

Permutation importance permutes all the encoded features of one input column together
(the one-hot categories and missing indicator of a column move as one, which
``sklearn.inspection.permutation_importance`` cannot do), ``repeats`` times with a
seeded generator, and reports the mean ± std drop of the score: AUC for risk, negative
MAE in clinical units for rehab (both computed with scikit-learn).

Only aggregates: the site refuses when the held-out split is below its policy's
``min_cohort`` or its policy does not allow the model's task or model family. The
result is written at the site (``explanations/importance-<model hash>.json``); nothing
is sent anywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.data import (
    DataError,
    SiteData,
    decode_target,
    fingerprint,
    load_site_data,
    split_train_test,
)
from medfed.client.policy import POLICY_NAME, PolicyError, SitePolicy, load_policy
from medfed.client.site import consent_rules_of
from medfed.common.atomic import atomic_write_json
from medfed.common.ledger import LEDGER_NAME, LedgerError, read_ledger
from medfed.common.tasks import TaskSpec
from medfed.inference.contributions import column_slices
from medfed.inference.errors import PredictError
from medfed.inference.model_file import LoadedModel
from medfed.inference.tabular import build_network, raw_outputs, tabular_spec

EXPLANATIONS_DIR = "explanations"


@dataclass(frozen=True)
class ColumnImportance:
    """Mean and std (over repeats) of the score drop when ``column`` is permuted."""

    column: str
    mean: float
    std: float


@dataclass
class ImportanceReport:
    """What `medfed explain --site` computes; every figure is over the held-out split."""

    model: dict[str, Any]
    site_id: str
    score: str
    baseline_score: float
    held_out_patients: int
    min_cohort: int
    test_fraction: float
    seed: int
    repeats: int
    permutation: list[ColumnImportance]
    coefficients: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def site_importance(
    model: LoadedModel,
    site_dir: Path,
    test_fraction: float | None = None,
    repeats: int = 10,
    seed: int = 0,
) -> ImportanceReport:
    """Compute the model's global importance on ``site_dir``'s held-out patients."""
    if model.is_imaging:
        raise PredictError(
            f"{model.checkpoint}: {model.describe()} is an imaging model; explain an image "
            "with `medfed predict MODEL DICOM --explain` (Grad-CAM saliency)"
        )
    spec = tabular_spec(model)
    policy = _policy(site_dir, model)
    fraction, split_seed, notes = _split_settings(model, test_fraction)
    try:
        data = load_site_data(
            site_dir / spec.csv_name,
            spec,
            strict=policy.on_bad_row == "error",
            consent=consent_rules_of(site_dir, policy),
        )
    except DataError as exc:
        raise PredictError(str(exc)) from None
    train, test = split_train_test(data, fraction, split_seed)
    if len(test) < policy.min_cohort:
        raise PredictError(
            f"{site_dir}: the held-out split has {len(test)} patients, below the site's "
            f"minimum cohort {policy.min_cohort} ({POLICY_NAME}); importance is computed "
            "only over at least that many patients"
        )
    notes += _ledger_check(site_dir, model, train)
    net = build_network(model, spec)
    scorer, score_name = _scorer(spec)
    slices = column_slices(spec)
    outputs = raw_outputs(net, test.X)
    baseline = scorer(test, outputs)
    if not np.isfinite(baseline):
        raise PredictError(
            f"{site_dir}: {score_name} is undefined on the held-out split (one outcome class)"
        )
    rng = np.random.default_rng(seed)
    permutation = [
        _permuted(net, test, name, where, scorer, baseline, repeats, rng)
        for name, where in slices.items()
    ]
    permutation.sort(key=lambda c: -c.mean)
    return ImportanceReport(
        model=model.summary(),
        site_id=policy.site_id,
        score=score_name,
        baseline_score=float(baseline),
        held_out_patients=len(test),
        min_cohort=policy.min_cohort,
        test_fraction=fraction,
        seed=split_seed,
        repeats=repeats,
        permutation=permutation,
        coefficients=_coefficients(spec, net) if model.model_name == "logreg" else [],
        notes=notes,
    )


def write_importance(report: ImportanceReport, site_dir: Path) -> Path:
    """Write the report at the site, atomically; return its path."""
    path = site_dir / EXPLANATIONS_DIR / f"importance-{report.model['sha256'][:16]}.json"
    atomic_write_json(path, report.to_dict())
    return path


def _policy(site_dir: Path, model: LoadedModel) -> SitePolicy:
    try:
        policy = load_policy(site_dir / POLICY_NAME)
    except PolicyError as exc:
        raise PredictError(str(exc)) from None
    if model.task not in policy.allowed_tasks or model.model_name not in policy.allowed_models:
        raise PredictError(
            f"{site_dir / POLICY_NAME}: the site policy does not allow {model.describe()}"
        )
    return policy


def _split_settings(
    model: LoadedModel, test_fraction: float | None
) -> tuple[float, int, list[str]]:
    """The held-out split's test fraction and seed, and where they came from."""
    recorded = model.settings.get("test_fraction")
    seed = int(model.settings.get("seed", model.meta.get("seed", 0)))
    if isinstance(recorded, (int, float)):
        if test_fraction is not None and abs(test_fraction - recorded) > 1e-12:
            raise PredictError(
                f"--test-fraction {test_fraction:g} differs from the run's {recorded:g} "
                f"(run.json in {model.run_dir}): the held-out split must be training's"
            )
        return float(recorded), seed, [f"split: test_fraction and seed from {model.run_dir}"]
    if test_fraction is None:
        raise PredictError(
            f"{model.checkpoint}: no run.json records this model's split; pass "
            "--test-fraction (the run's test fraction) so that the held-out patients are "
            "the ones training left out"
        )
    if not 0 < test_fraction < 1:
        raise PredictError(f"--test-fraction must be between 0 and 1, got {test_fraction:g}")
    return test_fraction, seed, ["split: seed from the checkpoint, test fraction as given"]


def _ledger_check(site_dir: Path, model: LoadedModel, train: SiteData) -> list[str]:
    """A note on whether the training split matches the one the site's ledger recorded."""
    if not model.run_id:
        return []
    try:
        entries = read_ledger(site_dir / LEDGER_NAME)
    except LedgerError as exc:
        return [f"ledger not checked: {exc}"]
    recorded = {
        e.dataset_fingerprint for e in entries if e.run_id == model.run_id and e.kind == "train"
    }
    if not recorded:
        return [f"the site's ledger has no training entry for run {model.run_id}"]
    if fingerprint(train) in recorded:
        return ["training split matches the site's ledger for this run"]
    return [
        f"warning: the site's data changed since run {model.run_id} (training split "
        "fingerprint differs from the ledger): held-out patients may differ from training's"
    ]


def _scorer(spec: TaskSpec):
    """Score function (higher is better) over a split and raw outputs, and its name."""
    from sklearn.metrics import mean_absolute_error, roc_auc_score

    if spec.is_binary:

        def auc(data: SiteData, out: np.ndarray) -> float:
            if len(np.unique(data.y)) < 2:
                return float("nan")
            return float(roc_auc_score(data.y, out))

        return auc, "auc"

    def neg_mae(data: SiteData, out: np.ndarray) -> float:
        return -float(mean_absolute_error(decode_target(spec, data.y), decode_target(spec, out)))

    return neg_mae, f"neg_mae ({spec.target.name} units)"


def _permuted(
    net, test: SiteData, column: str, where: slice, scorer, baseline: float, repeats: int, rng
) -> ColumnImportance:
    drops = []
    for _ in range(repeats):
        X = test.X.copy()
        X[:, where] = test.X[rng.permutation(len(test))][:, where]
        drops.append(baseline - scorer(test, raw_outputs(net, X)))
    return ColumnImportance(column, float(np.mean(drops)), float(np.std(drops)))


def _coefficients(spec: TaskSpec, net) -> list[dict[str, Any]]:
    """The linear model's coefficients per encoded feature, largest magnitude first.

    On the logit scale for risk, in target units (per encoded unit) for rehab; a numeric
    input's encoded unit is half its public range.
    """
    span = spec.target_span
    weight = net.linear.weight.detach().numpy()[0].astype(float) * span
    rows = [
        {"feature": name, "coefficient": float(w)}
        for name, w in zip(spec.feature_names(), weight, strict=True)
    ]
    return sorted(rows, key=lambda r: -abs(r["coefficient"]))
