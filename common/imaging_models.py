"""Imaging models: a 2D CNN for radiographs and a 3D CNN for CT volumes.

Both are trained by the same DP-SGD path as the tabular models (Opacus, Poisson sampling,
per-sample clipping, hooks-mode per-sample gradients), so both are built only from layers
Opacus computes per-sample gradients for (Conv2d, Conv3d, GroupNorm, Linear; ReLU and
pooling have no parameters) and pass ``ModuleValidator.validate(model, strict=True)``.
GroupNorm instead of BatchNorm: BatchNorm mixes the samples of a batch, so one patient's
gradient would depend on the others and per-sample clipping would bound nothing.

Inputs are float32 in [0, 1]: ``(B, 1, S, S)`` for ``cnn2d`` (S = 64 by default) and
``(B, 1, D, S, S)`` for ``cnn3d`` (D = 16, S = 64 by default); output is one logit per
sample, shape ``(B,)``.

Design, driven by what DP-SGD costs. Under Opacus hooks a conv layer's per-sample weight
gradient is an unfold of its input (B x C_in*k*k x L) and a batched matmul with the output
gradient, on top of the ordinary backward; its cost grows with C_in * C_out * k^2 * L and
the unfold's memory with C_in * k^2 * L. So:

- an early stride-2 stem (5x5, 1 -> 8 channels, 64 -> 30 px): the full-resolution layer has
  one input channel, so its unfold is small, and every later layer sees 4x fewer positions;
- then stride-2 3x3 convs with few channels (16, 32), each followed by GroupNorm (without
  affine parameters, see ``_norm``) + ReLU;
- a head that pools globally with both mean and max (a nodule is a few pixels: the mean
  dilutes it, the max keeps it) into one Linear layer.

Two choices make it learn quickly rather than after a long plateau: the input is centred to
[-1, 1] by a fixed constant, and the convs are unpadded ("valid"): zero padding around a
bright image drew strong artificial edges at the border that the max-pooling head latched
on to. The receptive field at the last layer (17 px) covers a nodule (radius 2-4 px at
64 px) with its surroundings.

``cnn3d`` is a real 3D CNN (Opacus 1.6 hooks support Conv3d via ``unfold3d``), the same
recipe in 3D: a stem of kernel (3, 5, 5) and stride (1, 2, 2) (there are only D = 16
slices), then stride-2 3x3x3 convs, mean + max global pooling, Linear. It is kept over the
2.5D candidate below (slices as channels, 3x cheaper) because a lesion's extent across
slices is part of what it looks like; its DP/plain ratio (~2.5) is informational only.

Measured with ``python bench/bench_imaging_dp.py --explore --repeats 11`` (1 torch
thread, a shared 2-core machine at load 2-4, so +-0.1 on a ratio; medians of interleaved
blocks; DP = Opacus hooks with Poisson batches of mean 65 for 2D, 19 for 3D):

================================  ======  ========  =====  ========
candidate                         params  plain ms  DP ms  DP/plain
================================  ======  ========  =====  ========
2D s2 8-16-32 (chosen)              6081      30.4   53.5      1.76
2D s2 8-16-32, affine GroupNorm     6193      26.9   53.9      2.00
2D s2 16-32-64                     23681      52.6   88.5      1.68
2D s2 8-16-32-64                   24641      30.6   52.3      1.71
2D s2 4-8-16                        1601      23.5   40.1      1.71
2D s1 3x3 + maxpool 8-16-32         5953      99.6  160.8      1.61
3D 8-16-32 (chosen)                18001     137.3  343.8      2.50
3D 8-16-32, affine GroupNorm       18113     146.7  389.3      2.65
3D 4-8-16                           4681     124.8  306.5      2.46
2.5D slices as channels 16-32-64   29681      31.9   69.5      2.18
================================  ======  ========  =====  ========

The default run (``python bench/bench_imaging_dp.py --repeats 21``) measured cnn2d at
1.70x (same-block paired 1.72x, min/min 1.76x; plain 28.6 ms, DP 48.6 ms per step) and
cnn3d at 2.50x. The ratio barely moves with the width (per-layer hook overhead and the
unfold of the full-resolution stem dominate), so a narrow model was kept; the
stride-1 + max-pool design has a lower ratio only because its plain step is 3x slower.
A 3x3 stem was cheaper but learned less reliably under DP (AUC 0.55-0.90 over 3 seeds,
against 0.83-0.94 for 5x5). Learning (1,024 synthetic radiographs, 3 epochs, batch 64):
plain SGD (lr 0.1) AUC 0.98; DP-SGD (noise 1, clip 1, lr 0.5) AUC 0.83-0.94 over 3 seeds
(0.99+ with 2,048 images). cnn3d (512 volumes, batch 16, 3 epochs): plain AUC 1.00,
DP-SGD AUC 0.85.
"""

from __future__ import annotations

import torch
from torch import nn

from medfed.common.tasks import IMAGING_MODELS

# Default architectures (channels per conv stage). Chosen from the measurements above.
CNN2D_CHANNELS = (8, 16, 32)
CNN3D_CHANNELS = (8, 16, 32)


def _centre(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to [-1, 1] (a fixed, public constant: nothing fitted on site data).

    With inputs centred, a conv's response no longer depends on the image's mean level;
    measured, this took the 2D CNN from a long plateau (AUC ~0.55 after 6 epochs) to
    AUC > 0.98 within 3 epochs of plain SGD.
    """
    return x * 2.0 - 1.0


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm, 4 channels per group, without a learned scale and shift.

    The normalisation is what steadies training; its affine parameters are not worth their
    DP cost: under Opacus hooks each affine GroupNorm is one more per-sample-gradient hook
    that recomputes the normalisation over the whole feature map (measured: the 2D CNN's
    DP/plain ratio fell from ~2.1-2.4 to ~1.6 without them). The conv before it keeps its
    bias, and the next conv's weights absorb any scale.
    """
    return nn.GroupNorm(max(1, channels // 4), channels, affine=False)


def _pooled_logit(features: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """Global mean and max over all positions, concatenated, then one logit per sample."""
    h = features.flatten(2)
    return head(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)).squeeze(-1)


class ConvNet2d(nn.Module):
    """2D CNN for radiographs ``(B, 1, S, S)`` -> logits ``(B,)``.

    Stem: Conv2d 5x5 stride 2; then one Conv2d 3x3 stride 2 per further entry of
    ``channels``; each conv followed by GroupNorm and ReLU. Head: concatenated global mean
    and max over positions, then Linear to one logit.
    """

    def __init__(self, channels: tuple[int, ...] = CNN2D_CHANNELS, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(channels):
            kernel = 5 if i == 0 else 3
            layers += [
                nn.Conv2d(previous, width, kernel, stride=2),
                _norm(width),
                nn.ReLU(),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pooled_logit(self.features(_centre(x)), self.head)


class ConvNet3d(nn.Module):
    """3D CNN for volumes ``(B, 1, D, S, S)`` -> logits ``(B,)``.

    Stem: Conv3d kernel (3, 5, 5) stride (1, 2, 2), halving only in-plane; then one Conv3d
    3x3x3 stride 2 per further entry of ``channels``; each conv followed by GroupNorm and
    ReLU. Head: concatenated global mean and max over positions, then Linear.
    """

    def __init__(self, channels: tuple[int, ...] = CNN3D_CHANNELS, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(channels):
            if i == 0:
                conv = nn.Conv3d(previous, width, (3, 5, 5), stride=(1, 2, 2))
            else:
                conv = nn.Conv3d(previous, width, 3, stride=2)
            layers += [conv, _norm(width), nn.ReLU()]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pooled_logit(self.features(_centre(x)), self.head)


def _final_size(size: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Length of one axis after the valid (unpadded) convs with these kernels and strides."""
    for kernel, stride in zip(kernels, strides, strict=True):
        size = (size - kernel) // stride + 1 if size >= kernel else 0
    return size


def _fits(name: str, shape: tuple[int, ...]) -> bool:
    stages = len(CNN2D_CHANNELS if name == "cnn2d" else CNN3D_CHANNELS)
    plane_k, plane_s = (5,) + (3,) * (stages - 1), (2,) * stages
    if name == "cnn2d":
        axes = [(n, plane_k, plane_s) for n in shape[1:]]
        rank = 3
    else:
        depth_k, depth_s = (3,) * stages, (1,) + (2,) * (stages - 1)
        axes = [(shape[1], depth_k, depth_s)] + [(n, plane_k, plane_s) for n in shape[2:]]
        rank = 4
    if len(shape) != rank or shape[0] != 1:
        return False
    return all(_final_size(n, k, s) >= 1 for n, k, s in axes)


def _check_shape(name: str, input_shape: tuple[int, ...]) -> None:
    """Raise ValueError naming the model and the shape unless the shape fits the model."""
    shape = tuple(input_shape)
    ints = all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
    if not ints or not _fits(name, shape):
        expected = "(1, H, W)" if name == "cnn2d" else "(1, D, H, W)"
        minimum = "H, W >= 17" if name == "cnn2d" else "D >= 9 and H, W >= 17"
        raise ValueError(
            f"model {name!r}: input_shape {shape} does not fit; expected {expected} "
            f"(one channel, batch excluded) with {minimum}"
        )


def build_imaging_model(name: str, input_shape: tuple[int, ...], seed: int) -> nn.Module:
    """Build imaging model ``name`` for inputs of ``input_shape`` (batch excluded).

    ``input_shape`` is ``(1, S, S)`` for ``cnn2d`` and ``(1, D, S, S)`` for ``cnn3d``.
    Initial weights depend only on ``seed``; torch's global generator is left as it was
    (same save/restore as ``medfed.common.models.build_model``). Raises ValueError naming
    the model or the shape when either does not fit.
    """
    if name not in IMAGING_MODELS:
        raise ValueError(
            f"unknown imaging model {name!r} (expected one of {', '.join(IMAGING_MODELS)})"
        )
    _check_shape(name, input_shape)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ConvNet2d() if name == "cnn2d" else ConvNet3d()
    finally:
        torch.random.set_rng_state(generator_state)
