"""Which kind of input a path is (patients' CSV or DICOM), checked against the model.

Done before any parsing so that a DICOM given to a tabular model, or a CSV given to an
imaging model, gets one clear mismatch error instead of a parser's complaint.
"""

from __future__ import annotations

from pathlib import Path

from medfed.inference.errors import ModelInputMismatch, PredictError
from medfed.inference.model_file import LoadedModel

_DICOM_MAGIC_OFFSET = 128
_CSV_SUFFIXES = (".csv", ".tsv", ".txt")


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file ('DICM' after the 128-byte preamble) or a ``.dcm`` file."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def looks_like_csv(path: Path) -> bool:
    """A ``.csv``/``.tsv``/``.txt`` file, or one whose first line is text with a comma."""
    if path.suffix.lower() in _CSV_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            first = handle.readline(4096).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return "," in first


def input_kind(path: Path) -> str:
    """'csv', 'dicom-file', 'dicom-folder', 'folder' or 'file'; PredictError if absent."""
    if path.is_dir():
        has_dicom = any(is_dicom_file(p) for p in _first_files(path))
        return "dicom-folder" if has_dicom else "folder"
    if not path.is_file():
        raise PredictError(f"{path}: no such input file or folder")
    if is_dicom_file(path):
        return "dicom-file"
    return "csv" if looks_like_csv(path) else "file"


def check_input_kind(model: LoadedModel, path: Path) -> str:
    """Raise ModelInputMismatch when ``path`` is not the kind of input ``model`` takes.

    A tabular model takes a file that is not DICOM (the CSV reader checks the rest); an
    imaging model anything but a CSV (the DICOM reader checks the rest).
    """
    kind = input_kind(path)
    if model.is_imaging and kind == "csv":
        raise ModelInputMismatch(
            f"{path}: a CSV file, but the model ({model.checkpoint}) is an imaging model "
            f"({model.describe()}) and expects a DICOM file or series folder"
        )
    if not model.is_imaging and kind in ("dicom-file", "dicom-folder", "folder"):
        what = {"dicom-file": "a DICOM file", "dicom-folder": "a folder of DICOM files"}
        raise ModelInputMismatch(
            f"{path}: {what.get(kind, 'a folder')}, but the model ({model.checkpoint}) is a "
            f"tabular model ({model.describe()}) and expects a CSV file of patients"
        )
    if not model.is_imaging and kind == "file":
        raise ModelInputMismatch(
            f"{path}: neither a CSV file nor DICOM; the model ({model.checkpoint}) is a "
            f"tabular model ({model.describe()}) and expects a CSV file of patients"
        )
    return kind


def _first_files(folder: Path, limit: int = 50) -> list[Path]:
    """Up to ``limit`` files under ``folder`` (enough to tell a DICOM series)."""
    found: list[Path] = []
    for p in folder.rglob("*"):
        if p.is_file():
            found.append(p)
            if len(found) >= limit:
                break
    return found
