"""Model definitions shared by the sites (which train them) and the coordinator.

No BatchNorm anywhere: per-sample gradients under DP-SGD need every sample's
computation to be independent of the others in its batch (Opacus' ModuleValidator
checks this before every round).
"""

from __future__ import annotations

import torch
from torch import nn

from medfed.common.imaging_models import build_imaging_model
from medfed.common.tasks import MODELS
from medfed.common.tasks import TABULAR_MODELS as TABULAR_MODELS  # re-exported


class LinearModel(nn.Module):
    """Logistic regression (risk) or linear regression (rehab): one affine layer."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1)
        # Zero start: the usual choice for a convex model, and no random weights for
        # the few noisy DP steps of a small site to unlearn.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class SmallMLP(nn.Module):
    """Two hidden ReLU layers and one output (logit or value).

    No normalisation layer: the inputs are already scaled to [-1, 1] by public ranges,
    and every normalisation layer adds per-sample-gradient work to each DP-SGD step.
    (Where one is needed, it must be GroupNorm or LayerNorm, never BatchNorm.)
    """

    def __init__(self, num_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def build_model(name: str, model_input: int | tuple[int, ...], seed: int) -> nn.Module:
    """Build model ``name`` with deterministic initial weights for ``seed``.

    ``model_input`` is the task's :attr:`model_input`: a feature count for the tabular
    models, a sample shape (channels first, no batch) for the imaging CNNs.
    """
    if isinstance(model_input, tuple):
        return build_imaging_model(name, model_input, seed)
    num_features = model_input
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name == "logreg":
            return LinearModel(num_features)
        if name == "mlp":
            return SmallMLP(num_features)
    finally:
        torch.random.set_rng_state(generator_state)
    raise ValueError(f"unknown model {name!r} (expected one of {', '.join(MODELS)})")
