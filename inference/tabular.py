"""Predictions of a tabular model (risk, rehab) for a CSV of one or more patients.

The CSV is validated exactly as a site's training data is (:func:`read_clinical_csv`:
same ranges, codes, missing-value rules, duplicate ids), except that the target column
is optional and never read, and the id column is optional (rows are then named
``row-<line>``). By default any invalid row stops the prediction with every invalid
row listed (file line, column, problem); ``skip_invalid`` predicts the valid rows and
reports the invalid ones beside the predictions. Nothing is written and nothing leaves
the machine.

Outputs: risk → probability and label (probability ≥ 0.5); rehab → the progress score
in its clinical units with, when the run's federated test RMSE of this model is known,
an approximate 95% prediction interval value ± 1.96 · RMSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed.client.data import (
    DataError,
    MissingColumnsError,
    SiteData,
    SkippedRow,
    decode_target,
    read_clinical_csv,
)
from medfed.common.tasks import TaskSpec, get_task_spec
from medfed.inference.contributions import Contributions, by_column
from medfed.inference.errors import ModelInputMismatch, PredictError
from medfed.inference.model_file import LoadedModel

if TYPE_CHECKING:
    from torch import nn

THRESHOLD = 0.5
Z_95 = 1.959964
BASELINE = (
    "all encoded features 0: numeric inputs at the middle of their public range, "
    "binary inputs 0, no category, nothing missing"
)
INTERVAL_ASSUMPTION = (
    "approximate 95% prediction interval: value +/- 1.96 * RMSE, assuming normally "
    "distributed residuals of the same spread for every patient (homoscedastic); the "
    "RMSE is over all the sites' released held-out patients for this model (from each "
    "site's RMSE and count), and the model's own estimation uncertainty is not included"
)


@dataclass(frozen=True)
class Explanation:
    """One prediction's contributions: per input column and per encoded feature."""

    columns: dict[str, float]
    features: dict[str, float]
    baseline_output: float
    output: float
    completeness_gap: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "contributions": self.columns,
            "feature_contributions": self.features,
            "baseline_output": self.baseline_output,
            "output": self.output,
            "completeness_gap": self.completeness_gap,
            "integration_steps": self.steps,
        }


@dataclass(frozen=True)
class TabularPrediction:
    """One patient's prediction (``probability``/``label`` or ``value``/``interval``)."""

    id: str
    task: str
    probability: float | None = None
    label: int | None = None
    value: float | None = None
    interval: tuple[float, float] | None = None
    explanation: Explanation | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.task == "risk":
            out.update(probability=self.probability, label=self.label)
        else:
            low_high = list(self.interval) if self.interval else None
            out.update(value=self.value, interval=low_high)
        if self.explanation is not None:
            out["explanation"] = self.explanation.to_dict()
        return out


@dataclass
class TabularReport:
    """Everything `medfed predict` shows for a CSV: predictions, invalid rows, notes."""

    model: LoadedModel
    input: Path
    predictions: list[TabularPrediction]
    invalid_rows: list[SkippedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    interval: dict[str, Any] | None = None
    explanation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.summary(),
            "task": self.model.task,
            "input": str(self.input),
            "predictions": [p.to_dict() for p in self.predictions],
            "invalid_rows": [
                {"line": s.line, "column": s.column, "reason": s.reason} for s in self.invalid_rows
            ],
            "interval": self.interval,
            "explanation": self.explanation,
            "notes": self.notes,
        }


def tabular_spec(model: LoadedModel) -> TaskSpec:
    """The task schema of ``model``; ModelInputMismatch if its features differ from it."""
    spec = get_task_spec(model.task, model.dataset)
    if not isinstance(spec, TaskSpec):
        raise ModelInputMismatch(f"{model.checkpoint}: {model.describe()} is not a tabular model")
    features = model.meta.get("features")
    if features != spec.feature_names():
        got = features if isinstance(features, list) else []
        extra = [f for f in got if f not in spec.feature_names()]
        absent = [f for f in spec.feature_names() if f not in got]
        raise ModelInputMismatch(
            f"{model.checkpoint}: the model's features differ from the {model.task} on "
            f"{model.dataset} schema (not in the schema: {', '.join(extra) or 'none'}; "
            f"missing from the model: {', '.join(absent) or 'none'}; or another order)"
        )
    return spec


def build_network(model: LoadedModel, spec: TaskSpec) -> nn.Module:
    """The torch model with the checkpoint's weights; PredictError if they do not fit."""
    from medfed.common.models import build_model
    from medfed.common.params import set_weights

    net = build_model(model.model_name, spec.model_input, int(model.meta.get("seed", 0)))
    try:
        set_weights(net, model.weights)
    except ValueError as exc:
        raise PredictError(
            f"{model.checkpoint}: the arrays do not fit a {model.model_name} over "
            f"{spec.num_features} features ({exc})"
        ) from None
    return net.eval()


def raw_outputs(net: nn.Module, X: np.ndarray) -> np.ndarray:
    """The model's outputs: logits (risk) or scaled values (rehab)."""
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(np.asarray(X, dtype=np.float32))).numpy().astype(np.float64)


def read_patients(
    path: Path, model: LoadedModel, spec: TaskSpec, skip_invalid: bool = False
) -> SiteData:
    """Validated, encoded rows of ``path``; PredictError listing every invalid row."""
    try:
        data = read_clinical_csv(path, spec, with_target=False)
    except MissingColumnsError as exc:
        raise ModelInputMismatch(
            f"{path}: missing column(s) {', '.join(exc.missing)}: the model "
            f"({model.checkpoint}) is {model.describe()} and expects the columns "
            f"{', '.join(c.name for c in spec.columns)}"
        ) from None
    except DataError as exc:
        raise PredictError(str(exc)) from None
    if data.skipped and not (skip_invalid and len(data)):
        listed = "; ".join(str(s) for s in data.skipped)
        hint = "" if skip_invalid else " (fix them, or pass --skip-invalid to predict the rest)"
        raise PredictError(f"{path}: {len(data.skipped)} invalid row(s): {listed}{hint}")
    if not len(data):
        raise PredictError(f"{path}: no patient rows")
    return data


def explain_rows(model: LoadedModel, net: nn.Module, X: np.ndarray) -> Contributions:
    """Exact coef·x for the linear model, integrated gradients for the MLP."""
    from medfed.inference.contributions import integrated_gradients, linear_contributions

    if model.model_name == "logreg":
        weight = net.linear.weight.detach().numpy()
        bias = float(net.linear.bias.detach().numpy()[0])
        return linear_contributions(weight, bias, X)
    return integrated_gradients(net, X)


def predict_tabular(
    model: LoadedModel, path: Path, explain: bool = False, skip_invalid: bool = False
) -> TabularReport:
    """Predict for every valid patient row of ``path`` (see the module docstring)."""
    spec = tabular_spec(model)
    data = read_patients(path, model, spec, skip_invalid)
    net = build_network(model, spec)
    out = raw_outputs(net, data.X)
    report = TabularReport(model, path, [], invalid_rows=list(data.skipped))
    report.notes.extend(model.notes)
    span = spec.target_span
    half_width = _interval(model, spec, report) if not spec.is_binary else None
    contributions = explain_rows(model, net, data.X) if explain else None
    if contributions is not None:
        report.explanation = _explanation_info(spec, contributions)
    for i, pid in enumerate(data.ids):
        how = _explanation(spec, contributions, i, span) if contributions is not None else None
        report.predictions.append(_prediction(spec, pid, out[i], half_width, how))
    return report


def _prediction(
    spec: TaskSpec, pid: str, out: float, half_width: float | None, how: Explanation | None
) -> TabularPrediction:
    if spec.is_binary:
        probability = float(1.0 / (1.0 + np.exp(-out)))
        label = int(probability >= THRESHOLD)
        return TabularPrediction(pid, spec.task, probability, label, explanation=how)
    value = float(decode_target(spec, np.asarray([out]))[0])
    interval = None if half_width is None else (value - half_width, value + half_width)
    return TabularPrediction(pid, spec.task, value=value, interval=interval, explanation=how)


def _interval(model: LoadedModel, spec: TaskSpec, report: TabularReport) -> float | None:
    """Half-width 1.96·RMSE from this model's federated test RMSE, or None with a note."""
    rmse = model.metrics.get("pooled_rmse")
    if not isinstance(rmse, (int, float)) or not np.isfinite(rmse) or rmse <= 0:
        report.notes.append(
            "no prediction interval: no run record gives a federated test RMSE for this "
            "model (pass the run folder, or keep the checkpoint in its run's checkpoints/)"
        )
        return None
    report.interval = {
        "level": 0.95,
        "half_width": Z_95 * float(rmse),
        "rmse": float(rmse),
        "unit": f"{spec.target.name} ({spec.target.low:g}-{spec.target.high:g})",
        "source": f"{model.run_dir} run.json, round {model.metrics_round}: the sites' "
        "released test RMSEs and counts",
        "assumption": INTERVAL_ASSUMPTION,
    }
    return Z_95 * float(rmse)


def _explanation_info(spec: TaskSpec, contributions: Contributions) -> dict[str, Any]:
    scale = "logit (log-odds)" if spec.is_binary else f"{spec.target.name} units"
    return {
        "method": contributions.method,
        "scale": scale,
        "baseline": BASELINE,
        "grouping": "features of one input column (one-hot categories, missing-value "
        "indicator) are summed into that column; feature_contributions keeps them apart",
        "completeness": "contributions sum to output - baseline_output",
    }


def _explanation(spec: TaskSpec, contributions: Contributions, i: int, span: float) -> Explanation:
    """Row ``i``'s contributions, in clinical units for rehab (points, not scaled)."""
    values = contributions.values[i] * span + 0.0  # + 0.0: no -0.0 in the output
    base, output = contributions.baseline_output[i], contributions.output[i]
    if not spec.is_binary:
        base = float(decode_target(spec, np.asarray([base]))[0])
        output = float(decode_target(spec, np.asarray([output]))[0])
    return Explanation(
        columns=by_column(spec, values)[0],
        features=dict(zip(spec.feature_names(), map(float, values), strict=True)),
        baseline_output=float(base),
        output=float(output),
        completeness_gap=float(contributions.completeness_gap[i] * span),
        steps=int(contributions.steps[i]),
    )
