"""Grad-CAM for the imaging CNNs, with plain gradient saliency where Grad-CAM cannot work.

Grad-CAM (Selvaraju et al. 2017) weighs each channel ``k`` of the last convolutional
feature map ``A`` by the mean gradient of the logit over its positions,
``alpha_k = mean(d logit / d A_k)``, and keeps ``ReLU(sum_k alpha_k A_k)``: the places
whose features push the model towards label 1. The map explains the positive class (the
finding), whatever the predicted label, so a negative case shows little or nothing.

The feature map is captured by a forward hook on the module that outputs the last conv
block (the ReLU after the last Conv of ``cnn2d``/``cnn3d``; the conv itself if no ReLU
follows). That map is coarse (6 x 6 cells for a 64 px radiograph) and, because the convs
are unpadded and strided, its cells are not spread evenly over the image: cell ``j`` of an
axis is centred on input pixel ``start + j * jump``, from the kernels, strides and
paddings of the convs (and pools) before it. The map is upsampled to the input size by
linear interpolation between those centres (constant beyond the outer ones), so a hot
cell lands where its receptive field is.

Grad-CAM is impossible when the model has no conv layer or when the last feature map has
a single cell in plane (small inputs: a 24 px image leaves 1 x 1 cells); the map would be
one constant. Then :func:`explain` falls back to gradient saliency,
``|d logit / d x|`` per input pixel, and says why in ``Saliency.reason``.

Everything runs locally on the one image: nothing here leaves the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

GRAD_CAM, GRADIENT = "Grad-CAM", "gradient saliency"
_GEOMETRIC = (
    nn.modules.conv._ConvNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


@dataclass(frozen=True)
class Saliency:
    """A saliency map over the model's input, with how it was computed.

    ``values`` has the input's spatial shape ((S, S) or (D, S, S)), is >= 0 and is
    scaled so that its maximum is 1 (all zeros when nothing supports label 1).
    ``reason`` says why gradient saliency was used instead of Grad-CAM ("" otherwise).
    """

    values: np.ndarray
    method: str
    logit: float
    reason: str = ""


def explain(model: nn.Module, image: np.ndarray) -> Saliency:
    """Grad-CAM of ``model``'s logit for one image (S, S) or volume (D, S, S) in [0, 1].

    Falls back to gradient saliency when Grad-CAM is impossible (see the module doc).
    """
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    layer = last_conv_block(model)
    if layer is None:
        return gradient_saliency(model, x, "the model has no convolutional layer")
    activation, gradient, logit = _activation_and_gradient(model, x, layer)
    cells = tuple(activation.shape[2:])
    if max(cells[-2:]) <= 1:
        why = f"the last conv feature map has {_cells_text(cells)} cells: one value in plane"
        return gradient_saliency(model, x, why)
    weights = gradient.mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1))[0].detach().numpy()
    centres = feature_centres(model, layer, tuple(x.shape[2:]), cells)
    values = upsample(cam.astype(np.float64), centres, tuple(x.shape[2:]))
    return Saliency(_unit_max(values), GRAD_CAM, logit)


def gradient_saliency(model: nn.Module, x: torch.Tensor, reason: str) -> Saliency:
    """``|d logit / d x|`` for one input ``x`` of shape (1, 1, ...), scaled to max 1."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logit = model(x).reshape(-1)[0]
        (grad,) = torch.autograd.grad(logit, x)
    values = grad.abs()[0, 0].numpy().astype(np.float64)
    return Saliency(_unit_max(values), GRADIENT, float(logit.detach()), reason)


def last_conv_block(model: nn.Module) -> nn.Module | None:
    """The module whose output is the last conv feature map, or None without a conv.

    That is the first ReLU after the last conv layer (before any other conv, pool or
    linear layer), else the conv itself; modules are taken in registration order, which
    is execution order for ``nn.Sequential`` stacks like ``cnn2d``/``cnn3d``.
    """
    modules = list(model.modules())
    convs = [i for i, m in enumerate(modules) if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        return None
    for module in modules[convs[-1] + 1 :]:
        if isinstance(module, nn.ReLU):
            return module
        if isinstance(module, (*_GEOMETRIC, nn.Linear)):
            break
    return modules[convs[-1]]


def _activation_and_gradient(
    model: nn.Module, x: torch.Tensor, layer: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The hooked layer's output for ``x``, the logit's gradient with respect to it,
    and the logit."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        captured["output"] = output  # a reused module keeps its last call

    x = x.detach().clone().requires_grad_(True)  # a graph even with frozen weights
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logit = model(x).reshape(-1)[0]
            activation = captured["output"]
            (gradient,) = torch.autograd.grad(logit, activation)
    finally:
        handle.remove()
    return activation.detach(), gradient.detach(), float(logit.detach())


def feature_centres(
    model: nn.Module, layer: nn.Module, input_shape: tuple[int, ...], cells: tuple[int, ...]
) -> list[np.ndarray]:
    """Per spatial axis, the input-pixel centre of each feature-map cell at ``layer``.

    Composed from the kernels, strides, paddings and dilations of the convs and pools up
    to ``layer``; where that geometry does not give the observed cell count (a layer it
    does not know changed the size), the cells are spread evenly over the input.
    """
    geometry = _geometric_layers(model, layer)
    centres = []
    for axis, (size, count) in enumerate(zip(input_shape, cells, strict=True)):
        start, jump, length = 0.0, 1.0, size
        for module in geometry:
            k, s, p, d = (
                _per_axis(getattr(module, name, 1), axis, len(cells))
                for name in ("kernel_size", "stride", "padding", "dilation")
            )
            span = d * (k - 1) + 1
            start += ((span - 1) / 2 - p) * jump
            jump *= s
            length = (length + 2 * p - span) // s + 1
        if length == count:
            centres.append(start + jump * np.arange(count))
        else:
            centres.append((np.arange(count) + 0.5) * size / count - 0.5)
    return centres


def _geometric_layers(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    found = []
    for module in model.modules():
        if isinstance(module, _GEOMETRIC):
            found.append(module)
        if module is layer:
            break
    return found


def _per_axis(value: int | tuple[int, ...] | str, axis: int, dims: int) -> int:
    if isinstance(value, str):  # padding="valid" or "same"; "same" keeps the size
        return 0
    if isinstance(value, tuple):
        return int(value[axis]) if len(value) == dims else int(value[0])
    return int(value)


def upsample(cam: np.ndarray, centres: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of ``cam`` from its cell centres onto every input pixel."""
    out = cam
    for axis, (where, size) in enumerate(zip(centres, shape, strict=True)):
        weights = _interpolation_matrix(where, size)  # (size, cells)
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return out


def _interpolation_matrix(centres: np.ndarray, size: int) -> np.ndarray:
    pixels = np.arange(size, dtype=np.float64)
    if len(centres) == 1:
        return np.ones((size, 1))
    eye = np.eye(len(centres))
    return np.stack([np.interp(pixels, centres, eye[j]) for j in range(len(centres))], axis=1)


def _unit_max(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0.0, None)
    top = float(values.max()) if values.size else 0.0
    return (values / top if top > 0 else values).astype(np.float32)


def _cells_text(cells: tuple[int, ...]) -> str:
    return " x ".join(str(c) for c in cells)
