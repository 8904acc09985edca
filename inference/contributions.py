"""Per-prediction contributions of each input, against the all-zero encoded baseline.

The baseline is the encoded input 0: every numeric input at the middle of its public
range, binary inputs 0, no category of a categorical input, nothing missing. It is a
fixed, public point (never fitted on a site's data), so a contribution means the same at
every site.

- Linear model: contribution_j = coef_j * x_j, exact; they sum to f(x) - f(0) = f(x) - bias.
- MLP: integrated gradients, x_j * (integral over t in [0, 1] of df/dx_j at t * x), by the
  midpoint rule in float64 with as many steps as it takes for the contributions to sum to
  f(x) - f(0) within :data:`COMPLETENESS_TOLERANCE` (the completeness axiom of the method).

Contributions are on the model's output scale: the logit (log-odds) for risk, the
scaled target for rehab (callers convert to clinical units). Features that one input
column expands into (one-hot categories, a missing-value indicator) are summed back
into that column by :func:`by_column`: additive contributions keep their total.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medfed.common.tasks import TaskSpec

if TYPE_CHECKING:
    from torch import nn

#: Largest |sum of contributions - (f(x) - f(baseline))|, relative to max(1, |f(x) - f(b)|).
COMPLETENESS_TOLERANCE = 1e-4
START_STEPS = 64
MAX_STEPS = 8192
#: Points along the integration paths evaluated in one batch (bounds memory).
PATH_POINTS = 1 << 16


@dataclass(frozen=True)
class Contributions:
    """Contributions of each encoded feature for each row, and the check of their sum."""

    values: np.ndarray  # (rows, features)
    baseline_output: np.ndarray  # f(baseline) per row
    output: np.ndarray  # f(x) per row
    method: str
    steps: np.ndarray  # integration steps used per row (0 for the exact linear method)

    @property
    def completeness_gap(self) -> np.ndarray:
        """|sum of contributions - (f(x) - f(baseline))| per row."""
        return np.abs(self.values.sum(axis=1) - (self.output - self.baseline_output))


def linear_contributions(weight: np.ndarray, bias: float, X: np.ndarray) -> Contributions:
    """coef · x for a linear model ``f(x) = weight · x + bias`` (exact)."""
    X = np.asarray(X, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    values = X * w
    n = len(X)
    return Contributions(
        values=values,
        baseline_output=np.full(n, float(bias)),
        output=values.sum(axis=1) + float(bias),
        method="coefficient x input (exact for the linear model)",
        steps=np.zeros(n, dtype=int),
    )


def integrated_gradients(model: nn.Module, X: np.ndarray) -> Contributions:
    """Integrated gradients of ``model``'s output from the zero baseline to each row."""
    import torch

    net = copy.deepcopy(model).double().eval()
    X = np.asarray(X, dtype=np.float64)
    with torch.no_grad():
        output = net(torch.from_numpy(X)).numpy()
        base = net(torch.zeros(1, X.shape[1], dtype=torch.float64)).numpy()
    target = output.reshape(-1) - base.reshape(-1)[0]
    tolerance = COMPLETENESS_TOLERANCE * np.maximum(1.0, np.abs(target))
    values = np.zeros_like(X)
    steps = np.zeros(len(X), dtype=int)
    pending = np.arange(len(X))
    m = START_STEPS
    while len(pending):
        values[pending] = _ig_rows(net, X[pending], m)
        steps[pending] = m
        converged = np.abs(values[pending].sum(axis=1) - target[pending]) <= tolerance[pending]
        pending = pending[~converged] if m < MAX_STEPS else pending[:0]
        m *= 2
    return Contributions(
        values=values,
        baseline_output=np.full(len(X), float(base[0])),
        output=output,
        method="integrated gradients from the zero baseline (midpoint rule)",
        steps=steps,
    )


def _ig_rows(net: nn.Module, X: np.ndarray, steps: int) -> np.ndarray:
    """Integrated gradients of several rows at one step count, in batches of path points."""
    import torch

    alphas = (np.arange(steps, dtype=np.float64) + 0.5) / steps
    out = np.empty_like(X)
    rows = max(1, PATH_POINTS // steps)
    for start in range(0, len(X), rows):
        x = X[start : start + rows]
        points = alphas[None, :, None] * x[:, None, :]
        path = torch.from_numpy(points.reshape(-1, X.shape[1])).requires_grad_(True)
        (grads,) = torch.autograd.grad(net(path).sum(), path)
        out[start : start + rows] = x * grads.reshape(len(x), steps, -1).mean(dim=1).numpy()
    return out


def by_column(spec: TaskSpec, values: np.ndarray) -> list[dict[str, float]]:
    """Sum each row's feature contributions into the input column they come from."""
    slices = column_slices(spec)
    return [
        {name: float(row[where].sum()) for name, where in slices.items()}
        for row in np.atleast_2d(values)
    ]


def column_slices(spec: TaskSpec) -> dict[str, slice]:
    """Encoded-feature positions of each input column."""
    slices: dict[str, slice] = {}
    start = 0
    for col in spec.columns:
        width = len(col.feature_names())
        slices[col.name] = slice(start, start + width)
        start += width
    return slices
