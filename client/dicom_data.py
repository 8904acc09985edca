"""A site's DICOM tree: scan, group into series, assemble images and volumes, quarantine.

Everything is read with pydicom. A file that cannot be used is *quarantined* with its
reason (not DICOM, truncated, no pixel data, undecodable, inconsistent series) and the
rest of the dataset goes on; nothing here raises on bad input files.

Pixel values go through the Modality LUT (so CT is in Hounsfield units), then a VOI
window (configured, or the header's), MONOCHROME1 is inverted, and the result is
resampled to the model's input size. 3D series are ordered by ImagePositionPatient
projected on the slice normal (InstanceNumber only when positions are missing).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from scipy.ndimage import zoom

VOLUME_MODALITIES = ("CT", "MR")
SPACING_TOLERANCE = 0.1  # relative deviation of slice gaps that counts as uneven


@dataclass(frozen=True)
class Quarantined:
    """A file (or series) left out, and why."""

    path: str
    reason: str


@dataclass
class Series:
    """Headers of one series' files (pixels are read later)."""

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    files: list[tuple[Path, Dataset]] = field(default_factory=list)

    @property
    def is_volume(self) -> bool:
        return self.modality in VOLUME_MODALITIES and len(self.files) > 1


@dataclass(frozen=True)
class Window:
    """VOI window in modality units (e.g. HU); None means use the header's."""

    center: float | None = None
    width: float | None = None


def scan_tree(root: Path) -> tuple[list[Series], list[Quarantined]]:
    """Read every file's header under ``root`` and group usable files by series."""
    series: dict[str, Series] = {}
    quarantined: list[Quarantined] = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, defer_size="1 KB")
        except InvalidDicomError:
            quarantined.append(Quarantined(str(path), "not DICOM"))
            continue
        except (OSError, ValueError, EOFError, KeyError) as exc:
            quarantined.append(Quarantined(str(path), f"truncated or unreadable: {exc}"))
            continue
        problem = _header_problem(ds)
        if problem:
            quarantined.append(Quarantined(str(path), problem))
            continue
        key = str(ds.SeriesInstanceUID)
        if key not in series:
            series[key] = Series(
                str(ds.get("PatientID", "")),
                str(ds.StudyInstanceUID),
                key,
                str(ds.get("Modality", "")),
            )
        series[key].files.append((path, ds))
    return list(series.values()), quarantined


def _header_problem(ds: Dataset) -> str:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return "missing pixel data"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        if keyword not in ds:
            return f"missing {keyword}"
    return ""


def load_series(
    series: Series, size: int, window: Window = Window()
) -> tuple[np.ndarray | None, list[Quarantined]]:
    """Image (size, size) or volume (depth, size, size) in [0, 1], or None and reasons."""
    try:
        if series.is_volume:
            ordered, problem = order_slices(series.files)
            if problem:
                return None, [Quarantined(str(p), problem) for p, _ in series.files]
            slices = [_display(ds, window) for _, ds in ordered]
            volume = np.stack(slices)
            return _resample(volume, (volume.shape[0], size, size)), []
        _, ds = series.files[0]
        image = _display(ds, window)
        if image.ndim == 3:  # multi-frame: a volume
            return _resample(image, (image.shape[0], size, size)), []
        return _resample(image, (size, size)), []
    except Exception as exc:  # pixel decoding raises many kinds; quarantine, never crash
        reason = _decode_reason(exc)
        return None, [Quarantined(str(p), reason) for p, _ in series.files]


def _decode_reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "less than expected" in text or "truncat" in text.lower():
        return f"truncated pixel data: {text}"
    if "decod" in text.lower() or "plugin" in text.lower() or "transfer syntax" in text.lower():
        return f"undecodable: {text}"
    return f"truncated or unreadable pixel data: {text}"


def order_slices(files: list[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], str]:
    """Slices ordered along the normal, or an empty list and what is inconsistent."""
    orientations = {
        tuple(round(float(v), 4) for v in ds.get("ImageOrientationPatient", [])) for _, ds in files
    }
    if len(orientations) > 1:
        return [], "inconsistent series: mixed orientations"
    (orientation,) = orientations
    if len(orientation) == 6 and all("ImagePositionPatient" in ds for _, ds in files):
        normal = np.cross(orientation[:3], orientation[3:])
        position = {
            id(ds): float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
            for _, ds in files
        }
        ordered = sorted(files, key=lambda f: position[id(f[1])])
        gaps = np.diff([position[id(ds)] for _, ds in ordered])
    else:
        ordered = sorted(files, key=lambda f: int(f[1].get("InstanceNumber", 0)))
        gaps = np.diff([int(ds.get("InstanceNumber", 0)) for _, ds in ordered]).astype(float)
    if np.any(np.abs(gaps) < 1e-6):
        return [], "inconsistent series: two slices at the same position"
    median = float(np.median(gaps))
    if np.any(np.abs(gaps - median) > SPACING_TOLERANCE * abs(median)):
        big = np.any(gaps > 1.5 * median)
        return [], "inconsistent series: " + ("missing slice" if big else "uneven spacing")
    return ordered, ""


def _display(ds: Dataset, window: Window) -> np.ndarray:
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    center, width = window.center, window.width
    if center is None or width is None:
        center, width = _header_window(ds, values)
    low, high = center - width / 2, center + width / 2
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0, 1)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled


def _header_window(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)  # noqa: E731
        return first(center), first(width)
    low, high = float(values.min()), float(values.max())  # one image, not the dataset
    return (low + high) / 2, max(high - low, 1.0)


def _resample(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    factors = [t / s for t, s in zip(shape, array.shape, strict=True)]
    return zoom(array, factors, order=1).astype(np.float32)


def group_by_patient(series: list[Series]) -> dict[str, list[Series]]:
    """Series per patient id, in a deterministic order (study UID, then series UID)."""
    out: dict[str, list[Series]] = defaultdict(list)
    for s in sorted(series, key=lambda s: (s.patient_id, s.study_uid, s.series_uid)):
        out[s.patient_id].append(s)
    return dict(out)
