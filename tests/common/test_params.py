"""Parameter codec: numpy round trip, mismatch errors, digests."""

from __future__ import annotations

import numpy as np
import pytest
from opacus import GradSampleModule

from medfed.common.models import build_model
from medfed.common.params import get_weights, set_weights, weights_digest


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_round_trip(name: str) -> None:
    source = build_model(name, 6, seed=1)
    target = build_model(name, 6, seed=2)
    weights = get_weights(source)
    assert all(isinstance(w, np.ndarray) for w in weights)
    set_weights(target, weights)
    for a, b in zip(get_weights(target), weights, strict=True):
        np.testing.assert_array_equal(a, b)
    assert weights_digest(get_weights(target)) == weights_digest(weights)


def test_get_weights_returns_copies() -> None:
    model = build_model("logreg", 3, seed=0)
    weights = get_weights(model)
    weights[0][...] = 99.0
    assert not np.any(get_weights(model)[0] == 99.0)


def test_wrapped_model_uses_plain_keys() -> None:
    model = build_model("mlp", 6, seed=0)
    plain = get_weights(model)
    wrapped = GradSampleModule(model)
    got = get_weights(wrapped)
    assert len(got) == len(plain)
    other = build_model("mlp", 6, seed=5)
    set_weights(GradSampleModule(other), plain)
    assert weights_digest(get_weights(other)) == weights_digest(plain)


def test_count_mismatch() -> None:
    model = build_model("mlp", 6, seed=0)
    weights = get_weights(model)
    with pytest.raises(ValueError, match="count"):
        set_weights(model, weights[:-1])
    with pytest.raises(ValueError, match="count"):
        set_weights(model, [*weights, np.zeros(1, dtype=np.float32)])


def test_shape_mismatch() -> None:
    model = build_model("logreg", 6, seed=0)
    before = weights_digest(get_weights(model))
    with pytest.raises(ValueError, match="shape"):
        set_weights(model, get_weights(build_model("logreg", 7, seed=0)))
    assert weights_digest(get_weights(model)) == before


def test_digest_changes_when_one_value_changes() -> None:
    weights = get_weights(build_model("mlp", 6, seed=0))
    digest = weights_digest(weights)
    assert digest == weights_digest([w.copy() for w in weights])
    changed = [w.copy() for w in weights]
    changed[2].flat[0] += 1e-3
    assert weights_digest(changed) != digest


def test_digest_depends_on_shape_and_dtype() -> None:
    a = np.arange(6, dtype=np.float32)
    assert weights_digest([a]) != weights_digest([a.reshape(2, 3)])
    assert weights_digest([a]) != weights_digest([a.astype(np.float64)])
