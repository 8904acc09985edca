"""Imaging models: shapes, Opacus compatibility, exact per-sample gradients, learning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from sklearn.metrics import roc_auc_score
from torch import nn

from medfed.client.training import DPSettings, predict, train_dp, train_plain
from medfed.common.imaging_models import IMAGING_MODELS, build_imaging_model
from medfed.simulations.synthetic_imaging import _radiograph

DEFAULT_SHAPES = {"cnn2d": (1, 64, 64), "cnn3d": (1, 16, 64, 64)}
SMALL_SHAPES = {"cnn2d": (1, 24, 20), "cnn3d": (1, 9, 20, 17)}


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", IMAGING_MODELS)
@pytest.mark.parametrize("shapes", [DEFAULT_SHAPES, SMALL_SHAPES])
def test_output_is_one_logit_per_sample(name: str, shapes: dict) -> None:
    shape = shapes[name]
    model = build_imaging_model(name, shape, seed=0)
    assert model(torch.rand(3, *shape)).shape == (3,)
    assert model(torch.rand(1, *shape)).shape == (1,)


@pytest.mark.parametrize("name", IMAGING_MODELS)
def test_opacus_validator_is_clean_and_no_batchnorm(name: str) -> None:
    model = build_imaging_model(name, DEFAULT_SHAPES[name], seed=0)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize("name", IMAGING_MODELS)
def test_init_is_deterministic_per_seed(name: str) -> None:
    shape = DEFAULT_SHAPES[name]
    assert _same(build_imaging_model(name, shape, 7), build_imaging_model(name, shape, 7))
    assert not _same(build_imaging_model(name, shape, 7), build_imaging_model(name, shape, 8))


def test_build_restores_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_imaging_model("cnn2d", DEFAULT_SHAPES["cnn2d"], seed=1)
    build_imaging_model("cnn3d", DEFAULT_SHAPES["cnn3d"], seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", IMAGING_MODELS)
def test_opacus_per_sample_gradients_equal_single_sample_gradients(name: str) -> None:
    """Hooks-mode per-sample gradients (what DP-SGD clips) match one backward per sample."""
    shape = SMALL_SHAPES[name]
    model = build_imaging_model(name, shape, seed=3).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, *shape, generator=generator, dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    criterion = nn.BCEWithLogitsLoss(reduction="sum")

    expected = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        criterion(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append([p.grad.clone() for p in model.parameters()])

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    wrapped.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        criterion(wrapped(x), y).backward()
    for j, p in enumerate(model.parameters()):
        assert p.grad_sample is not None and p.grad_sample.shape == (len(x), *p.shape)
        for i in range(len(x)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-9, atol=1e-12)
    wrapped._close()


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn2d", (1, 16, 16, 16)),  # a volume for the 2D model
        ("cnn2d", (3, 64, 64)),  # three channels
        ("cnn2d", (1, 16, 64)),  # too small for three stride-2 stages
        ("cnn2d", (64, 64)),  # channel missing
        ("cnn3d", (1, 64, 64)),  # an image for the 3D model
        ("cnn3d", (1, 8, 64, 64)),  # too few slices
        ("cnn3d", (2, 16, 64, 64)),
        ("cnn3d", (1, 16.0, 64, 64)),
    ],
)
def test_wrong_shape_is_a_value_error_naming_model_and_shape(name: str, shape: tuple) -> None:
    with pytest.raises(ValueError, match=name) as excinfo:
        build_imaging_model(name, shape, seed=0)
    assert str(tuple(shape)) in str(excinfo.value)


def test_unknown_model_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'resnet50'"):
        build_imaging_model("resnet50", (1, 64, 64), seed=0)


def _radiographs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float32)
    rng.shuffle(y)
    X = np.stack([_radiograph(rng, 64, int(label)) for label in y]) / 1000.0
    return X[:, None].astype(np.float32), y


@pytest.fixture(scope="module")
def radiographs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = _radiographs(1024, seed=0)
    X_test, y_test = _radiographs(256, seed=1)
    return X, y, X_test, y_test


def test_cnn2d_learns_nodules_without_privacy(radiographs) -> None:
    X, y, X_test, y_test = radiographs
    model = build_imaging_model("cnn2d", (1, 64, 64), seed=0)
    train_plain(model, X, y, True, epochs=3, batch_size=64, learning_rate=0.1, seed=0)
    assert roc_auc_score(y_test, predict(model, X_test)) > 0.9


def test_cnn2d_learns_nodules_with_dp_sgd(radiographs) -> None:
    """The real DP-SGD path (Poisson sampling, clip 1, noise 1) still learns."""
    X, y, X_test, y_test = radiographs
    model = build_imaging_model("cnn2d", (1, 64, 64), seed=0)
    torch.manual_seed(0)
    spend, _ = train_dp(model, X, y, True, DPSettings(1.0, 1.0, 64, 3, 0.5))
    assert spend.steps == 3 * (len(X) // 64)
    assert roc_auc_score(y_test, predict(model, X_test)) > 0.75
