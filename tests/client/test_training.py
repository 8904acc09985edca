"""Local training: DP-SGD spend and utility, DP compatibility check, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medfed.client.training import (
    DPSettings,
    ModelNotPrivateError,
    check_dp_compatible,
    evaluate,
    predict,
    train_dp,
    train_plain,
)
from medfed.common.models import build_model
from medfed.common.privacy import steps_per_round

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, D = 600, 6


@pytest.fixture(scope="module")
def logistic_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(N, D)).astype(np.float32)
    w = np.array([2.0, -1.5, 1.0, 0.0, 2.5, -0.5])
    p = 1 / (1 + np.exp(-(X @ w - 0.3)))
    y = (rng.random(N) < p).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def linear_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, size=(300, 4)).astype(np.float32)
    y = np.clip(0.5 + 0.2 * X[:, 0] - 0.1 * X[:, 2] + rng.normal(0, 0.03, 300), 0, 1)
    return X, y.astype(np.float32)


def _auc(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    return evaluate(model, X, y, binary=True)["auc"]


@pytest.mark.parametrize(("batch_size", "epochs"), [(64, 3), (50, 1)])
def test_train_dp_spend_matches_request(
    logistic_data: tuple[np.ndarray, np.ndarray], batch_size: int, epochs: int
) -> None:
    X, y = logistic_data
    torch.manual_seed(0)
    model = build_model("logreg", D, seed=0)
    dp = DPSettings(
        noise_multiplier=1.3,
        max_grad_norm=1.0,
        batch_size=batch_size,
        local_epochs=epochs,
        learning_rate=0.5,
    )
    spend, loss = train_dp(model, X, y, True, dp)
    batches = math.ceil(N / batch_size)
    assert spend.noise_multiplier == pytest.approx(1.3)
    assert spend.sample_rate == pytest.approx(1 / batches)
    assert spend.steps == epochs * batches
    assert (spend.sample_rate, spend.steps) == pytest.approx(steps_per_round(N, batch_size, epochs))
    assert math.isfinite(loss)


def test_train_dp_improves_auc(logistic_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = logistic_data
    torch.manual_seed(1)
    before = _auc(build_model("logreg", D, seed=3), X, y)
    model = build_model("logreg", D, seed=3)
    dp = DPSettings(1.0, 1.0, 64, 5, 0.5)
    train_dp(model, X, y, True, dp)
    after = _auc(model, X, y)
    assert after > before + 0.05
    assert after > 0.75


def test_train_dp_trains_mlp(logistic_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = logistic_data
    torch.manual_seed(2)
    model = build_model("mlp", D, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    spend, _ = train_dp(model, X, y, True, DPSettings(1.0, 1.0, 64, 1, 0.1))
    assert spend.steps == math.ceil(N / 64)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_train_dp_after_evaluate(logistic_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = logistic_data
    model = build_model("logreg", D, seed=3)
    evaluate(model, X, y, binary=True)
    spend, _ = train_dp(model, X, y, True, DPSettings(1.0, 1.0, 64, 1, 0.5))
    assert spend.steps == math.ceil(N / 64)


def test_check_dp_compatible_accepts_shared_models() -> None:
    check_dp_compatible(build_model("logreg", D, 0))
    check_dp_compatible(build_model("mlp", D, 0))


def test_check_dp_compatible_rejects_batchnorm() -> None:
    model = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ModelNotPrivateError, match="BatchNorm"):
        check_dp_compatible(model)


def test_train_dp_refuses_batchnorm(logistic_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = logistic_data

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x).squeeze(-1)

    model = Net()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ModelNotPrivateError):
        train_dp(model, X, y, True, DPSettings(1.0, 1.0, 64, 1, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_model_not_private_is_value_error() -> None:
    assert issubclass(ModelNotPrivateError, ValueError)


def test_train_dp_survives_empty_poisson_batches() -> None:
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(3, D)).astype(np.float32)
    y = np.array([0, 1, 0], dtype=np.float32)
    torch.manual_seed(0)
    spend, _ = train_dp(build_model("logreg", D, 0), X, y, True, DPSettings(1.0, 1.0, 1, 10, 0.1))
    assert spend.steps == 30


def test_evaluate_binary(logistic_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = logistic_data
    model = build_model("mlp", D, seed=0)
    metrics = evaluate(model, X, y, binary=True)
    assert set(metrics) == {"loss", "accuracy", "auc"}
    assert 0 <= metrics["accuracy"] <= 1
    assert 0 <= metrics["auc"] <= 1
    assert metrics["loss"] > 0


def test_evaluate_binary_single_class_has_no_auc(
    logistic_data: tuple[np.ndarray, np.ndarray],
) -> None:
    X, _ = logistic_data
    metrics = evaluate(build_model("logreg", D, 0), X[:10], np.ones(10, np.float32), True)
    assert "auc" not in metrics and "accuracy" in metrics


def test_evaluate_regression(linear_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = linear_data
    model = build_model("logreg", 4, seed=0)
    metrics = evaluate(model, X, y, binary=False, target_span=100.0)
    assert set(metrics) == {"loss", "mae", "rmse", "r2"}
    out = predict(model, X)
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(out - y)) * 100, rel=1e-4)
    assert metrics["rmse"] == pytest.approx(np.sqrt(np.mean((out - y) ** 2)) * 100, rel=1e-4)
    assert metrics["loss"] == pytest.approx(np.mean((out - y) ** 2), rel=1e-4)
    assert metrics["rmse"] >= metrics["mae"]


def test_evaluate_regression_constant_target_has_no_r2(
    linear_data: tuple[np.ndarray, np.ndarray],
) -> None:
    X, _ = linear_data
    metrics = evaluate(build_model("logreg", 4, 0), X[:5], np.full(5, 0.5, np.float32), False)
    assert "r2" not in metrics and {"mae", "rmse"} <= set(metrics)


def test_train_plain_reduces_loss(logistic_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = logistic_data
    model = build_model("logreg", D, seed=0)
    before = evaluate(model, X, y, True)["loss"]
    last = train_plain(model, X, y, True, epochs=5, batch_size=32, learning_rate=0.5, seed=0)
    after = evaluate(model, X, y, True)["loss"]
    assert math.isfinite(last)
    assert after < before - 0.05


def test_train_plain_regression_reduces_loss(linear_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = linear_data
    model = build_model("mlp", 4, seed=0)
    before = evaluate(model, X, y, False)["loss"]
    train_plain(model, X, y, False, epochs=20, batch_size=32, learning_rate=0.05, seed=0)
    assert evaluate(model, X, y, False)["loss"] < before


def test_train_plain_is_deterministic(logistic_data: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = logistic_data
    a, b = build_model("mlp", D, 1), build_model("mlp", D, 1)
    train_plain(a, X, y, True, 2, 32, 0.1, seed=5)
    train_plain(b, X, y, True, 2, 32, 0.1, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
