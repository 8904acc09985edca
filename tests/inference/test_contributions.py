"""Per-prediction contributions: exact coef·x, integrated-gradient completeness, grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.common.models import build_model
from medfed.common.tasks import HEART_DISEASE_RISK, SYNTHETIC_RISK
from medfed.inference.contributions import (
    COMPLETENESS_TOLERANCE,
    by_column,
    integrated_gradients,
    linear_contributions,
)
from medfed.inference.model_file import load_model
from medfed.inference.tabular import predict_tabular
from tests.inference.helpers import encode_by_hand
from tests.inference.test_tabular import PATIENTS, write_patients


def _patients(tmp_path: Path) -> Path:
    return write_patients(tmp_path / "p.csv", PATIENTS)


def test_logreg_contributions_are_coefficient_times_input(tmp_path, trained_run):
    loaded = load_model(trained_run("risk", "logreg"))
    report = predict_tabular(loaded, _patients(tmp_path), explain=True)
    w, b = (np.asarray(a, dtype=float) for a in loaded.weights)
    for raw, pred in zip(PATIENTS, report.predictions, strict=True):
        x = encode_by_hand(SYNTHETIC_RISK, raw)
        how = pred.explanation
        assert list(how.features.values()) == pytest.approx(list(w[0] * x), abs=1e-6)
        assert how.baseline_output == pytest.approx(b[0])
        assert sum(how.columns.values()) == pytest.approx(
            np.log(pred.probability / (1 - pred.probability)) - b[0], abs=1e-4
        )
    assert report.explanation["scale"] == "logit (log-odds)"


@pytest.mark.parametrize("task", ["risk", "rehab"])
def test_mlp_integrated_gradients_are_complete(tmp_path, trained_run, task):
    loaded = load_model(trained_run(task, "mlp"))
    report = predict_tabular(loaded, _patients(tmp_path), explain=True)
    span = 1.0 if task == "risk" else 100.0
    for pred in report.predictions:
        how = pred.explanation
        total = sum(how.features.values())
        assert total == pytest.approx(how.output - how.baseline_output, abs=2e-4 * span)
        assert how.completeness_gap <= COMPLETENESS_TOLERANCE * span * max(
            1.0, abs(how.output - how.baseline_output) / span
        )
        assert sum(how.columns.values()) == pytest.approx(total)
        assert max(map(abs, how.features.values())) > 0.05 * span  # a non-trivial check
    if task == "rehab":
        first = report.predictions[0]
        assert first.value == pytest.approx(first.explanation.output, abs=1e-3)


def test_integrated_gradients_of_a_linear_model_are_coef_times_input():
    net = build_model("logreg", 4, 0)
    with torch.no_grad():
        net.linear.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.25]]))
        net.linear.bias.fill_(0.3)
    X = np.array([[0.2, -0.4, 0.9, -1.0], [1.0, 1.0, -1.0, 0.0]], dtype=np.float32)
    ig = integrated_gradients(net, X)
    exact = linear_contributions(net.linear.weight.detach().numpy(), 0.3, X)
    assert ig.values == pytest.approx(exact.values, abs=1e-6)
    assert exact.completeness_gap == pytest.approx([0.0, 0.0], abs=1e-12)


def test_integrated_gradients_refine_until_complete_on_a_kinked_network():
    net = build_model("mlp", 6, 3)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(6.0)  # sharp ReLU kinks along the path: few steps are not enough
    X = np.random.default_rng(0).uniform(-1, 1, size=(5, 6)).astype(np.float32)
    ig = integrated_gradients(net, X)
    deltas = np.abs(ig.output - ig.baseline_output)
    assert (ig.completeness_gap <= COMPLETENESS_TOLERANCE * np.maximum(1.0, deltas)).all()
    assert ig.steps.max() > 64


def test_one_hot_and_missing_indicator_are_summed_into_their_column():
    names = HEART_DISEASE_RISK.feature_names()
    values = np.arange(len(names), dtype=float)[None, :]
    [grouped] = by_column(HEART_DISEASE_RISK, values)
    assert list(grouped) == [c.name for c in HEART_DISEASE_RISK.columns]
    cp = [i for i, n in enumerate(names) if n.startswith("cp=")]
    restecg = [i for i, n in enumerate(names) if n.startswith("restecg")]
    assert grouped["cp"] == sum(cp)
    assert grouped["restecg"] == sum(restecg)  # three categories and restecg_missing
    assert sum(grouped.values()) == values.sum()
