"""Per-subgroup evaluation at a site: the global model's metrics per group, aggregates only.

A site splits its test patients by each configured attribute (:mod:`medfed.common.subgroups`)
and computes, per group, the counts and metrics the coordinator needs to pool them
across sites: for a binary task the confusion counts at a 0.5 threshold, AUC, mean
predicted risk, observed rate and expected calibration error; for a regression task
MAE, RMSE and bias in clinical units. For a clinical task the group of each patient is
decoded from the encoded features by the task's public scaling: no other data path,
nothing fitted. For an imaging task it comes from the DICOM header of each test sample
(``ImagingData.sex`` / ``age_years``: Patient's Sex F/M and Patient's Age, banded at the
same edges), with the same group names. A sample whose attribute is unknown belongs to
no group of that attribute; when it is unknown for every test sample (Basic Profile
de-identification removes both), the attribute is reported unavailable, naming the tag.

What may leave: a group's figures only when it holds at least the site's minimum cohort.
A smaller group is listed by name under ``suppressed``, without its size. Because the
site's total test count is released too, withholding one small group is not enough
(its size would be the total minus the released groups), so within an attribute the
site also withholds the smallest released groups until the withheld groups together
hold at least the minimum cohort (or are all empty): every figure that can be derived
from what leaves covers at least the minimum cohort. Samples of unknown attribute count
as withheld there: they too are part of the total minus the released groups.

Released as one string metric, ``fairness`` (:data:`medfed.common.messages.FAIRNESS_KEY`)::

    {"version": 1, "kind": "binary" | "regression", "threshold": 0.5,
     "groups": {"sex=female": {"n", "positives", "tp", "fp", "tn", "fn", "auc",
                               "mean_predicted", "observed_rate", "ece"}, ...},
     "suppressed": ["sex=male", ...]}

(regression groups hold ``n``, ``mae``, ``rmse``, ``bias``). An attribute a site cannot
split by is named with why under ``unavailable_attributes`` ({"sex": "Patient's Sex
(0010,0040) absent ..."}); ``unavailable`` repeats the reasons as one string
("sex: ...; age: ..."), the field version-1 readers (the coordinator) show.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed.common.messages import FAIRNESS_KEY
from medfed.common.subgroups import (
    AGE,
    DICOM_SEX_CODES,
    MISSING_LABEL,
    SEX_LABELS,
    band_labels,
    group_name,
    value_label,
)
from medfed.common.tasks import Column, ImagingSpec, TaskSpec

if TYPE_CHECKING:
    from medfed.client.data import SiteData
    from medfed.client.imaging_data import ImagingData

FAIRNESS_VERSION = 1
THRESHOLD = 0.5
ECE_BINS = 10
IMAGING_TAGS = {"sex": "Patient's Sex (0010,0040)", AGE: "Patient's Age (0010,1010)"}
IMAGING_UNKNOWN = (
    "{tag} absent or unreadable in every test image: de-identified without the "
    "Retain Patient Characteristics option?"
)


def fairness_metrics(
    outputs: np.ndarray,
    test: SiteData | ImagingData,
    attributes: tuple[str, ...],
    age_edges: tuple[int, ...],
    min_cohort: int,
) -> dict[str, str]:
    """The ``fairness`` metric (one JSON string) of the model's ``outputs`` on ``test``.

    ``outputs`` are the raw outputs the site's evaluation computed on its test split.
    """
    if isinstance(test.spec, ImagingSpec):
        payload = imaging_fairness(
            test.y, outputs, test.spec, test.sex, test.age_years, attributes, age_edges, min_cohort
        )
        return {FAIRNESS_KEY: encode(payload)}
    payload = site_fairness(test.X, test.y, outputs, test.spec, attributes, age_edges, min_cohort)
    return {FAIRNESS_KEY: encode(payload)}


def site_fairness(
    X: np.ndarray,
    y: np.ndarray,
    outputs: np.ndarray,
    spec: TaskSpec,
    attributes: tuple[str, ...],
    age_edges: tuple[int, ...],
    min_cohort: int,
) -> dict[str, Any]:
    """Per-group metrics of ``outputs`` (logits, or scaled regression values) on (X, y).

    Groups under ``min_cohort`` (and complements that would reveal them) are listed
    under ``suppressed`` by name only.
    """
    splits = [group_index(X, spec, attribute, age_edges) for attribute in attributes]
    return grouped_fairness(y, outputs, spec, splits, min_cohort)


def imaging_fairness(
    y: np.ndarray,
    outputs: np.ndarray,
    spec: ImagingSpec,
    sex: list[str],
    age_years: list[float | None],
    attributes: tuple[str, ...],
    age_edges: tuple[int, ...],
    min_cohort: int,
) -> dict[str, Any]:
    """Per-group metrics of ``outputs`` (logits) on imaging samples, grouped by header.

    An attribute unknown for every sample is left out and named, with its DICOM tag,
    under ``unavailable_attributes`` (and ``unavailable``).
    """
    known = [a for a in attributes if _imaging_known(sex, age_years, a)]
    splits = [imaging_group_index(sex, age_years, a, age_edges) for a in known]
    payload = grouped_fairness(y, outputs, spec, splits, min_cohort)
    reasons = {
        a: IMAGING_UNKNOWN.format(tag=IMAGING_TAGS.get(a, a)) for a in attributes if a not in known
    }
    return mark_unavailable(payload, reasons)


def grouped_fairness(
    y: np.ndarray,
    outputs: np.ndarray,
    spec: TaskSpec | ImagingSpec,
    splits: list[tuple[list[str], np.ndarray]],
    min_cohort: int,
) -> dict[str, Any]:
    """The payload for given groups: per attribute, its group names and each sample's
    group (an index into the names; -1 for a sample in no group)."""
    binary = spec.is_binary
    payload: dict[str, Any] = {
        "version": FAIRNESS_VERSION,
        "kind": "binary" if binary else "regression",
        "groups": {},
        "suppressed": [],
    }
    if binary:
        payload["threshold"] = THRESHOLD
    y, outputs = np.asarray(y, dtype=np.float64), np.asarray(outputs, dtype=np.float64)
    for names, index in splits:
        sizes = [int(np.sum(index == g)) for g in range(len(names))]
        released = releasable(sizes, min_cohort, hidden=int(np.sum(index < 0)))
        for g, name in enumerate(names):
            if not released[g]:
                payload["suppressed"].append(name)
                continue
            rows = index == g
            payload["groups"][name] = (
                binary_metrics(y[rows], _sigmoid(outputs[rows]))
                if binary
                else regression_metrics(y[rows], outputs[rows], spec)
            )
    return payload


def mark_unavailable(payload: dict[str, Any], reasons: dict[str, str]) -> dict[str, Any]:
    """Name the attributes the site cannot split by, with why (none: ``payload`` as is)."""
    if reasons:
        payload["unavailable_attributes"] = dict(reasons)
        payload["unavailable"] = "; ".join(f"{a}: {why}" for a, why in reasons.items())
    return payload


def encode(payload: dict[str, Any]) -> str:
    """Compact JSON (no NaN) for the ``fairness`` string metric."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


# -- groups ------------------------------------------------------------------------------
def group_index(
    X: np.ndarray, spec: TaskSpec, attribute: str, age_edges: tuple[int, ...]
) -> tuple[list[str], np.ndarray]:
    """Every group of ``attribute`` (in order) and each row's group, decoded from X."""
    column, offset = _column(spec, attribute)
    width = len(column.feature_names())
    block = np.asarray(X[:, offset : offset + width], dtype=np.float64)
    missing = block[:, -1] > 0.5 if column.nullable else np.zeros(len(X), dtype=bool)
    if column.kind == "categorical":
        labels = [value_label(column, c) for c in column.categories]
        one_hot = block[:, : len(column.categories)]
        index = np.argmax(one_hot, axis=1)
        missing |= one_hot.max(axis=1) < 0.5
    elif column.kind == "binary":
        labels = [value_label(column, 0), value_label(column, 1)]
        index = (block[:, 0] > 0.5).astype(np.int64)
    elif column.name == AGE:
        labels = band_labels(age_edges)
        # Undo the public [-1, 1] scaling; rounding absorbs float32 error (65 -> 64.99999).
        age = np.round((block[:, 0] + 1.0) / 2.0 * (column.high - column.low) + column.low, 3)
        index = np.searchsorted(np.asarray(age_edges, dtype=np.float64), age, side="right")
    else:
        raise ValueError(f"column {attribute!r} is numeric: only age is split into bands")
    names = [group_name(attribute, label) for label in labels]
    if column.nullable:
        names.append(group_name(attribute, MISSING_LABEL))
        index = np.where(missing, len(labels), index)
    return names, index


def imaging_group_index(
    sex: list[str], age_years: list[float | None], attribute: str, age_edges: tuple[int, ...]
) -> tuple[list[str], np.ndarray]:
    """Every group of ``attribute`` (in order) and each sample's group, from its header
    values: -1 where the value is unknown (the sample is in no group)."""
    if attribute == "sex":
        names = [group_name(attribute, SEX_LABELS[c]) for c in sorted(SEX_LABELS)]
        index = np.asarray([DICOM_SEX_CODES.get(s, -1) for s in sex], dtype=np.int64)
        return names, index
    if attribute == AGE:
        names = [group_name(attribute, label) for label in band_labels(age_edges)]
        ages = np.asarray([np.nan if a is None else a for a in age_years], dtype=np.float64)
        edges = np.asarray(age_edges, dtype=np.float64)
        index = np.searchsorted(edges, np.nan_to_num(ages), side="right")
        return names, np.where(np.isnan(ages), -1, index).astype(np.int64)
    raise ValueError(
        f"{attribute!r} is not a subgroup attribute of imaging tasks "
        f"(allowed: {', '.join(IMAGING_TAGS)})"
    )


def _imaging_known(sex: list[str], age_years: list[float | None], attribute: str) -> bool:
    """Whether any sample has a known value of ``attribute``."""
    if attribute == "sex":
        return any(s in DICOM_SEX_CODES for s in sex)
    if attribute == AGE:
        return any(a is not None for a in age_years)
    return True  # not an imaging attribute: imaging_group_index raises on it


def _column(spec: TaskSpec, attribute: str) -> tuple[Column, int]:
    offset = 0
    for column in spec.columns:
        if column.name == attribute:
            return column, offset
        offset += len(column.feature_names())
    raise ValueError(
        f"{attribute!r} is not a column of task {spec.task!r} on {spec.dataset!r} "
        f"(columns: {', '.join(c.name for c in spec.columns)})"
    )


def releasable(sizes: list[int], min_cohort: int, hidden: int = 0) -> list[bool]:
    """Which groups of one attribute may be released (see the module docstring).

    A group is released when it holds at least ``min_cohort`` patients and withholding
    the others does not let them be recovered as the total minus the released ones:
    while the withheld groups (plus ``hidden`` patients in no group, never released)
    hold between 1 and ``min_cohort - 1`` patients together, the smallest released
    group is withheld as well.
    """
    released = [n >= min_cohort for n in sizes]
    while any(released):
        withheld = hidden + sum(n for n, r in zip(sizes, released, strict=True) if not r)
        if withheld == 0 or withheld >= min_cohort:
            break
        smallest = min((i for i, r in enumerate(released) if r), key=lambda i: sizes[i])
        released[smallest] = False
    return released


# -- metrics -----------------------------------------------------------------------------
def binary_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Counts at :data:`THRESHOLD`, AUC (None with one class), calibration of one group."""
    from sklearn.metrics import roc_auc_score

    truth, predicted = y >= 0.5, prob >= THRESHOLD
    n = len(y)
    return {
        "n": n,
        "positives": int(truth.sum()),
        "tp": int(np.sum(truth & predicted)),
        "fp": int(np.sum(~truth & predicted)),
        "tn": int(np.sum(~truth & ~predicted)),
        "fn": int(np.sum(truth & ~predicted)),
        "auc": float(roc_auc_score(truth, prob)) if 0 < truth.sum() < n else None,
        "mean_predicted": float(prob.mean()),
        "observed_rate": float(truth.mean()),
        "ece": expected_calibration_error(truth.astype(np.float64), prob),
    }


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over equal-width probability bins of |mean predicted - observed| x bin share."""
    which = np.clip((prob * bins).astype(np.int64), 0, bins - 1)  # 1.0 falls in the last bin
    total = 0.0
    for b in range(bins):
        rows = which == b
        if rows.any():
            total += abs(float(prob[rows].mean() - y[rows].mean())) * rows.sum() / len(y)
    return float(total)


def regression_metrics(y: np.ndarray, out: np.ndarray, spec: TaskSpec) -> dict[str, Any]:
    """MAE, RMSE and bias (mean of predicted minus observed) in the target's units."""
    err = (out - y) * spec.target_span
    return {
        "n": len(y),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "bias": float(np.mean(err)),
    }


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(logits)
