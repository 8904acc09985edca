"""De-identify a site's DICOM tree (PS3.15 Basic Profile) without touching a pixel.

``medfed data deid IN_DIR OUT_DIR`` runs :func:`deidentify_tree`. Per data set
(:func:`deidentify_dataset`):

- every attribute of PS3.15 Table E.1-1 (:mod:`medfed.client.deid_profile`) gets its
  action, at every nesting level: ``X`` removed, ``Z`` emptied, ``D``/``C`` replaced by
  a dummy of the right VR (binary VRs are emptied instead), ``U`` remapped, ``K`` kept.
  Compound codes are resolved by :func:`resolve_action` without IOD-type knowledge:
  ``X/Z``, ``X/D`` and ``X/Z/D`` remove, ``Z/D`` empties, ``X/Z/U*`` keeps the
  referencing sequence and treats its items with the same rules (so the instance UIDs
  inside are remapped and stay consistent). A ``D``/``Z``/``C`` sequence is emptied
  (zero items), never kept with its content;
- all private attributes are removed, and whole overlay groups (60xx), which can
  carry text, not only their data and comments;
- instance UIDs (``U``, and any other non-registry UID outside ``*ClassUID`` and
  ``*SyntaxUID`` attributes) are replaced by ``2.25.<n>``, ``n`` a 128-bit
  HMAC-SHA256 of the original UID under the site key (shaped as a version-4 UUID), so
  one UID maps to the same new UID in every file and on every run with the same key,
  and the file meta's Media Storage SOP Instance UID matches the new SOP Instance UID;
- Patient ID and Patient's Name become one keyed pseudonym of the Patient ID
  (``MF`` + 20 hex digits), so one patient stays one patient (the unit of privacy);
- dates follow the Retain Longitudinal Temporal Information with Modified Dates Option:
  every DA value and the date part of every DT value, listed or not, is moved back by
  a per-patient offset of 1 to 365 days (HMAC of the Patient ID), so intervals within a
  patient are preserved; DT UTC offsets are dropped; times (TM) are kept, since a
  whole-day shift leaves them unchanged. Attributes whose action is plain ``X`` are
  still removed, and Patient's Birth Date keeps its ``Z`` (it is a patient
  characteristic, not longitudinal). A value that is not a full date is emptied. With
  ``shift_dates=False`` dates get the table's actions instead (unlisted dates emptied);
- opt-in, ``retain_patient_characteristics``: the Retain Patient Characteristics Option
  for the four attributes of :data:`PATIENT_CHARACTERISTICS` (Patient's Sex, Age, Size
  and Weight), which are kept where the Basic Profile empties Patient's Sex and removes
  the rest. Sex and age are what a site needs to evaluate the model per subgroup
  (:mod:`medfed.client.fairness`). The option's column in PS3.15 Table E.1-1 also keeps
  Patient's Sex Neutered, Ethnic Group, Pregnancy Status and Smoking Status and cleans
  Allergies, Pre-Medication, Special Needs and Patient State; those still get the Basic
  Profile's action here (retaining less than the option allows), and the method text
  says which four were kept;
- PatientIdentityRemoved = YES, DeidentificationMethod, DeidentificationMethodCodeSequence
  (CID 7050: DCM 113100, plus 113107 when dates are shifted and 113108 when patient
  characteristics are kept) and LongitudinalTemporalInformationModified are set.

Pixel data is never decoded: Pixel Data, Float and Double Float Pixel Data keep their
exact bytes (encapsulated fragments included), the transfer syntax is unchanged, and
every written file is re-read to prove it. Burned-in text in the pixels is therefore
*not* removed: a file whose Burned In Annotation is not ``NO`` (``YES`` or absent) is
flagged in the report for review.

Output layout: ``OUT_DIR/[dicom/]<pseudonym>/<study uid>/<series uid>/<sop uid>.dcm``
(new values only, so folder names such as MRNs do not survive). When IN_DIR is a site
(it has ``dicom/``), ``IN_DIR/dicom/**`` is read and written under ``OUT_DIR/dicom/``;
otherwise the whole of IN_DIR is read. A ``labels.csv`` at the top of IN_DIR is
rewritten with the same mapping (:func:`remap_labels`), so the output stays trainable.
Anything else is not copied. Nothing is ever written into IN_DIR; each file is written
atomically; ``deid_report.json`` in OUT_DIR holds counts, new relative paths, reasons
and flags, never an original identifier or input path.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import re
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from medfed.client.deid_profile import EDITION, lookup
from medfed.client.image_cache import CACHE_DIR_NAME
from medfed.common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

REPORT_NAME = "deid_report.json"
LABELS_NAME = "labels.csv"
DICOM_DIR = "dicom"
MIN_KEY_BYTES = 16
KEY_BYTES = 32
MAX_SHIFT_DAYS = 365
PROFILE_NAME = f"DICOM PS3.15 {EDITION} Basic Application Level Confidentiality Profile"
METHOD = (
    "medfed deid",
    "PS3.15 Basic Application Level Confidentiality Profile",
    "private tags removed; keyed UID remap; keyed patient pseudonym",
)
# ``consent`` carries a patient's withdrawal through de-identification (yes/no, no identity).
LABEL_COLUMNS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PatientID",
    "label",
    "consent",
)
WITHDRAWN_NAME = "withdrawn.txt"

_DUMMY_TEXT = "DEIDENTIFIED"
_DUMMY = {"AS": "000Y", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "UR": ""}
_NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN", "AT"})
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_BIRTH_DATE = 0x00100030
_META_REMOVE = (0x00020016, 0x00020017, 0x00020018, 0x00020026, 0x00020027, 0x00020028)
_META_REMOVE_PRIVATE = (0x00020100, 0x00020102)
_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"
_COMPOUND = {"X/Z": "X", "X/D": "X", "X/Z/D": "X", "Z/D": "Z", "X/Z/U*": "U*", "C": "D"}
PATIENT_CHARACTERISTICS = {  # kept by the Retain Patient Characteristics Option (opt-in)
    0x00100040: "Patient's Sex",
    0x00101010: "Patient's Age",
    0x00101020: "Patient's Size",
    0x00101030: "Patient's Weight",
}
DATES_OPTION = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
PATIENT_OPTION = ("113108", "Retain Patient Characteristics Option")


class DeidError(ValueError):
    """A de-identification run cannot start (bad directories, key or labels.csv)."""


# -- keyed mapping -------------------------------------------------------------------


@dataclass(frozen=True)
class DeidContext:
    """The site key, date policy and options; every mapping is a pure function of them."""

    key: bytes = field(repr=False)
    shift_dates: bool = True
    retain_patient_characteristics: bool = False

    def __post_init__(self) -> None:
        if len(self.key) < MIN_KEY_BYTES:
            raise DeidError(f"the key must have at least {MIN_KEY_BYTES} bytes")

    def _mac(self, domain: str, value: str) -> bytes:
        message = domain.encode() + b"\x00" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self.key, message, hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """``2.25.<int>`` of a version-4 UUID made from HMAC(key, UID): 44 chars at most."""
        digest = self._mac("uid", str(value).strip("\x00 "))
        return "2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int)

    def pseudonym(self, patient_id: str) -> str:
        """The patient's keyed pseudonym, used as Patient ID, Patient's Name and folder."""
        return "MF" + self._mac("patient", str(patient_id).strip()).hex()[:20].upper()

    def day_shift(self, patient_id: str) -> int:
        """Days (1..365) this patient's dates move back."""
        digest = self._mac("date-shift", str(patient_id).strip())
        return 1 + int.from_bytes(digest[:8], "big") % MAX_SHIFT_DAYS

    def ref(self, text: str) -> str:
        """A short keyed reference for an input path (lets the report name no path)."""
        return self._mac("ref", text).hex()[:12]


def resolve_action(code: str) -> str:
    """One of X, Z, D, U, U* (keep and recurse) or K for a Table E.1-1 action code."""
    return _COMPOUND.get(code, code)


# -- one data set --------------------------------------------------------------------


def deidentify_dataset(ds: Dataset, ctx: DeidContext) -> None:
    """De-identify ``ds`` (and its file meta and preamble) in place; pixels are untouched.

    A data set without Patient ID gets the pseudonym (and date shift) of the empty ID,
    so such files are grouped as one patient; one without SOP Instance UID gets the
    remapped Media Storage SOP Instance UID. The 128-byte preamble, which may hold
    another format's header, is zeroed.
    """
    patient_id = str(ds.get("PatientID", "") or "")
    shift = ctx.day_shift(patient_id) if ctx.shift_dates else 0
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    meta_uid = str(getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPInstanceUID", ""))
    ds.remove_private_tags()
    _clean(ds, ctx, shift)
    pseudonym = ctx.pseudonym(patient_id)
    ds.PatientID = pseudonym
    ds.PatientName = pseudonym
    if not sop_uid and meta_uid:
        ds.SOPInstanceUID = ctx.uid(meta_uid)
    _mark(ds, ctx)
    _clean_file_meta(ds)
    if getattr(ds, "preamble", None) is not None:
        ds.preamble = b"\x00" * 128


def _clean(dataset: Dataset, ctx: DeidContext, shift: int) -> None:
    for tag in list(dataset.keys()):
        _clean_element(dataset, dataset[tag], ctx, shift)


def _clean_element(dataset: Dataset, elem: DataElement, ctx: DeidContext, shift: int) -> None:
    row = lookup(elem.tag)
    code = row.action if row else "K"
    if _is_overlay(elem.tag):
        code = "X"
    if ctx.retain_patient_characteristics and elem.tag in PATIENT_CHARACTERISTICS:
        code = "K"
    if elem.VR in ("DA", "DT", "TM") and _temporal(elem, code, ctx, shift):
        return
    action = resolve_action(code)
    if action == "X":
        del dataset[elem.tag]
    elif elem.VR == "SQ":
        _clean_sequence(elem, action, ctx, shift)
    elif elem.VR == "UI" and (action in ("U", "D") or _looks_like_instance_uid(elem)):
        elem.value = _map_values(elem.value, ctx.uid)
    elif action == "Z":
        elem.value = None
    elif action == "D":
        elem.value = _dummy(elem.VR)


def _clean_sequence(elem: DataElement, action: str, ctx: DeidContext, shift: int) -> None:
    if action in ("Z", "D"):
        elem.value = Sequence()
        return
    for item in elem.value:
        _clean(item, ctx, shift)


def _is_overlay(tag: int) -> bool:
    group = tag >> 16
    return 0x6000 <= group <= 0x60FF and group % 2 == 0


def _looks_like_instance_uid(elem: DataElement) -> bool:
    """Safety net beyond the table: a non-registry UID that names no class or syntax."""
    keyword = elem.keyword or ""
    if keyword.endswith(("ClassUID", "SyntaxUID", "ClassUIDInFile", "SyntaxUIDInFile")):
        return False
    values = elem.value if elem.VM > 1 else [elem.value]
    return any(v and str(v) not in UID_dictionary for v in values)


def _map_values(value: Any, func: Callable[[str], str]) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, str | bytes):
        return func(value.decode() if isinstance(value, bytes) else value)
    return [func(str(v)) for v in value]


def _dummy(vr: str) -> Any:
    if vr in _NUMERIC_VRS:
        return "0" if vr in ("IS", "DS") else 0
    if vr in _BINARY_VRS:
        return None
    return _DUMMY.get(vr, _DUMMY_TEXT)


# -- dates ---------------------------------------------------------------------------

_DATE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")


def _temporal(elem: DataElement, code: str, ctx: DeidContext, shift: int) -> bool:
    """Handle a DA/DT/TM element under the modified-dates option; False: use the table."""
    if not ctx.shift_dates:
        if code == "K" and elem.VR in ("DA", "DT"):
            elem.value = None
            return True
        return False
    if code == "X" or elem.tag == _BIRTH_DATE:
        return False
    if elem.VR != "TM":
        elem.value = _map_values(elem.value, lambda v: _shift_value(v, elem.VR, shift))
    return True


def _shift_value(value: str, vr: str, days: int) -> str:
    """Move a DA or DT value back by ``days``; '' when it is not a full date."""
    text = value.strip()
    match = _DATE.match(text)
    if not match or (vr == "DA" and match.end() != len(text)):
        return ""
    try:
        shifted = date(*map(int, match.groups())) - timedelta(days=days)
    except ValueError:
        return ""
    rest = re.split(r"[+-]", text[match.end() :], maxsplit=1)[0] if vr == "DT" else ""
    return shifted.strftime("%Y%m%d") + rest


# -- marks and file meta ---------------------------------------------------------------


def _mark(ds: Dataset, ctx: DeidContext) -> None:
    ds.PatientIdentityRemoved = "YES"
    dates = "per-patient date shift" if ctx.shift_dates else "dates removed"
    method = [*METHOD, dates]
    codes = [("113100", "Basic Application Confidentiality Profile")]
    if ctx.shift_dates:
        codes.append(DATES_OPTION)
    if ctx.retain_patient_characteristics:
        method.append("patient sex, age, size and weight kept")
        codes.append(PATIENT_OPTION)
    ds.DeidentificationMethod = method
    ds.DeidentificationMethodCodeSequence = Sequence([_code_item(*c) for c in codes])
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if ctx.shift_dates else "REMOVED"


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _clean_file_meta(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for tag in (*_META_REMOVE, *_META_REMOVE_PRIVATE):
        if tag in meta:
            del meta[tag]
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "ImplementationVersionName" in meta:
        del meta.ImplementationVersionName


def is_deidentified(ds: Dataset) -> bool:
    """True when ``ds`` says it passed de-identification (the site policy's check)."""
    removed = str(ds.get("PatientIdentityRemoved", "")).strip().upper() == "YES"
    return removed and bool(ds.get("DeidentificationMethod"))


def burned_in_annotation(ds: Dataset) -> str:
    """'NO', 'YES' or 'absent': anything but 'NO' means text may remain in the pixels."""
    value = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    return value or "absent"


# -- reading, checking, writing one file ---------------------------------------------


@dataclass(frozen=True)
class Written:
    """A de-identified file: its new path relative to OUT_DIR and its flags."""

    path: str
    patient: str
    study: str
    series: str
    burned_in_annotation: str

    @property
    def flagged(self) -> bool:
        return self.burned_in_annotation != "NO"


@dataclass(frozen=True)
class Skipped:
    """A file that was not written. ``source`` (input path) stays out of the JSON report."""

    source: Path
    reason: str
    detail: str = ""


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise _Skip("not a DICOM Part 10 file") from exc
    except Exception as exc:
        raise _Skip(f"unreadable DICOM ({type(exc).__name__})", str(exc)) from exc
    problem = _truncation(ds)
    if problem:
        raise _Skip("truncated DICOM file", problem)
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _DIRECTORY_STORAGE:
        raise _Skip("DICOMDIR not copied (the output layout differs)")
    return ds


def _truncation(ds: Dataset) -> str:
    """Why the file looks cut short ('' if it does not): pydicom reads short silently."""
    if len(ds) == 0:
        return "no data set after the file meta"
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and _short(raw):
            return f"element {tag} shorter than its declared length"
    has_pixels = any(t in ds for t in _PIXEL_TAGS)
    if "Rows" in ds and "Columns" in ds and not has_pixels and "Modality" in ds:
        return "image attributes but no pixel data"
    expected = _expected_pixel_bytes(ds)
    if expected and len(ds.get_item(0x7FE00010).value or b"") < expected:
        return "pixel data shorter than rows x columns x frames"
    return ""


def _short(raw: RawDataElement) -> bool:
    defined = raw.length != 0xFFFFFFFF
    return defined and raw.value is not None and len(raw.value) < raw.length


def _expected_pixel_bytes(ds: Dataset) -> int:
    if 0x7FE00010 not in ds or ds.file_meta.get("TransferSyntaxUID") is None:
        return 0
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        return 0
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1))
        if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
            samples = 2  # two chroma samples shared by each pair of pixels
        return (bits * samples * frames + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return 0


def _pixel_digest(ds: Dataset) -> str:
    digest = hashlib.sha256()
    for tag in _PIXEL_TAGS:
        if tag in ds:
            digest.update(tag.to_bytes(4, "big") + bytes(ds.get_item(tag).value or b""))
    return digest.hexdigest()


def _encode(ds: Dataset, pixels: str) -> bytes:
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception as exc:
        raise _Skip(f"cannot be written ({type(exc).__name__})", str(exc)) from exc
    data = buffer.getvalue()
    again = pydicom.dcmread(io.BytesIO(data))
    if _pixel_digest(again) != pixels:
        raise _Skip("pixel data would change on write (not written)")
    return data


def _process(path: Path, ctx: DeidContext) -> tuple[bytes, Written]:
    ds = _read(path)
    pixels = _pixel_digest(ds)
    try:
        deidentify_dataset(ds, ctx)
    except Exception as exc:
        raise _Skip(f"de-identification failed ({type(exc).__name__})", str(exc)) from exc
    if not ds.get("SOPInstanceUID"):
        raise _Skip("no SOP Instance UID")
    patient = str(ds.PatientID)
    study = str(ds.get("StudyInstanceUID", "") or "no-study")
    series = str(ds.get("SeriesInstanceUID", "") or "no-series")
    rel = f"{patient}/{study}/{series}/{ds.SOPInstanceUID}.dcm"
    return _encode(ds, pixels), Written(rel, patient, study, series, burned_in_annotation(ds))


# -- the tree ------------------------------------------------------------------------


@dataclass
class DeidReport:
    """What a run did. :meth:`to_json` is what ``deid_report.json`` holds."""

    out_dir: Path
    shift_dates: bool = True
    retain_patient_characteristics: bool = False
    files_seen: int = 0
    written: list[Written] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    labels: dict[str, Any] | None = None

    @property
    def flagged(self) -> list[Written]:
        return [w for w in self.written if w.flagged]

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def options(self) -> list[str]:
        """The PS3.15 options applied on top of the Basic Profile (their CID 7050 names)."""
        chosen = [
            (self.shift_dates, DATES_OPTION),
            (self.retain_patient_characteristics, PATIENT_OPTION),
        ]
        return [f"{name} (DCM {code})" for on, (code, name) in chosen if on]

    def to_json(self, ctx: DeidContext | None = None) -> dict[str, Any]:
        """Counts, new relative paths, reasons and flags: no original identifier."""
        return {
            "tool": "medfed data deid",
            "profile": PROFILE_NAME,
            "options": self.options(),
            "dates": "shifted per patient (1-365 days back)" if self.shift_dates else "removed",
            "patient_characteristics": (
                f"kept: {', '.join(PATIENT_CHARACTERISTICS.values())}"
                if self.retain_patient_characteristics
                else "Patient's Sex emptied; Patient's Age, Size and Weight removed"
            ),
            "pixel_data": "bit-identical to the input (verified by re-reading every file)",
            "burned_in_annotation": "not removed from pixels; files without "
            "BurnedInAnnotation=NO are flagged for review",
            "files_seen": self.files_seen,
            "files_written": len(self.written),
            "files_skipped": len(self.skipped),
            "patients": len({w.patient for w in self.written}),
            "studies": len({w.study for w in self.written}),
            "series": len({w.series for w in self.written}),
            "burned_in_annotation_flags": [w.path for w in self.flagged],
            "skipped_by_reason": self.skipped_by_reason(),
            "skipped": [
                {"ref": ctx.ref(str(s.source)) if ctx else None, "reason": s.reason}
                for s in self.skipped
            ],
            "labels": self.labels,
            "written": [
                {"path": w.path, "burned_in_annotation": w.burned_in_annotation}
                for w in self.written
            ],
        }


@dataclass(frozen=True)
class DeidOptions:
    """Run options. ``labels``: rewrite IN_DIR/labels.csv when it exists;
    ``retain_patient_characteristics``: keep sex, age, size and weight (opt-in)."""

    shift_dates: bool = True
    labels: bool = True
    overwrite: bool = False
    retain_patient_characteristics: bool = False


def deidentify_tree(
    in_dir: Path,
    out_dir: Path,
    key: bytes,
    options: DeidOptions | None = None,
    on_file: Callable[[int, int], None] | None = None,
) -> DeidReport:
    """De-identify every DICOM file under ``in_dir`` into ``out_dir``; never write in_dir.

    ``on_file(done, total)`` is called after each file (for a progress bar). Raises
    DeidError before writing anything if the directories, key or labels.csv are unusable.
    """
    options = options or DeidOptions()
    ctx = DeidContext(key, options.shift_dates, options.retain_patient_characteristics)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_dirs(in_dir, out_dir, options.overwrite)
    labels_in = in_dir / LABELS_NAME
    labels = options.labels and labels_in.is_file()
    if labels:
        _read_labels(labels_in)  # fail before writing anything
    withdrawn = _read_withdrawn(in_dir / WITHDRAWN_NAME)
    site = (in_dir / DICOM_DIR).is_dir()
    run = _Run(
        ctx,
        in_dir,
        in_dir / DICOM_DIR if site else in_dir,
        out_dir / DICOM_DIR if site else out_dir,
        out_dir,
        DeidReport(
            out_dir=out_dir,
            shift_dates=options.shift_dates,
            retain_patient_characteristics=options.retain_patient_characteristics,
        ),
        Path(LABELS_NAME) if labels else None,
        (Path(WITHDRAWN_NAME),) if withdrawn is not None else (),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(_files(in_dir))
    for done, path in enumerate(files, start=1):
        run.file(path)
        if on_file:
            on_file(done, len(files))
    report = run.report
    if labels:
        studies = {w.study for w in report.written}
        report.labels = remap_labels(labels_in, out_dir / LABELS_NAME, ctx, studies)
    if withdrawn is not None:
        pseudonyms = sorted(ctx.pseudonym(pid) for pid in withdrawn)
        atomic_write_bytes(out_dir / WITHDRAWN_NAME, "".join(f"{p}\n" for p in pseudonyms).encode())
    atomic_write_json(out_dir / REPORT_NAME, report.to_json(ctx))
    return report


@dataclass
class _Run:
    """One tree run: where files come from and go, and what has been written."""

    ctx: DeidContext
    in_dir: Path
    src_root: Path
    dst_root: Path
    out_dir: Path
    report: DeidReport
    labels: Path | None
    side_files: tuple[Path, ...] = ()
    paths: set[str] = field(default_factory=set)

    def file(self, path: Path) -> None:
        """De-identify one input file, or record why it was skipped."""
        source = path.relative_to(self.in_dir)
        if source == self.labels or source in self.side_files:
            return
        self.report.files_seen += 1
        try:
            if not path.is_relative_to(self.src_root):
                raise _Skip("outside the DICOM folder (not copied)")
            self.report.written.append(self._write(path))
        except _Skip as skip:
            self.report.skipped.append(Skipped(source, skip.reason, skip.detail))
        except OSError as exc:
            reason = f"write failed ({type(exc).__name__})"
            self.report.skipped.append(Skipped(source, reason, str(exc)))

    def _write(self, path: Path) -> Written:
        data, written = _process(path, self.ctx)
        target = self.dst_root / written.path
        rel = target.relative_to(self.out_dir).as_posix()
        if rel in self.paths:
            raise _Skip("duplicate SOP Instance UID (already written)")
        atomic_write_bytes(target, data)
        self.paths.add(rel)
        return replace(written, path=rel)


def _files(root: Path) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        # The site's own preprocessing cache holds no DICOM: not input, not reported.
        dirs[:] = sorted(d for d in dirs if d != CACHE_DIR_NAME)
        for name in names:
            path = Path(folder) / name
            if path.is_file():
                yield path


def check_dirs(in_dir: Path, out_dir: Path, overwrite: bool = False) -> None:
    """Refuse overlapping directories and a non-empty OUT_DIR (unless ``overwrite``)."""
    if not in_dir.is_dir():
        raise DeidError(f"{in_dir}: IN_DIR is not a directory")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if src == dst or dst.is_relative_to(src) or src.is_relative_to(dst):
        raise DeidError(
            f"{out_dir}: OUT_DIR must be outside IN_DIR {in_dir} (and not contain it); "
            "de-identification never writes into IN_DIR"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise DeidError(f"{out_dir}: OUT_DIR exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DeidError(f"{out_dir}: OUT_DIR is not empty; pass --overwrite to write into it")


# -- labels.csv ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Labels:
    columns: tuple[str, ...]
    dropped: tuple[str, ...]
    rows: tuple[dict[str, str], ...]


def _read_labels(path: Path) -> _Labels:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = tuple(h.strip() for h in reader.fieldnames or ())
            rows = tuple({k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DeidError(f"{path}: cannot read labels.csv ({exc})") from exc
    if "label" not in header or not {"StudyInstanceUID", "PatientID"} & set(header):
        raise DeidError(
            f"{path}: expected a 'label' column and a 'StudyInstanceUID' and/or 'PatientID' "
            f"column, got {', '.join(header) or 'no header'}"
        )
    columns = tuple(c for c in header if c in LABEL_COLUMNS)
    dropped = tuple(c for c in header if c not in LABEL_COLUMNS)
    return _Labels(columns, dropped, rows)


def _read_withdrawn(path: Path) -> frozenset[str] | None:
    """The withdrawn list beside the input (mapped to pseudonyms in OUT_DIR), if any.

    Without it a withdrawal recorded by the original Patient ID would no longer match
    the de-identified data, and the patient would be used again.
    """
    from medfed.client.consent import ConsentError, read_withdrawn_list

    if not path.exists():
        return None
    try:
        return read_withdrawn_list(path)
    except ConsentError as exc:
        raise DeidError(str(exc)) from None


def remap_labels(
    labels_path: Path, out_path: Path, ctx: DeidContext, studies: set[str] | None = None
) -> dict[str, Any]:
    """Write labels.csv with UIDs and Patient IDs mapped exactly as in the DICOM files.

    Only the known columns (:data:`LABEL_COLUMNS`) are kept; others could identify and
    are dropped (their names are reported). ``studies``: the new Study Instance UIDs
    written, to count label rows that match no written study.
    """
    labels = _read_labels(labels_path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=labels.columns, lineterminator="\n")
    writer.writeheader()
    unmatched = 0
    for row in labels.rows:
        new = {c: _map_label(c, row.get(c, ""), ctx) for c in labels.columns}
        study = new.get("StudyInstanceUID")
        unmatched += bool(studies is not None and study and study not in studies)
        writer.writerow(new)
    atomic_write_text(out_path, buffer.getvalue())
    return {
        "rows": len(labels.rows),
        "columns": list(labels.columns),
        "dropped_columns": list(labels.dropped),
        "rows_without_a_written_study": unmatched,
    }


def _map_label(column: str, value: str, ctx: DeidContext) -> str:
    if not value or column in ("label", "consent"):
        return value
    if column == "PatientID":
        return ctx.pseudonym(value)
    return ctx.uid(value)


# -- the key -------------------------------------------------------------------------


def load_or_create_key(path: Path, forbidden: tuple[Path, ...] = ()) -> tuple[bytes, bool]:
    """Read the site key (raw bytes, or hex text) or create it; return (key, created).

    A new key is 32 random bytes in a file of mode 0600. The key must not lie inside
    any ``forbidden`` directory (OUT_DIR, which may leave the hospital, and IN_DIR).
    """
    resolved = path.expanduser().resolve()
    for folder in forbidden:
        if resolved.is_relative_to(folder.resolve()):
            raise DeidError(f"{path}: the key file must not be inside {folder}")
    if resolved.is_file():
        return _parse_key(resolved), False
    if resolved.exists():
        raise DeidError(f"{path}: key file exists but is not a regular file")
    resolved.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(resolved, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise DeidError(f"{path}: cannot create the key file ({exc.strerror})") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key, True


def _parse_key(path: Path) -> bytes:
    data = path.read_bytes()
    text = data.strip()
    if re.fullmatch(rb"[0-9a-fA-F]+", text or b"-") and len(text) % 2 == 0:
        data = bytes.fromhex(text.decode())
    if len(data) < MIN_KEY_BYTES:
        raise DeidError(f"{path}: the key must have at least {MIN_KEY_BYTES} bytes")
    return data
