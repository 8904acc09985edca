"""A site's DICOM tree as training-ready images and volumes, with bad files quarantined.

``load_images(root, prep, cache_dir)`` scans ``root`` recursively (every file, whatever
its name), reads each file once with pydicom and returns

- one ``ImageItem`` per image file for CR/DX and every other single-frame modality;
- one ``ImageItem`` per CT or MR *series* (a volume), its single-frame files ordered by
  ImagePositionPatient projected on the slice normal (InstanceNumber only when positions
  or orientations are missing), after checking for mixed orientations, two slices at one
  position, a missing slice (a gap over 1.5x the median) and uneven spacing (a gap off the
  median by more than 10 %). A CT/MR series of a single file is a 2D item;
- one volume ``ImageItem`` per multi-frame object, frames ordered by the per-frame
  PlanePositionSequence positions when present (else GridFrameOffsetVector, else the
  stored order), with the same checks;

and a ``Quarantined`` entry, with a kind from ``QUARANTINE_KINDS`` and a detail, for every
file left out. Nothing here raises on bad input files. Items come sorted by patient,
study, series and instance (InstanceNumber, then SOPInstanceUID).

Pixel values, per image or slice:

1. decoded by pydicom's pixel data plugins (pylibjpeg-libjpeg, -openjpeg, -rle and
   pyjpegls cover JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and RLE; JPEG-LS
   goes to pyjpegls first because it is several times faster). Colour images (RGB, YBR,
   PALETTE COLOR) become luminance (0.299 R + 0.587 G + 0.114 B);
2. Modality LUT: RescaleSlope/RescaleIntercept (top level or the functional groups) or a
   Modality LUT Sequence, so CT is in Hounsfield units;
3. VOI window, linear, [center - width/2, center + width/2] -> [0, 1] with clipping.
   Each field of ``Preprocess.window`` that is None comes from the header (WindowCenter/
   WindowWidth, first value; FrameVOILUTSequence for enhanced objects); with no window
   at all, the value range of the image (of the whole volume for series and multi-frame
   objects) is used;
4. MONOCHROME1 is inverted (1 - x), so high values always display bright;
5. resampled with spacing taken into account. In plane, the image's physical field of
   view (Rows x row spacing by Columns x column spacing; PixelSpacing, else
   ImagerPixelSpacing, else the PixelMeasuresSequence, else 1 mm) is centred in a
   square field of view whose side is the longer of the two extents, and that square is
   sampled on ``size x size`` square cells. The area outside the image is background,
   0 after windowing and inversion (black). So pixels end up square and nothing is
   stretched: a circle stays a circle. Along z, a volume of n slices a gap g apart covers
   n x g; that extent is kept and sampled on ``depth`` slices. Every axis uses the same
   separable linear filter: a triangle as wide as the larger of an input pixel and an
   output cell (bilinear when enlarging, area-like anti-aliasing when shrinking), with
   weights normalised over the padded field, so the mean brightness is kept and an
   image whose grid matches the output is returned unchanged.

Volumes without any window are windowed after in-plane resampling, with the range of
all their slices; since that window is linear and never clips, this equals windowing
first. Arrays are float32 in [0, 1]: (size, size) images, (depth, size, size) volumes.

Each item also carries the patient's sex and age from the header (Patient's Sex
(0010,0040) and Patient's Age (0010,1010); a volume takes its first file's), for
per-subgroup evaluation at the site (``medfed.client.fairness``). They are read, never
required: an absent or malformed value is unknown (``""`` / None) and never quarantines
a file. Age is not derived from Patient's Birth Date: the Basic Profile empties it, and
Patient's Age is what the Retain Patient Characteristics Option keeps.

With ``cache_dir`` the decoded, preprocessed arrays and each file's header summary are
kept in ``medfed.client.image_cache`` keyed by the SHA-256 of the file bytes, so a later
pass reads and hashes the files and loads arrays without parsing any DICOM. Header
summaries live in a namespace named by :func:`header_key` (``HEADER_VERSION`` and the
summary's field names), so a summary written by an older version is never read as a
current one. Trees of ``CHUNK_MIN_FILES`` files or more have their arrays written in
chunk files rather than one file each (creating files dominated a first pass over
uncompressed images).
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixel_array
from pydicom.uid import (
    UID,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
from scipy.sparse import csr_matrix

from medfed.client.image_cache import ImageCache, combined_hash, content_hash
from medfed.common.subgroups import DICOM_SEX_CODES

PREPROCESS_VERSION = "2"  # bump when the arrays produced for a given Preprocess change
HEADER_VERSION = "2"  # bump when what a Header holds, or how a field is read, changes
SEXES = tuple(DICOM_SEX_CODES)  # Patient's Sex values used as groups; O, other, absent: unknown
AGE_UNIT_YEARS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
MAX_AGE_YEARS = 150.0  # a larger Patient's Age is taken as a bad value (unknown)
QUARANTINE_KINDS = (
    "not DICOM",
    "truncated",
    "missing pixel data",
    "undecodable",
    "inconsistent series",
    "no label",
)
VOLUME_MODALITIES = ("CT", "MR")
SPACING_TOLERANCE = 0.1  # relative deviation of slice gaps that counts as uneven
MISSING_SLICE_GAP = 1.5  # a gap this many times the median means a slice is missing
CHUNK_MIN_FILES = 32  # trees this large get their cached arrays written in chunk files
PREFERRED_PLUGIN = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = tuple(tag_for_keyword(k) for k in _PIXEL_KEYWORDS)
_MODALITY_LUT_TAG = tag_for_keyword("ModalityLUTSequence")
_GROUP_TAGS = (0x52009229, 0x52009230)  # Shared / PerFrame FunctionalGroupsSequence
_RAW_VRS = frozenset({"US", "IS", "DS", "UI", "CS", "DA", "AS"})  # read from raw bytes
_PLAIN_TEXT_VRS = frozenset({"LO", "SH"})  # read from raw bytes when printable ASCII
_PRINTABLE = re.compile(rb"[\x20-\x5b\x5d-\x7e]+")  # printable ASCII but the backslash
_KEYWORD_TAGS: dict[str, tuple[int | None, str | None]] = {}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_AGE = re.compile(r"(\d{1,3})([DWMY])")  # AS: nnnD, nnnW, nnnM or nnnY (zeros optional)


# -- public types -------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """VOI window in modality units (e.g. HU); None means use the header's."""

    center: float | None = None
    width: float | None = None


@dataclass(frozen=True)
class Quarantined:
    """A file (or series folder) left out, the kind of problem and the detail."""

    path: str
    kind: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in QUARANTINE_KINDS:
            raise ValueError(f"quarantine kind must be one of {QUARANTINE_KINDS}: {self.kind!r}")

    @property
    def reason(self) -> str:
        """``"kind: detail"``, or the kind alone when there is no detail."""
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass(frozen=True)
class Preprocess:
    """How images become arrays: output size, volume depth and VOI window."""

    size: int = 64
    depth: int = 16
    window: Window = Window()

    def __post_init__(self) -> None:
        if self.size < 1 or self.depth < 1:
            raise ValueError(
                f"Preprocess size and depth must be >= 1, got {self.size}, {self.depth}"
            )
        if self.window.width is not None and not self.window.width > 0:
            raise ValueError(f"Preprocess window width must be > 0, got {self.window.width}")

    def key(self) -> str:
        """Stable text of every parameter and the code version (a cache key)."""
        w = self.window
        return (
            f"medfed-preprocess/v{PREPROCESS_VERSION}/size={self.size}/depth={self.depth}"
            f"/window-center={w.center!r}/window-width={w.width!r}"
        )


@dataclass(frozen=True)
class ImageItem:
    """One training-ready image or volume and where it came from.

    Equality compares the headers and files, not the pixels. ``sex`` ("F", "M" or ""
    for unknown) and ``age_years`` (None for unknown) are the patient's, from the header
    (the first file's for a volume); they stay at the site.
    """

    patient_id: str
    study_uid: str
    study_date: str
    series_uid: str
    series_number: int
    instance_uid: str
    modality: str
    files: tuple[str, ...]
    identity_removed: bool
    array: np.ndarray = field(repr=False, compare=False)
    sex: str = ""
    age_years: float | None = None

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3


# -- header summary -----------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    """What grouping, ordering and the item need from a file's header (cacheable)."""

    patient_id: str
    study_uid: str
    study_date: str
    series_uid: str
    series_number: int
    instance_uid: str
    instance_number: int | None
    modality: str
    frames: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    frame_positions: tuple[tuple[float, ...], ...] | None
    frame_offsets: tuple[float, ...] | None
    identity_removed: bool
    transfer_syntax: str
    sex: str = ""
    age_years: float | None = None

    @property
    def is_series_slice(self) -> bool:
        return self.modality in VOLUME_MODALITIES and self.frames == 1

    @property
    def syntax_name(self) -> str:
        return _syntax_name(self.transfer_syntax)

    def to_record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Header | None:
        """Rebuild from a cached record; None when it does not have the expected shape."""
        try:
            values = {name: record[name] for name in cls.__dataclass_fields__}
            for name in ("pixel_spacing", "orientation", "position", "frame_offsets"):
                values[name] = _floats(values[name]) if values[name] is not None else None
            if values["frame_positions"] is not None:
                values["frame_positions"] = tuple(_floats(p) for p in values["frame_positions"])
            header = cls(**values)
        except (KeyError, TypeError, ValueError):
            return None
        ints = (header.series_number, header.frames, header.rows, header.columns)
        texts = (header.patient_id, header.study_uid, header.series_uid, header.modality)
        if not all(isinstance(v, int) for v in ints) or not all(isinstance(v, str) for v in texts):
            return None
        if header.sex not in ("", *SEXES) or not _valid_age(header.age_years):
            return None
        return header


def header_key() -> str:
    """The header cache's namespace: version and field names of :class:`Header`."""
    return f"medfed-header/v{HEADER_VERSION}/" + ",".join(Header.__dataclass_fields__)


class _Reject(Exception):
    """A file or series cannot be used: carries the quarantine kind and detail."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def patient_sex(value: Any) -> str:
    """Patient's Sex as a group: "F" or "M"; "" (unknown) for O, absent or anything else."""
    text = "" if value is None else str(value).strip().upper()
    return text if text in SEXES else ""


def patient_age_years(value: Any) -> float | None:
    """Patient's Age (AS, ``nnnY``/``M``/``W``/``D``) in years; None when absent or bad.

    Leading zeros may be missing (``65Y``); a bare number, another unit or an age over
    :data:`MAX_AGE_YEARS` is a bad value, hence unknown.
    """
    if value is None or isinstance(value, bytes | bytearray):
        return None
    match = _AGE.fullmatch(str(value).strip().upper())
    if match is None:
        return None
    years = int(match.group(1)) * AGE_UNIT_YEARS[match.group(2)]
    return years if years <= MAX_AGE_YEARS else None


def _valid_age(value: Any) -> bool:
    if value is None:
        return True
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and 0 <= value <= MAX_AGE_YEARS


def _syntax_name(syntax: str) -> str:
    return UID(syntax).name if syntax else "no Transfer Syntax UID"


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def _get(ds: Dataset, keyword: str) -> Any:
    """An element's value, or None when absent or unreadable (bad VR, bad number).

    Numbers, UIDs, code strings, dates and ages are read straight from the raw bytes (a
    scalar, or a list when multi-valued), which skips pydicom's conversion and validation and makes
    header reading several times faster; so is plain short text (LO, SH: printable
    ASCII without a backslash reads the same in every character set). Other VRs (names,
    other text, sequences) go through pydicom.
    """
    try:
        tag, dictionary_vr = _KEYWORD_TAGS[keyword]
    except KeyError:
        tag = tag_for_keyword(keyword)
        dictionary_vr = dictionary_VR(tag) if tag is not None else None
        _KEYWORD_TAGS[keyword] = (tag, dictionary_vr)
    if tag is None:
        return None
    try:
        element = ds._dict.get(tag)  # what ds.get_item does, without its Tag() conversion
        if isinstance(element, RawDataElement) and element.value is None:
            element = ds.get_item(tag)  # a deferred read
    except Exception:
        return None
    if element is None:
        return None
    if isinstance(element, RawDataElement) and element.value is not None:
        vr = element.VR or dictionary_vr
        if vr in _RAW_VRS:
            return _raw_value(element.value, vr, element.is_little_endian)
        if vr in _PLAIN_TEXT_VRS:
            text = _plain_text(element.value)
            if text is not None:
                return text
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    return None if value is None or value == "" else value


def _plain_text(data: bytes) -> str | None:
    """LO/SH bytes as pydicom reads them (one value), if printable ASCII; else None."""
    data = data.rstrip(b"\0 ")
    if not data or not _PRINTABLE.fullmatch(data):
        return None
    return data.decode("ascii")


def _raw_value(data: bytes, vr: str, little_endian: bool) -> Any:
    if vr == "US":
        if len(data) == 2:
            return int.from_bytes(data, "little" if little_endian else "big")
        values = np.frombuffer(data[: len(data) // 2 * 2], "<u2" if little_endian else ">u2")
        numbers = [int(v) for v in values]
        return None if not numbers else numbers[0] if len(numbers) == 1 else numbers
    parts = [p.strip(" \0") for p in data.decode("ascii", "replace").split("\\")]
    try:
        if vr == "IS":
            parts = [int(float(p)) for p in parts if p]
        elif vr == "DS":
            parts = [float(p) for p in parts if p]
    except ValueError:
        return None
    parts = [p for p in parts if p != ""]
    return None if not parts else parts[0] if len(parts) == 1 else parts


def _text(ds: Dataset, keyword: str) -> str:
    value = _get(ds, keyword)
    return "" if value is None else str(value).strip()


def _number(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(_get(ds, keyword))
    except (TypeError, ValueError):
        return None


def _vector(value: Any, length: int) -> tuple[float, ...] | None:
    try:
        values = _floats(value)
    except (TypeError, ValueError):
        return None
    return values if len(values) == length and all(map(math.isfinite, values)) else None


def _group_value(ds: Dataset, sequence: str, keyword: str, frame: int = 0) -> Any:
    """``keyword`` in the shared functional groups' ``sequence``, else frame ``frame``'s."""
    elements = getattr(ds, "_dict", None)
    if elements is not None and not any(tag in elements for tag in _GROUP_TAGS):
        return None  # no functional groups (most files): skip the failing look-ups
    for groups, index in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", frame),
    ):
        try:
            value = _get(_get(_get(ds, groups)[index], sequence)[0], keyword)
        except (TypeError, IndexError, KeyError, AttributeError):
            continue
        if value is not None:
            return value
    return None


def read_header(ds: Dataset) -> Header:
    """The header summary of a dataset; raise _Reject if it cannot give an image."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not _has_pixels(ds):
        raise _Reject("missing pixel data", "the file has no Pixel Data element")
    rows, columns = _number(ds, "Rows"), _number(ds, "Columns")
    if not rows or not columns or rows < 1 or columns < 1:
        raise _Reject("undecodable", f"{_syntax_name(syntax)}: no valid Rows/Columns")
    frames = max(_number(ds, "NumberOfFrames") or 1, 1)
    spacing = _vector(_get(ds, "PixelSpacing"), 2) or _vector(_get(ds, "ImagerPixelSpacing"), 2)
    spacing = spacing or _vector(_group_value(ds, "PixelMeasuresSequence", "PixelSpacing"), 2)
    orientation = _vector(_get(ds, "ImageOrientationPatient"), 6) or _vector(
        _group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
    )
    return Header(
        patient_id=_text(ds, "PatientID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        study_date=_text(ds, "StudyDate"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        series_number=_number(ds, "SeriesNumber") or 0,
        instance_uid=_text(ds, "SOPInstanceUID"),
        instance_number=_number(ds, "InstanceNumber"),
        modality=_text(ds, "Modality").upper(),
        frames=frames,
        rows=rows,
        columns=columns,
        pixel_spacing=spacing if spacing and min(spacing) > 0 else None,
        orientation=orientation,
        position=_vector(_get(ds, "ImagePositionPatient"), 3),
        frame_positions=_frame_positions(ds, frames) if frames > 1 else None,
        frame_offsets=_frame_offsets(ds, frames) if frames > 1 else None,
        identity_removed=_identity_removed(ds),
        transfer_syntax=syntax,
        sex=patient_sex(_get(ds, "PatientSex")),
        age_years=patient_age_years(_get(ds, "PatientAge")),
    )


def _frame_positions(ds: Dataset, frames: int) -> tuple[tuple[float, ...], ...] | None:
    groups = _get(ds, "PerFrameFunctionalGroupsSequence")
    if not groups or len(groups) != frames:
        return None
    positions = []
    for item in groups:
        try:
            position = _vector(item.PlanePositionSequence[0].ImagePositionPatient, 3)
        except (AttributeError, IndexError):
            return None
        if position is None:
            return None
        positions.append(position)
    return tuple(positions)


def _frame_offsets(ds: Dataset, frames: int) -> tuple[float, ...] | None:
    return _vector(_get(ds, "GridFrameOffsetVector"), frames)


def _identity_removed(ds: Dataset) -> bool:
    if _text(ds, "PatientIdentityRemoved").upper() != "YES":
        return False
    method = _get(ds, "DeidentificationMethod") or _get(ds, "DeidentificationMethodCodeSequence")
    return bool(method)


# -- reading and decoding -------------------------------------------------------------------
def parse_file(data: bytes) -> tuple[Dataset, Header]:
    """Parse a file's bytes; raise _Reject (not DICOM, truncated, ...) when unusable."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        raise _Reject("not DICOM", "no DICOM file meta header or 'DICM' prefix") from None
    except Exception as exc:
        text = _one_line(exc)
        if isinstance(exc, EOFError) or "end of file" in text.lower():
            raise _Reject("truncated", f"the header ends early ({text})") from None
        raise _Reject("not DICOM", f"unreadable header ({text})") from None
    if not _has_pixels(ds) and _has_pixel_tag(data):
        # pydicom stops quietly where an encapsulated Pixel Data element is cut short.
        raise _Reject("truncated", "the Pixel Data element is cut short")
    return ds, read_header(ds)


def _has_pixels(ds: Dataset) -> bool:
    """Whether the dataset has a (float, double) Pixel Data element (``keyword in ds``)."""
    return any(tag in ds._dict for tag in _PIXEL_TAGS)


def _has_pixel_tag(data: bytes) -> bool:
    """Whether the bytes hold a (7FE0,0010) Pixel Data tag, in either byte order."""
    return b"\xe0\x7f\x10\x00" in data or b"\x7f\xe0\x00\x10" in data


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_failure(exc: Exception, header: Header) -> _Reject:
    text = _one_line(exc)
    if isinstance(exc, EOFError) or "less than expected" in text or "truncat" in text.lower():
        return _Reject("truncated", f"{header.syntax_name}: {text}")
    return _Reject("undecodable", f"{header.syntax_name}: {text}")


def modality_frames(ds: Dataset, header: Header) -> np.ndarray:
    """Pixel values (frames, rows, cols) float32 after the Modality LUT (colour: luma)."""
    try:
        stored = _stored_pixels(ds, header)
        photometric = _text(ds, "PhotometricInterpretation").upper()
        if photometric == "PALETTE COLOR":
            stored = apply_color_lut(stored, ds)
        if photometric == "PALETTE COLOR" or (_number(ds, "SamplesPerPixel") or 1) == 3:
            values = stored.astype(np.float32) @ _LUMA
        else:
            values = _apply_rescale(stored, ds)
        return values.reshape(header.frames, header.rows, header.columns)
    except Exception as exc:  # decoders raise many kinds; a bad file must not stop the scan
        raise _decode_failure(exc, header) from None


def _stored_pixels(ds: Dataset, header: Header) -> np.ndarray:
    syntax = header.transfer_syntax
    plugin = PREFERRED_PLUGIN.get(syntax)
    if plugin:
        try:
            return decode_pixel_array(ds, decoding_plugin=plugin)
        except Exception:
            pass  # not installed or failed: let pydicom try every plugin
    return decode_pixel_array(ds)


def _apply_rescale(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    if _MODALITY_LUT_TAG in ds._dict:
        return apply_modality_lut(stored, ds).astype(np.float32)
    slope = _get(ds, "RescaleSlope")
    intercept = _get(ds, "RescaleIntercept")
    if slope is None and intercept is None:
        slope = _group_value(ds, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(ds, "PixelValueTransformationSequence", "RescaleIntercept")
    values = stored.astype(np.float32)
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def window_bounds(ds: Dataset, configured: Window) -> tuple[float, float] | None:
    """(low, high) of the VOI window: configured fields, else the header's; or None."""
    center, width = configured.center, configured.width
    if center is None or width is None:
        header_center = _first(_get(ds, "WindowCenter"))
        header_width = _first(_get(ds, "WindowWidth"))
        if header_center is None or header_width is None:
            header_center = _first(_group_value(ds, "FrameVOILUTSequence", "WindowCenter"))
            header_width = _first(_group_value(ds, "FrameVOILUTSequence", "WindowWidth"))
        center = header_center if center is None else center
        width = header_width if width is None else width
    if center is None or width is None or not width > 0:
        return None
    return center - width / 2, center + width / 2


def _first(value: Any) -> float | None:
    try:
        number = float(value[0] if isinstance(value, MultiValue | list | tuple) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if np.isfinite(number) else None


def value_range(values: np.ndarray) -> tuple[float, float]:
    """Window from the data's own range (when no window is configured or in the header)."""
    low, high = float(values.min()), float(values.max())
    return (low, high) if high - low > 1e-6 else (low, low + 1.0)


def to_display(values: np.ndarray, bounds: tuple[float, float], invert: bool) -> np.ndarray:
    """Linear window to [0, 1] with clipping; MONOCHROME1 inverted. Works in place."""
    low, high = bounds
    values -= np.float32(low)
    values *= np.float32(1.0 / (high - low))
    np.clip(values, 0.0, 1.0, out=values)
    if invert:
        np.subtract(1.0, values, out=values)
    return values


def _inverted(ds: Dataset) -> bool:
    return _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1"


# -- resampling -----------------------------------------------------------------------------
def axis_weights(count: int, spacing: float, extent: float, out: int) -> np.ndarray:
    """(out, count) weights sampling ``count`` pixels ``spacing`` mm apart, centred in a
    field of ``extent`` mm, on ``out`` equal cells.

    Triangle filter as wide as the larger of a pixel and a cell, over the input grid
    extended into the padding; weights are normalised over the grid points inside the
    field, so a row sums to below 1 only where its cell sees padding (background 0).
    """
    cell = extent / out
    offset = (extent - count * spacing) / 2
    centres = ((np.arange(out) + 0.5) * cell - offset) / spacing  # in input pixels
    support = max(cell / spacing, 1.0)
    first = int(np.floor(centres.min() - support)) - 1
    last = int(np.ceil(centres.max() + support)) + 1
    pixels = np.arange(first, last + 1)
    at_mm = (pixels + 0.5) * spacing + offset
    pixels = pixels[(at_mm >= -1e-6 * extent) & (at_mm <= extent * (1 + 1e-6))]
    weights = np.clip(1.0 - np.abs(pixels[None, :] + 0.5 - centres[:, None]) / support, 0, None)
    weights /= weights.sum(axis=1, keepdims=True)
    inside = (pixels >= 0) & (pixels < count)
    return weights[:, inside].astype(np.float32)


@dataclass(frozen=True)
class Taps:
    """Axis weights in sparse form: each output cell's input indices and weights.

    The filter spans a few input pixels, so applying it as a handful of gathers and
    multiply-adds is cheaper than a dense matrix product (and uses no BLAS threads).
    ``matrix`` holds the same taps as a CSR matrix (zero weights kept, in tap order): its
    product adds ``weight * value`` term by term in the same order as ``apply``, so it
    gives the very same float32 sums, in one compiled call per plane.
    """

    index: np.ndarray  # (out, width) input indices
    weight: np.ndarray  # (out, width) float32, 0 where unused
    inside: np.ndarray  # (out,) share of each output cell inside the image
    count: int | None = None  # input pixels (default: the largest index + 1)
    matrix: csr_matrix = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out, width = self.index.shape
        count = self.count if self.count is not None else int(self.index.max(initial=-1)) + 1
        matrix = csr_matrix(
            (
                self.weight.ravel(),
                self.index.ravel().astype(np.int32),
                np.arange(0, out * width + 1, width, dtype=np.int32),
            ),
            shape=(out, count),
        )
        object.__setattr__(self, "matrix", matrix)

    @classmethod
    def from_weights(cls, dense: np.ndarray) -> Taps:
        used = dense > 0
        start = used.argmax(axis=1)
        width = max(int(used.sum(axis=1).max()), 1)
        index = start[:, None] + np.arange(width)[None, :]
        valid = index < dense.shape[1]
        index = np.minimum(index, dense.shape[1] - 1)
        weight = np.take_along_axis(dense, index, axis=1) * valid
        inside = dense.sum(axis=1).astype(np.float32)
        return cls(index, weight.astype(np.float32), inside, dense.shape[1])

    def apply(self, values: np.ndarray, axis: int) -> np.ndarray:
        """Resample ``values`` along ``axis`` (float32)."""
        shape = [1] * values.ndim
        shape[axis] = self.index.shape[0]
        out = None
        for t in range(self.index.shape[1]):
            term = np.take(values, self.index[:, t], axis=axis)
            term *= self.weight[:, t].reshape(shape)
            out = term if out is None else np.add(out, term, out=out)
        return out


def plane_taps(header: Header, size: int) -> tuple[Taps, Taps]:
    """Row and column taps onto a square field of view with square output pixels."""
    row_mm, col_mm = header.pixel_spacing or (1.0, 1.0)
    extent = max(header.rows * row_mm, header.columns * col_mm)
    return (
        Taps.from_weights(axis_weights(header.rows, row_mm, extent, size)),
        Taps.from_weights(axis_weights(header.columns, col_mm, extent, size)),
    )


def resample_planes(planes: np.ndarray, taps: tuple[Taps, Taps]) -> np.ndarray:
    """(frames, rows, cols) -> (frames, size, size), float32 (``Taps.apply`` on both axes)."""
    rows, columns = taps[0].matrix, taps[1].matrix
    if planes.dtype != np.float32 or planes.shape[1:] != (rows.shape[1], columns.shape[1]):
        return taps[1].apply(taps[0].apply(planes, axis=1), axis=2)
    out = np.empty((planes.shape[0], rows.shape[0], columns.shape[0]), np.float32)
    for frame, plane in zip(out, planes, strict=True):
        across = np.ascontiguousarray(_csr_product(rows, plane).T)  # (cols, size)
        frame[...] = _csr_product(columns, across).T
    return out


def _csr_product(matrix: csr_matrix, values: np.ndarray) -> np.ndarray:
    """``matrix @ values`` for float32 ``values`` (2D)."""
    return np.asarray(matrix @ values, dtype=np.float32)


def resample_depth(stack: np.ndarray, depth: int) -> np.ndarray:
    """(n, size, size) evenly spaced slices -> (depth, size, size) over the same extent."""
    count = stack.shape[0]
    return Taps.from_weights(axis_weights(count, 1.0, float(count), depth)).apply(stack, axis=0)


# -- ordering -------------------------------------------------------------------------------
def order_by_position(keys: list[float]) -> tuple[list[int], str]:
    """Indices sorted by ``keys`` (positions along the normal), or [] and the problem."""
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    gaps = np.diff([keys[i] for i in order])
    if len(gaps) == 0:
        return order, ""
    if np.any(np.abs(gaps) < 1e-6):
        return [], "two slices at the same position"
    median = float(np.median(gaps))
    if np.any(np.abs(gaps - median) > SPACING_TOLERANCE * median):
        big = np.any(gaps > MISSING_SLICE_GAP * median)
        return [], "missing slice" if big else "uneven spacing"
    return order, ""


def slice_keys(headers: list[Header]) -> tuple[list[float], str]:
    """Each slice's position along the normal (or InstanceNumber), or a problem."""
    orientations = {
        tuple(round(v, 4) for v in h.orientation) if h.orientation else () for h in headers
    }
    if len(orientations) > 1:
        return [], "mixed orientations"
    orientation = headers[0].orientation
    if orientation and all(h.position for h in headers):
        normal = np.cross(orientation[:3], orientation[3:])
        return [float(np.dot(normal, h.position)) for h in headers], ""
    if all(h.instance_number is not None for h in headers):
        return [float(h.instance_number) for h in headers], ""
    return [], "slices have neither ImagePositionPatient nor InstanceNumber"


def frame_order(header: Header) -> tuple[list[int], str]:
    """Order of a multi-frame object's frames, or [] and the problem."""
    if header.frame_positions and header.orientation:
        normal = np.cross(header.orientation[:3], header.orientation[3:])
        return order_by_position([float(np.dot(normal, p)) for p in header.frame_positions])
    if header.frame_offsets:
        return order_by_position(list(header.frame_offsets))
    return list(range(header.frames)), ""


# -- preprocessing --------------------------------------------------------------------------
def preprocess_file(
    ds: Dataset, header: Header, prep: Preprocess, taps: tuple[Taps, Taps] | None = None
) -> np.ndarray:
    """A standalone file's array: (size, size), or (depth, size, size) if multi-frame."""
    order, problem = frame_order(header)
    if problem:
        raise _Reject("inconsistent series", f"frames: {problem}")
    values = modality_frames(ds, header)
    if order != list(range(header.frames)):
        values = values[order]
    bounds = window_bounds(ds, prep.window) or value_range(values)
    display = to_display(values, bounds, _inverted(ds))
    planes = resample_planes(display, taps or plane_taps(header, prep.size))
    array = planes[0] if header.frames == 1 else resample_depth(planes, prep.depth)
    return np.clip(array, 0.0, 1.0, out=array)  # rounding can leave 1 + 1e-7


@dataclass
class Slice:
    """One series slice resampled in plane; windowed unless no window was known.

    Unwindowed slices keep the resampled modality values and the share of each output
    pixel that lies inside the image, so the volume's range can be applied later.
    """

    values: np.ndarray
    inside: np.ndarray | None = None
    low: float = 0.0
    high: float = 0.0
    invert: bool = False

    def display(self, low: float, high: float) -> np.ndarray:
        if self.inside is None:
            return self.values
        shown = (self.values - np.float32(low) * self.inside) / np.float32(high - low)
        if self.invert:
            shown = self.inside - shown
        return np.clip(shown, 0.0, 1.0)


def preprocess_slice(
    ds: Dataset, header: Header, prep: Preprocess, taps: tuple[Taps, Taps] | None = None
) -> Slice:
    """One series slice, in-plane resampled (windowed when a window is known)."""
    values = modality_frames(ds, header)
    taps = taps or plane_taps(header, prep.size)
    bounds = window_bounds(ds, prep.window)
    if bounds is not None:
        return Slice(resample_planes(to_display(values, bounds, _inverted(ds)), taps)[0])
    low, high = float(values.min()), float(values.max())
    inside = np.outer(taps[0].inside, taps[1].inside)
    resampled = resample_planes(values, taps)[0]
    return Slice(resampled, inside, low, high, _inverted(ds))


def assemble(slices: list[Slice], depth: int | None) -> np.ndarray:
    """Ordered slices -> volume (depth, size, size); one slice with depth None -> image."""
    raw = [s for s in slices if s.inside is not None]
    low, high = 0.0, 1.0
    if raw:
        low, high = value_range(np.array([v for s in raw for v in (s.low, s.high)]))
    planes = [s.display(low, high) for s in slices]
    array = planes[0] if depth is None else resample_depth(np.stack(planes), depth)
    return np.clip(array, 0.0, 1.0).astype(np.float32)


# -- the scan -------------------------------------------------------------------------------
_Content = tuple[bytes, str] | OSError  # a file's bytes and content hash, or why not


def _read(path: Path, hashed: bool = True) -> _Content:
    """A file's bytes and SHA-256 (only needed with a cache: "" without), or the error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return exc
    return data, content_hash(data) if hashed else ""


@dataclass
class _File:
    path: Path
    digest: str
    header: Header
    slice: Slice | _Reject | None = None


class _Loader:
    """One pass over a tree: per-file work in ``add``, series work in ``finish``."""

    def __init__(self, prep: Preprocess, cache: ImageCache | None) -> None:
        self.prep, self.cache = prep, cache
        self.items: list[tuple[tuple, ImageItem]] = []
        self.quarantined: list[Quarantined] = []
        self.slices: list[_File] = []
        self.taps: dict[tuple, tuple[Taps, Taps]] = {}  # per image geometry

    def _taps(self, header: Header) -> tuple[Taps, Taps]:
        key = (header.rows, header.columns, header.pixel_spacing)
        if key not in self.taps:
            self.taps[key] = plane_taps(header, self.prep.size)
        return self.taps[key]

    def quarantine(self, path: Path, reject: _Reject) -> None:
        self.quarantined.append(Quarantined(str(path), reject.kind, reject.detail))

    def add(self, path: Path) -> None:
        """Read, hash and (unless cached) parse one file; process it unless it is a slice."""
        content = _read(path, hashed=self.cache is not None)
        if isinstance(content, OSError):
            self.quarantine(path, _Reject("not DICOM", f"cannot read the file ({content})"))
            return
        data, digest = content
        ds, header = self._header(digest, data)
        if isinstance(header, _Reject):
            self.quarantine(path, header)
            return
        file = _File(path, digest, header)
        if header.is_series_slice and not header.series_uid:
            detail = "no SeriesInstanceUID: cannot group the slice"
            self.quarantine(path, _Reject("inconsistent series", detail))
        elif header.is_series_slice:
            if ds is not None:  # decode now: the bytes are parsed already
                file.slice = self._decode_slice(file, ds)
            self.slices.append(file)
        else:
            self._standalone(file, ds, data)

    def _header(self, digest: str, data: bytes) -> tuple[Dataset | None, Header | _Reject]:
        if self.cache is not None:
            record = self.cache.header(digest)
            if record is not None:
                cached = _header_from_record(record)
                if cached is not None:
                    return None, cached
        try:
            ds, header = parse_file(data)
        except _Reject as reject:
            outcome: Header | _Reject = reject
            ds = None
        else:
            outcome = header
        if self.cache is not None:
            self.cache.put_header(digest, _header_record(outcome))
        return ds, outcome

    def _standalone(self, file: _File, ds: Dataset | None, data: bytes) -> None:
        header = file.header
        key = "i" + file.digest
        shape = _shape(self.prep, volume=header.frames > 1)
        array = self._cached(key, shape)
        if array is None and not self._cached_outcome(file.path, key):
            try:
                if ds is None:
                    ds, _ = parse_file(data)
                array = preprocess_file(ds, header, self.prep, self._taps(header))
            except _Reject as reject:
                self.quarantine(file.path, reject)
                self._store_outcome(key, reject)
                return
            if self.cache is not None:
                self.cache.put_array(key, array)
        if array is not None:
            self._emit([file], array, volume=header.frames > 1)

    def _cached(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        return self.cache.array(key, shape) if self.cache is not None else None

    def _cached_outcome(self, path: Path, key: str) -> bool:
        """Quarantine from a cached outcome; True when there was one."""
        outcome = self.cache.outcome(key) if self.cache is not None else None
        if outcome is None or outcome[0] not in QUARANTINE_KINDS:
            return False
        self.quarantine(path, _Reject(*outcome))
        return True

    def _store_outcome(self, key: str, reject: _Reject) -> None:
        if self.cache is not None:
            self.cache.put_outcome(key, reject.kind, reject.detail)

    def _decode_slice(self, file: _File, ds: Dataset) -> Slice | _Reject:
        try:
            return preprocess_slice(ds, file.header, self.prep, self._taps(file.header))
        except _Reject as reject:
            self._store_outcome("s" + file.digest, reject)
            return reject

    def _reload_slice(self, file: _File) -> Slice | _Reject:
        """Decode a slice whose header came from the cache (its volume is not cached)."""
        try:
            data = file.path.read_bytes()
        except OSError as exc:
            return _Reject("not DICOM", f"cannot read the file ({exc})")
        if content_hash(data) != file.digest:
            return _Reject("inconsistent series", "the file changed during the scan")
        try:
            ds, _ = parse_file(data)
        except _Reject as reject:
            return reject
        return self._decode_slice(file, ds)

    def finish(self) -> tuple[list[ImageItem], list[Quarantined]]:
        """Assemble the series, then sort items and quarantined files."""
        groups: dict[tuple[str, str, str], list[_File]] = defaultdict(list)
        for file in self.slices:
            h = file.header
            groups[(h.patient_id, h.study_uid, h.series_uid)].append(file)
        for key in sorted(groups):
            try:
                self._series(groups[key])
            except Exception as exc:  # a bug or an odd series must not stop the others
                reject = _Reject("undecodable", f"unexpected error: {_one_line(exc)}")
                for file in groups[key]:
                    self.quarantine(file.path, reject)
        items = [item for _, item in sorted(self.items, key=lambda pair: pair[0])]
        quarantined = sorted(self.quarantined, key=lambda q: (q.path, q.kind, q.detail))
        return items, quarantined

    def _series(self, files: list[_File]) -> None:
        if len(files) > 1:
            keys, problem = slice_keys([f.header for f in files])
            order, problem = order_by_position(keys) if not problem else ([], problem)
            problem = problem or _geometry_problem([f.header for f in files])
            if problem:
                detail = f"{problem} (series of {len(files)} files)"
                for file in files:
                    self.quarantine(file.path, _Reject("inconsistent series", detail))
                return
            files = [files[i] for i in order]
        volume = len(files) > 1
        key = ("v" + combined_hash([f.digest for f in files])) if volume else "i" + files[0].digest
        array = self._cached(key, _shape(self.prep, volume))
        if array is None:
            array = self._build(files, volume)
            if array is None:
                return
            if self.cache is not None:
                self.cache.put_array(key, array)
        self._emit(files, array, volume)

    def _build(self, files: list[_File], volume: bool) -> np.ndarray | None:
        for file in files:
            if file.slice is None and self.cache is not None:
                outcome = self.cache.outcome("s" + file.digest)
                if outcome is not None and outcome[0] in QUARANTINE_KINDS:
                    file.slice = _Reject(*outcome)
        for file in files:
            if file.slice is None:
                file.slice = self._reload_slice(file)
        bad = [f for f in files if isinstance(f.slice, _Reject)]
        if bad:
            first = bad[0]
            for file in files:
                reject = file.slice if isinstance(file.slice, _Reject) else None
                reject = reject or _Reject(
                    "inconsistent series", f"slice {first.path.name} is {first.slice.kind}"
                )
                self.quarantine(file.path, reject)
            return None
        return assemble([f.slice for f in files], self.prep.depth if volume else None)

    def _emit(self, files: list[_File], array: np.ndarray, volume: bool) -> None:
        h = files[0].header
        item = ImageItem(
            patient_id=h.patient_id,
            study_uid=h.study_uid,
            study_date=h.study_date,
            series_uid=h.series_uid,
            series_number=h.series_number,
            instance_uid="" if volume else h.instance_uid,
            modality=h.modality,
            files=tuple(str(f.path) for f in files),
            identity_removed=all(f.header.identity_removed for f in files),
            array=array,
            sex=h.sex,
            age_years=h.age_years,
        )
        number = 0 if volume else (h.instance_number or 0)
        order = (h.patient_id, h.study_uid, h.series_uid, number, item.instance_uid, item.files)
        self.items.append((order, item))


def _shape(prep: Preprocess, volume: bool) -> tuple[int, ...]:
    return (prep.depth, prep.size, prep.size) if volume else (prep.size, prep.size)


def _geometry_problem(headers: list[Header]) -> str:
    if len({(h.rows, h.columns, h.pixel_spacing) for h in headers}) > 1:
        return "slices differ in size or pixel spacing"
    return ""


def _header_record(outcome: Header | _Reject) -> dict[str, Any]:
    if isinstance(outcome, _Reject):
        return {"quarantine": [outcome.kind, outcome.detail]}
    return {"header": outcome.to_record()}


def _header_from_record(record: dict[str, Any]) -> Header | _Reject | None:
    if "header" in record and isinstance(record["header"], dict):
        return Header.from_record(record["header"])
    outcome = record.get("quarantine")
    if isinstance(outcome, list) and len(outcome) == 2 and outcome[0] in QUARANTINE_KINDS:
        return _Reject(str(outcome[0]), str(outcome[1]))
    return None


def load_images(
    dicom_root: Path,
    prep: Preprocess,
    cache_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[ImageItem], list[Quarantined]]:
    """Every usable image and volume under ``dicom_root``, and every file left out.

    ``dicom_root`` may also be a single file (one image, or a one-file series), read by
    the same rules (used to predict on one file). ``cache_dir`` (optional) keeps
    decoded arrays and header summaries between calls; ``progress(done, total)`` is
    called after each file.
    """
    root = Path(dicom_root)
    paths = [root] if root.is_file() else sorted(map(Path, _files_under(root)))
    if cache_dir is not None and Path(cache_dir).resolve().is_relative_to(root.resolve()):
        inner = Path(cache_dir).resolve()  # a cache inside the tree is not part of it
        paths = [p for p in paths if not p.resolve().is_relative_to(inner)]
    chunked = len(paths) >= CHUNK_MIN_FILES
    cache = (
        ImageCache(Path(cache_dir), prep.key(), chunked=chunked, header_key=header_key())
        if cache_dir
        else None
    )
    loader = _Loader(prep, cache)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd headers; we quarantine
            for done, path in enumerate(paths, start=1):
                _add_safely(loader, path)
                if progress is not None:
                    progress(done, len(paths))
            return loader.finish()
    finally:
        if cache is not None:
            cache.flush()


def _files_under(root: Path) -> list[str]:
    """Every file under ``root``, as ``p for p in root.rglob("*") if p.is_file()`` lists
    them (symlinked files included, symlinked folders not entered, unreadable folders
    skipped), but from ``os.scandir`` entries, without a stat call per file."""
    files: list[str] = []
    folders = [os.fspath(root)] if root.is_dir() else []
    while folders:
        try:
            with os.scandir(folders.pop()) as scan:
                entries = list(scan)
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    if not entry.is_symlink():
                        folders.append(entry.path)
                elif entry.is_file():
                    files.append(entry.path)
            except OSError:
                continue
    return files


def _add_safely(loader: _Loader, path: Path) -> None:
    """``loader.add`` that turns any unexpected error into a quarantine entry."""
    try:
        loader.add(path)
    except Exception as exc:
        loader.quarantine(path, _Reject("undecodable", f"unexpected error: {_one_line(exc)}"))
