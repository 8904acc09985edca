"""Local training at a site: DP-SGD with Opacus, plain SGD for references, evaluation.

DP-SGD here is Opacus' PrivacyEngine with Poisson sampling (``DPDataLoader``),
per-sample clipping to ``max_grad_norm`` and Gaussian noise of ``noise_multiplier``
times that norm. The spend actually taken is read back from the engine's accountant,
so the ledger records what Opacus did, not what was planned.

Opacus is imported only by the DP-SGD code: evaluation runs in a fresh ClientApp process
of its own (one per Flower message) and does not need it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.special import expit
from sklearn.metrics import accuracy_score, mean_absolute_error, r2_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.common.privacy import Spend

if TYPE_CHECKING:
    from opacus import PrivacyEngine


@dataclass(frozen=True)
class DPSettings:
    """The DP-SGD mechanism for one round of local training."""

    noise_multiplier: float
    max_grad_norm: float
    batch_size: int
    local_epochs: int
    learning_rate: float


class ModelNotPrivateError(ValueError):
    """The model has layers DP-SGD cannot train privately (e.g. BatchNorm)."""


def loss_function(binary: bool) -> nn.Module:
    return nn.BCEWithLogitsLoss() if binary else nn.MSELoss()


def check_dp_compatible(model: nn.Module) -> None:
    """Raise ModelNotPrivateError listing every layer Opacus rejects."""
    from opacus.validators import ModuleValidator

    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ModelNotPrivateError("; ".join(str(e) for e in errors))


def train_dp(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    binary: bool,
    dp: DPSettings,
    evidence: dict[str, str | int | float | bool] | None = None,
) -> tuple[Spend, float]:
    """Train ``model`` in place with DP-SGD; return the spend taken and the mean loss.

    ``evidence``, when given, is filled with what was observed of the mechanism (the
    sampler Opacus built, the noise generator, the model check) for the signed ledger.
    """
    from opacus import PrivacyEngine

    check_dp_compatible(model)
    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    loader = DataLoader(
        TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=dp.batch_size
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=dp.learning_rate)
    criterion = loss_function(binary)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off (the noise comes from torch's default
        # generator, not a CSPRNG; stated, not hidden), and torch that the input needs
        # no gradient; neither changes the computation.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp")
        private_model, private_opt, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
        )
        losses = _run_epochs(private_model, private_opt, private_loader, criterion, dp)
    spend = _spend_taken(engine)
    if evidence is not None:
        evidence.update(_mechanism_evidence(private_opt, private_loader, batch_norms))
    return spend, float(np.mean(losses)) if losses else float("nan")


def _run_epochs(model, optimizer, loader, criterion, dp: DPSettings) -> list[float]:
    model.train()
    losses: list[float] = []
    for _ in range(dp.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            # An empty Poisson batch still goes through forward/backward: its per-sample
            # gradients are empty, and the step adds pure noise, as the accountant assumes.
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            if len(xb):
                losses.append(float(loss.detach()))
    return losses


def _mechanism_evidence(optimizer, loader, batch_norms: int) -> dict[str, str | int | bool]:
    """What Opacus actually built: Poisson sampler, noise generator, no BatchNorm."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = getattr(loader, "batch_sampler", None)
    poisson = isinstance(sampler, UniformWithReplacementSampler)
    secure = bool(getattr(optimizer, "secure_mode", False))
    return {
        "sampler": type(sampler).__name__,
        "poisson_sampling": poisson,
        "sample_rate_sampler": float(getattr(sampler, "sample_rate", 0.0)) if poisson else 0.0,
        "noise_secure_rng": secure,
        "noise_generator": (
            "torchcsprng /dev/urandom (Opacus secure_mode)"
            if secure
            else "torch default generator (Mersenne Twister), Opacus secure_mode off"
        ),
        "batchnorm_layers": batch_norms,
        "module_validator": "Opacus ModuleValidator: no errors",
    }


def _spend_taken(engine: PrivacyEngine) -> Spend:
    history = engine.accountant.history
    if len(history) != 1:
        raise RuntimeError(f"expected one mechanism in the accountant, found {history}")
    noise, rate, steps = history[0]
    return Spend(float(noise), float(rate), int(steps))


def train_plain(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    binary: bool,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
) -> float:
    """Non-private mini-batch SGD (references and benchmarks only); returns last loss."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(X), torch.from_numpy(y)),
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    criterion = loss_function(binary)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
    return float(loss.detach())


def fit_full_batch(
    model: nn.Module, X: np.ndarray, y: np.ndarray, binary: bool, max_iter: int = 200
) -> float:
    """Non-private full-batch L-BFGS to (near) convergence: references only."""
    inputs, targets = torch.from_numpy(X), torch.from_numpy(y)
    criterion = loss_function(binary)
    optimizer = torch.optim.LBFGS(
        model.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe"
    )
    model.train()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(inputs), targets)
        loss.backward()
        return loss

    return float(optimizer.step(closure).detach())


@torch.no_grad()
def predict(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Raw model outputs (logits for risk, scaled values for rehab)."""
    model.eval()
    return model(torch.from_numpy(X)).numpy()


def evaluate(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    binary: bool,
    target_span: float = 1.0,
    outputs: np.ndarray | None = None,
) -> dict[str, float]:
    """Aggregate metrics over (X, y): loss and AUC/accuracy, or MAE/RMSE/R2.

    ``target_span`` converts scaled regression errors back to clinical units;
    ``outputs``, when the caller already has ``predict(model, X)``, are used as they are.
    """
    out = predict(model, X) if outputs is None else outputs
    criterion = loss_function(binary)
    loss = float(criterion(torch.from_numpy(out), torch.from_numpy(y)))
    if binary:
        prob = expit(out)
        metrics = {"loss": loss, "accuracy": float(accuracy_score(y, prob >= 0.5))}
        if len(np.unique(y)) == 2:
            metrics["auc"] = float(roc_auc_score(y, prob))
        return metrics
    err = (out - y) * target_span
    metrics = {
        "loss": loss,
        "mae": float(mean_absolute_error(y * target_span, out * target_span)),
        "rmse": float(np.sqrt(np.mean(err**2))),
    }
    if len(y) > 1 and np.var(y) > 0:
        metrics["r2"] = float(r2_score(y, out))
    return metrics
