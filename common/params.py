"""Model parameters as lists of numpy arrays: the form they travel in over Flower.

torch is imported only by the functions that touch a model: :func:`weights_digest`
identifies a model in processes that must start fast (the audit, checkpoint checks).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Return the model's parameters and buffers in state_dict order, as float arrays."""
    return [t.detach().cpu().numpy().copy() for t in _plain_state(model).values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load ``weights`` (as returned by :func:`get_weights`) into ``model``."""
    import torch

    state = _plain_state(model)
    if len(weights) != len(state):
        raise ValueError(
            f"parameter count mismatch: model has {len(state)} tensors, got {len(weights)}"
        )
    new_state = {}
    for (key, current), array in zip(state.items(), weights, strict=True):
        if tuple(current.shape) != tuple(array.shape):
            raise ValueError(
                f"shape mismatch for {key}: model {tuple(current.shape)}, "
                f"received {tuple(array.shape)}"
            )
        new_state[key] = torch.as_tensor(np.asarray(array), dtype=current.dtype)
    _unwrap(model).load_state_dict(new_state, strict=True)


def weights_digest(weights: list[np.ndarray]) -> str:
    """SHA-256 over the arrays' shapes, dtypes and bytes (identifies a model)."""
    h = hashlib.sha256()
    for a in weights:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _unwrap(model: nn.Module) -> nn.Module:
    # Opacus wraps models in GradSampleModule, which prefixes state_dict keys.
    return getattr(model, "_module", model)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(_unwrap(model).state_dict())
