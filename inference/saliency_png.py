"""Saliency maps drawn over the image as PNG files, for a clinician to look at.

The preprocessed image (what the model saw, in [0, 1]) is drawn in grey with the map as
a colour overlay whose opacity follows the map (the image shows through where it is 0),
a colourbar, and a title giving the probability, the method and, for a volume, which
axial slice is shown: the slice of the resampled volume where the map has the most mass
(the title counts slices of the model's input, ``depth`` of them). The figure has a
fixed size (``PNG_SIZE``) so that files are comparable. Drawn with matplotlib's object
API and the Agg canvas (no pyplot, no GUI backend), imported only when a PNG is drawn;
written atomically.

Nothing identifying goes into the picture: the title holds numbers only, and the caller
names the file after a UID, never after the patient.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medfed.common.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from medfed.inference.gradcam import Saliency

PNG_DPI = 100
PNG_INCHES = (5.0, 4.4)
PNG_SIZE = (500, 440)  # (width, height) in pixels: PNG_INCHES x PNG_DPI
OVERLAY_ALPHA = 0.6  # opacity of the colour where the map is at its maximum
OVERLAY_CMAP = "jet"
TITLE_CHARS = 70  # per title line, to fit the figure's width


def strongest_slice(values: np.ndarray) -> int:
    """Index of the axial slice (first axis) where the map has the most mass.

    The upsampled map is flat beyond its outermost cells, so several slices can tie:
    then the one nearest the map's centre of mass along the axis; the middle slice for
    an empty map.
    """
    mass = values.reshape(values.shape[0], -1).sum(axis=1).astype(np.float64)
    top = float(mass.max())
    if not top > 0:
        return values.shape[0] // 2
    tied = np.flatnonzero(mass >= top * (1 - 1e-6))
    centre = float((mass * np.arange(len(mass))).sum() / mass.sum())
    return int(tied[np.argmin(np.abs(tied - centre))])


def saliency_title(
    probability: float,
    saliency: Saliency,
    slice_index: int | None = None,
    depth: int | None = None,
) -> str:
    """Title text: probability, label, method (and why a fallback) and, for volumes, the
    slice shown."""
    label = int(probability >= 0.5)
    lines = [f"P(label 1) = {probability:.3f} (predicted {label}) - {saliency.method}"]
    if saliency.reason:
        lines.append(textwrap.shorten(f"(no Grad-CAM: {saliency.reason})", TITLE_CHARS))
    if slice_index is not None:
        lines.append(f"axial slice {slice_index + 1} of {depth} (strongest map)")
    return "\n".join(lines)


def render_png(image: np.ndarray, values: np.ndarray, title: str) -> bytes:
    """PNG bytes: ``image`` (2D, [0, 1]) in grey, ``values`` (2D, [0, 1]) over it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=PNG_INCHES, dpi=PNG_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.04, 0.04, 0.74, 0.80))
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    alpha = OVERLAY_ALPHA * np.clip(values, 0.0, 1.0)  # where the map is 0, the image shows
    overlay = ax.imshow(
        values, cmap=OVERLAY_CMAP, vmin=0.0, vmax=1.0, alpha=alpha, interpolation="nearest"
    )
    ax.set_axis_off()
    ax.set_title(title, fontsize=9, usetex=False, parse_math=False)
    bar = fig.colorbar(overlay, cax=fig.add_axes((0.82, 0.08, 0.04, 0.72)))
    bar.set_label("saliency (relative)", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PNG_DPI, metadata={"Software": None})
    return buffer.getvalue()


def write_saliency_png(
    path: Path, image: np.ndarray, saliency: Saliency, probability: float
) -> str:
    """Draw and atomically write the PNG for one image or volume; return the title.

    For a volume (D, S, S) the axial slice with the strongest map is drawn.
    """
    values = saliency.values
    if image.ndim == 3:
        index = strongest_slice(values)
        title = saliency_title(probability, saliency, index, image.shape[0])
        image, values = image[index], values[index]
    else:
        title = saliency_title(probability, saliency)
    atomic_write_bytes(Path(path), render_png(image, values, title))
    return title
