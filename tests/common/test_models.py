"""Shared model definitions: determinism, shapes, Opacus compatibility."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from medfed.common.models import TABULAR_MODELS, LinearModel, SmallMLP, build_model
from medfed.common.params import get_weights


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", TABULAR_MODELS)
def test_build_model_is_deterministic_for_a_seed(name: str) -> None:
    assert _same(build_model(name, 6, seed=7), build_model(name, 6, seed=7))


def test_mlp_differs_between_seeds() -> None:
    assert not _same(build_model("mlp", 6, seed=7), build_model("mlp", 6, seed=8))


def test_logreg_start_is_seed_independent_or_seeded() -> None:
    """The linear model starts at zero (a deliberate choice) or from the seed."""
    a, b = build_model("logreg", 6, seed=7), build_model("logreg", 6, seed=8)
    zero = all(not torch.any(t) for t in a.state_dict().values())
    assert zero == all(not torch.any(t) for t in b.state_dict().values())
    if not zero:
        assert not _same(a, b)


def test_build_model_restores_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("mlp", 6, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_model_types() -> None:
    assert isinstance(build_model("logreg", 3, 0), LinearModel)
    assert isinstance(build_model("mlp", 3, 0), SmallMLP)


@pytest.mark.parametrize("name", TABULAR_MODELS)
@pytest.mark.parametrize("num_features", [4, 6, 32])
def test_output_shape(name: str, num_features: int) -> None:
    model = build_model(name, num_features, seed=0)
    out = model(torch.randn(5, num_features))
    assert out.shape == (5,)
    assert model(torch.randn(1, num_features)).shape == (1,)


def test_logreg_has_one_affine_layer() -> None:
    shapes = [w.shape for w in get_weights(build_model("logreg", 6, 0))]
    assert shapes == [(1, 6), (1,)]


@pytest.mark.parametrize("name", TABULAR_MODELS)
def test_models_pass_opacus_validator(name: str) -> None:
    model = build_model(name, 6, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []


def test_mlp_has_no_batchnorm() -> None:
    model = build_model("mlp", 6, seed=0)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_unknown_model_raises_value_error() -> None:
    with pytest.raises(ValueError, match="resnet"):
        build_model("resnet", 6, seed=0)
