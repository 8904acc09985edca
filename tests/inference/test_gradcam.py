"""Grad-CAM for cnn2d/cnn3d: shape, sign, where it points, its fallback, and the PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from medfed.common.models import build_model
from medfed.inference.gradcam import (
    GRAD_CAM,
    GRADIENT,
    Saliency,
    explain,
    feature_centres,
    last_conv_block,
)
from medfed.inference.saliency_png import (
    PNG_SIZE,
    saliency_title,
    strongest_slice,
    write_saliency_png,
)

QUADRANTS_2D = [(12, 12), (12, 34), (34, 12), (34, 34)]  # (row, column) centres, 48 px


def blob_detector(name: str, shape: tuple[int, ...]) -> nn.Module:
    """A cnn2d/cnn3d set by hand so that a bright blob on a black image drives the logit.

    Every conv averages channel 0 over its kernel into channel 0 (all else zero), so
    after GroupNorm and ReLU only the cells whose receptive field holds the blob are
    positive; the head adds the mean and max of channel 0 to a bias of -1.
    """
    model = build_model(name, shape, seed=0)
    convs = [m for m in model.features if isinstance(m, nn.modules.conv._ConvNd)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[0, 0].fill_(1.0 / conv.weight[0, 0].numel())
        model.head.weight.zero_()
        model.head.bias.fill_(-1.0)
        channels = model.head.weight.shape[1] // 2
        model.head.weight[0, 0] = 1.0  # mean of channel 0
        model.head.weight[0, channels] = 1.0  # max of channel 0
    return model.eval()


def blob(shape: tuple[int, ...], centre: tuple[int, ...], radius: float) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    distance2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return (distance2 <= radius**2).astype(np.float32)


def quadrant(plane: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    half_r, half_c = plane.shape[0] // 2, plane.shape[1] // 2
    rows = slice(0, half_r) if centre[0] < half_r else slice(half_r, None)
    cols = slice(0, half_c) if centre[1] < half_c else slice(half_c, None)
    return plane[rows, cols]


@pytest.mark.parametrize(("name", "shape"), [("cnn2d", (1, 48, 48)), ("cnn3d", (1, 12, 40, 40))])
def test_grad_cam_is_non_negative_with_the_input_shape(name, shape):
    model = build_model(name, shape, seed=3).eval()
    image = np.random.default_rng(0).random(shape[1:], dtype=np.float32)
    saliency = explain(model, image)
    assert saliency.method == GRAD_CAM and saliency.reason == ""
    assert saliency.values.shape == shape[1:]
    assert saliency.values.dtype == np.float32
    assert saliency.values.min() >= 0.0
    assert saliency.values.max() == pytest.approx(1.0) or not saliency.values.any()
    with torch.no_grad():
        logit = float(model(torch.from_numpy(image)[None, None]))
    assert saliency.logit == pytest.approx(logit, abs=1e-5)


@pytest.mark.parametrize("centre", QUADRANTS_2D)
def test_grad_cam_concentrates_on_the_blob_that_drives_the_prediction(centre):
    model = blob_detector("cnn2d", (1, 48, 48))
    image = blob((48, 48), centre, 4)
    saliency = explain(model, image)
    values = saliency.values
    with torch.no_grad():
        blank = float(torch.sigmoid(model(torch.zeros(1, 1, 48, 48))))
    assert 1 / (1 + np.exp(-saliency.logit)) > 0.9 > blank  # the blob drives the logit
    assert quadrant(values, centre).sum() > 0.8 * values.sum()
    rows, cols = np.mgrid[0:48, 0:48]
    mass_centre = np.array([(rows * values).sum(), (cols * values).sum()]) / values.sum()
    assert np.linalg.norm(mass_centre - np.array(centre)) < 6.5


@pytest.mark.parametrize("centre", [(3, 10, 10), (10, 10, 28), (3, 28, 10), (10, 28, 28)])
def test_grad_cam_of_a_volume_finds_the_blob_in_plane_and_depth(centre):
    model = blob_detector("cnn3d", (1, 16, 40, 40))
    saliency = explain(model, blob((16, 40, 40), centre, 3))
    assert saliency.method == GRAD_CAM
    plane = saliency.values.sum(axis=0)
    assert quadrant(plane, centre[1:]).sum() > 0.8 * plane.sum()
    assert abs(strongest_slice(saliency.values) - centre[0]) <= 2


def test_feature_centres_are_the_centres_of_the_receptive_fields():
    """Against autograd: each output cell's input support, for convs and a pool."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 5, stride=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(2, 2, (3, 5), stride=(2, 1), padding=(1, 0)),
        nn.ReLU(),
    )
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Conv2d):
                module.weight.fill_(1.0)
                module.bias.fill_(1.0)
    x = torch.ones(1, 1, 61, 45, requires_grad=True)
    out = model(x)
    layer = last_conv_block(model)
    assert layer is model[4]
    centres = feature_centres(model, layer, (61, 45), tuple(out.shape[2:]))
    checked = 0
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            (grad,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
            rows, cols = np.nonzero(grad[0, 0].numpy())
            if rows.min() == 0 or cols.min() == 0:
                continue  # clipped by the padding: its support is not its whole field
            assert (rows.min() + rows.max()) / 2 == pytest.approx(centres[0][i])
            assert (cols.min() + cols.max()) / 2 == pytest.approx(centres[1][j])
            checked += 1
    assert checked >= 10


def test_a_one_cell_feature_map_falls_back_to_gradient_saliency():
    model = build_model("cnn2d", (1, 24, 24), seed=1).eval()  # 24 -> 10 -> 4 -> 1 cells
    image = blob((24, 24), (8, 8), 3)
    saliency = explain(model, image)
    assert saliency.method == GRADIENT
    assert "1 x 1" in saliency.reason
    assert saliency.values.shape == (24, 24) and saliency.values.min() >= 0
    x = torch.from_numpy(image)[None, None].requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[0], x)
    expected = grad.abs()[0, 0].numpy()
    np.testing.assert_allclose(saliency.values, expected / expected.max(), rtol=1e-5)
    assert "no Grad-CAM" in saliency_title(0.3, saliency)


def test_strongest_slice_picks_the_slice_with_most_mass():
    values = np.zeros((6, 4, 4), np.float32)
    values[4, 1, 1] = 1.0
    values[1] = 0.05
    assert strongest_slice(values) == 4
    assert strongest_slice(np.zeros((6, 4, 4))) == 3  # empty map: the middle slice
    flat_end = np.zeros((8, 2, 2))
    flat_end[:3] = 1.0  # a plateau over slices 0-2, then a tail
    flat_end[3:6] = 0.5  # centre of mass: slice 2.0
    assert strongest_slice(flat_end) == 2  # the tied slice nearest the centre of mass


@pytest.mark.parametrize("shape", [(32, 32), (10, 32, 32)])
def test_the_png_is_valid_of_the_fixed_size_and_written_atomically(tmp_path, shape):
    image = np.random.default_rng(1).random(shape, dtype=np.float32)
    values = blob(shape, tuple(n // 3 for n in shape), 4)
    path = tmp_path / "maps" / "saliency-1.2.3.png"
    title = write_saliency_png(path, image, Saliency(values, GRAD_CAM, 0.4), 0.6)
    picture = imread(path)
    assert picture.shape == (PNG_SIZE[1], PNG_SIZE[0], 4)
    assert picture[..., :3].std() > 0.05  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert "P(label 1) = 0.600 (predicted 1) - Grad-CAM" in title
    if len(shape) == 3:
        assert f"axial slice {shape[0] // 3 + 1} of {shape[0]}" in title
