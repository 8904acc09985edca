"""A site-local cache of decoded, preprocessed DICOM images, keyed by file content.

Decoding DICOM (JPEG 2000 above all) costs far more than reading the bytes, and a site
reads the same files every round and every run. The cache stores, under ``root``:

- one *header record* per file: the header fields needed to group and order files, or
  the reason the file was quarantined. Keyed by the SHA-256 of the file's bytes only, so
  a later pass reads and hashes each file but never parses it again. The records of a
  pass are written together as one JSON batch file at its end (``flush``; creating a
  file per record cost more than parsing the header), and batches are merged into one
  when there are more than ``MAX_BATCHES``;
- one *entry* per image or volume and preprocessing: the array (``.npy``) or the reason
  it could not be decoded (``.json``). Keyed by the content hash of the source file(s)
  and, through the folder, by ``Preprocess.key()``.

Layout (``<env>`` names the decoder versions, so that installing or upgrading a pixel
data plugin never serves a stale result; an old ``<env>`` folder can simply be deleted)::

    <root>/v1-<env>/headers/batch-<hash of the content>.json   {"records": {sha256: ...}}
    <root>/v1-<env>/prep-<hash of Preprocess.key()>/key.txt
    <root>/v1-<env>/prep-<hash of Preprocess.key()>/<a>/<entry key>.npy | .json

Nothing in the cache is trusted blindly: a batch must parse, a record must name its own
hash (and pass ``Header.from_record``'s checks in ``dicom_data``), an
array file carries a CRC-32 of its key and bytes in an 8-byte trailer after the ``.npy``
data (``np.load`` still reads the file) and must have the expected shape, dtype and value
range; anything else is treated as a miss, recomputed and overwritten. Writes go to a
temporary file and are renamed into place, so a crash never leaves a half-written
entry. They are not fsynced: the cache is derived data and every entry is verified on
read, while an fsync per entry would cost more than decoding the image. A cache that
cannot be written (full disk, read-only folder) only logs a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

CACHE_FORMAT = "v1"
DECODER_PACKAGES = (
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
)
BATCH_RECORDS = 5000  # header records per batch file (flushed earlier at the end of a pass)
MAX_BATCHES = 8  # more batch files than this are merged into one
_TRAILER_MAGIC = b"MFC1"
_TRAILER_SIZE = 8
log = logging.getLogger(__name__)


def content_hash(data: bytes) -> str:
    """SHA-256 of a file's bytes (hex): the cache key of everything derived from it."""
    return hashlib.sha256(data).hexdigest()


def combined_hash(digests: list[str]) -> str:
    """One key for an ordered list of file hashes (a series)."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def decoder_environment() -> str:
    """Short hash of the installed decoder versions (part of the cache namespace)."""
    versions = []
    for name in DECODER_PACKAGES:
        try:
            versions.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=-")
    return hashlib.sha256(";".join(versions).encode()).hexdigest()[:12]


class ImageCache:
    """Header records and preprocessed arrays of one preprocessing, under ``root``."""

    def __init__(self, root: Path, prep_key: str, environment: str | None = None) -> None:
        self.base = Path(root) / f"{CACHE_FORMAT}-{environment or decoder_environment()}"
        self.headers = self.base / "headers"
        self.entries = self.base / f"prep-{hashlib.sha256(prep_key.encode()).hexdigest()[:16]}"
        self._prep_key = prep_key
        self._made: set[Path] = set()
        self._warned = False
        self._noted = False
        self._known: dict[str, Any] | None = None  # header records on disk, read lazily
        self._pending: dict[str, Any] = {}  # header records not yet written

    # -- header records (per file, stored in batches) ---------------------------------------
    def header(self, digest: str) -> dict[str, Any] | None:
        """The record stored for a file hash, or None (missing or not trustworthy)."""
        if self._known is None:
            self._known = self._load_batches()
        record = self._pending.get(digest) or self._known.get(digest)
        if not isinstance(record, dict) or record.get("digest") != digest:
            return None
        return record

    def put_header(self, digest: str, record: dict[str, Any]) -> None:
        """Queue a record; ``flush`` writes the queued ones as one batch file."""
        self._pending[digest] = {**record, "digest": digest}
        if len(self._pending) >= BATCH_RECORDS:
            self.flush()

    def flush(self) -> None:
        """Write queued header records atomically as one batch (merging old batches)."""
        if not self._pending:
            return
        if self._known is None:
            self._known = self._load_batches()
        old = sorted(self.headers.glob("batch-*.json")) if self.headers.is_dir() else []
        merge = len(old) >= MAX_BATCHES
        records = {**self._known, **self._pending} if merge else dict(self._pending)
        data = _json_bytes({"records": records})
        name = f"batch-{hashlib.sha256(data).hexdigest()[:16]}.json"
        if self._write(self.headers / name, data) and merge:
            for path in old:
                if path.name != name:
                    with contextlib.suppress(OSError):
                        path.unlink()
        self._known.update(self._pending)
        self._pending = {}

    def _load_batches(self) -> dict[str, Any]:
        """Every record of every readable batch file; unreadable batches are skipped."""
        records: dict[str, Any] = {}
        if not self.headers.is_dir():
            return records
        for path in sorted(self.headers.glob("batch-*.json")):
            batch = self._read_json(path)
            if batch is not None and isinstance(batch.get("records"), dict):
                records.update(batch["records"])
        return records

    # -- entries (per image or volume, per preprocessing) --------------------------------
    def array(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The cached float32 array in [0, 1] of ``shape``, or None."""
        path = self._path(self.entries, key, ".npy")
        try:
            data = path.read_bytes()
        except OSError:
            return None
        array = _decode_npy(data, key)
        if array is None or array.shape != shape or array.dtype != np.float32:
            return None
        if not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            return None
        return array

    def put_array(self, key: str, array: np.ndarray) -> None:
        self._ensure_prep_note()
        self._write(self._path(self.entries, key, ".npy"), _encode_npy(array, key))

    def outcome(self, key: str) -> tuple[str, str] | None:
        """A cached quarantine (kind, detail) for an entry key, or None."""
        record = self._read_json(self._path(self.entries, key, ".json"))
        if record is None or record.get("key") != key:
            return None
        kind, detail = record.get("kind"), record.get("detail")
        if not isinstance(kind, str) or not isinstance(detail, str):
            return None
        return kind, detail

    def put_outcome(self, key: str, kind: str, detail: str) -> None:
        self._ensure_prep_note()
        record = {"key": key, "kind": kind, "detail": detail}
        self._write(self._path(self.entries, key, ".json"), _json_bytes(record))

    # -- files --------------------------------------------------------------------------
    def _path(self, folder: Path, key: str, suffix: str) -> Path:
        return folder / key[-1] / f"{key}{suffix}"  # 16 shards by the last hex digit

    def _ensure_prep_note(self) -> None:
        """Write ``key.txt`` (the readable Preprocess key) once per prep folder."""
        if self._noted:
            return
        note = self.entries / "key.txt"
        if not note.exists():
            self._write(note, (self._prep_key + "\n").encode())
        self._noted = True

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _write(self, path: Path, data: bytes) -> bool:
        """Atomic write (temporary file + rename, no fsync); failures only warn."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if path.parent not in self._made:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(path.parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._warned:
                log.warning("%s: cannot write the image cache (%s); continuing without", path, exc)
                self._warned = True
            return False


def _json_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def _checksum(body: bytes, key: str) -> bytes:
    """CRC-32 of the entry key and the .npy bytes: catches damage and misplaced files."""
    return zlib.crc32(body, zlib.crc32(key.encode())).to_bytes(4, "little")


def _encode_npy(array: np.ndarray, key: str) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    body = buffer.getvalue()
    return body + _TRAILER_MAGIC + _checksum(body, key)


def _decode_npy(data: bytes, key: str) -> np.ndarray | None:
    body, trailer = data[:-_TRAILER_SIZE], data[-_TRAILER_SIZE:]
    if len(data) <= _TRAILER_SIZE or trailer[:4] != _TRAILER_MAGIC:
        return None
    if _checksum(body, key) != trailer[4:]:
        return None
    try:
        array = np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    return array if array.flags.writeable else array.copy()
