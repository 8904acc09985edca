"""A site-local cache of decoded, preprocessed DICOM images, keyed by file content.

Decoding DICOM (JPEG 2000 above all) costs far more than reading the bytes, and a site
reads the same files every round and every run. The cache stores, under ``root``:

- one *header record* per file: the header fields needed to group and order files, or
  the reason the file was quarantined. Keyed by the SHA-256 of the file's bytes only, so
  a later pass reads and hashes each file but never parses it again. The records sit in
  a folder named by the caller's *header key* (``dicom_data.header_key()``: a version
  and the record's field names), so records of an older shape (before Patient's Sex and
  Age were read, say) are never mistaken for current ones: they are simply not found.
  The records of a pass are written together as one JSON batch file at its end
  (``flush``; creating a file per record cost more than parsing the header), and
  batches are merged into one when there are more than ``MAX_BATCHES`` or when a record
  replaces one on disk;
- one *entry* per image or volume and preprocessing: the array (``.npy``) or the reason
  it could not be decoded (``.json``). Keyed by the content hash of the source file(s)
  and, through the folder, by ``Preprocess.key()``. Arrays are written one ``.npy`` file
  each, or, by a cache opened with ``chunked=True`` (``load_images`` does so for trees of
  ``dicom_data.CHUNK_MIN_FILES`` files or more), collected into *chunk* files of up to
  ``CHUNK_BYTES`` written at ``flush``: a first pass over a tree stores thousands of
  arrays, and creating a file can cost more than decoding a small image (0.03-1.5 ms
  per new file on the development machine's ext4, more on network shares). A chunk
  holds the same entry bytes as the ``.npy`` files (each with its own trailer) and ends
  with a JSON index (key -> offset, length) and a footer (index length, CRC-32 of the
  index, magic); a later pass reads a chunk whole, once. Reads look in both.

Layout (``<env>`` names the decoder versions, so that installing or upgrading a pixel
data plugin never serves a stale result; an old ``<env>`` folder can simply be deleted)::

    <root>/v1-<env>/headers-<hash of the header key>/batch-<hash of the content>.json
                                                     {"records": {sha256: ...}}
    <root>/v1-<env>/prep-<hash of Preprocess.key()>/key.txt
    <root>/v1-<env>/prep-<hash of Preprocess.key()>/<a>/<entry key>.npy | .json
    <root>/v1-<env>/prep-<hash of Preprocess.key()>/chunks/chunk-<hash of the content>.npc

Nothing in the cache is trusted blindly: a batch must parse, a record must name its own
hash (and pass ``Header.from_record``'s checks in ``dicom_data``), an array entry carries
a CRC-32 of its key and bytes in an 8-byte trailer after the ``.npy`` data (``np.load``
still reads a single file) and must have the expected shape, dtype and value range, a
chunk's index must pass its CRC-32 and bounds checks; anything else is treated as a
miss, recomputed and stored again (a chunk whose index fails is deleted). Writes go to a
temporary file and are renamed into place, so a crash never leaves a half-written entry
or chunk. They are not fsynced: the cache is derived data and every entry is verified on
read, while an fsync per entry would cost more than decoding the image. A cache that
cannot be written (full disk, read-only folder) only logs a warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import threading
import zlib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

#: The cache's folder inside a site directory (`medfed data deid` never copies it).
CACHE_DIR_NAME = ".medfed-cache"
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
CHUNK_BYTES = 64 << 20  # collected arrays are written as a chunk once they reach this
_CHUNK_MAGIC = b"MFCK"
_CHUNK_FOOTER = 16  # index length (8 bytes), CRC-32 of the index (4), magic (4)
_NPY_HEADERS: dict[tuple[int, ...], bytes] = {}  # .npy header bytes per float32 shape
log = logging.getLogger(__name__)


def content_hash(data: bytes) -> str:
    """SHA-256 of a file's bytes (hex): the cache key of everything derived from it."""
    return hashlib.sha256(data).hexdigest()


def combined_hash(digests: list[str]) -> str:
    """One key for an ordered list of file hashes (a series)."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


@functools.cache
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
    """Header records and preprocessed arrays of one preprocessing, under ``root``.

    ``header_key`` names the shape of the header records (see the module docstring).
    """

    def __init__(
        self,
        root: Path,
        prep_key: str,
        environment: str | None = None,
        chunked: bool = False,
        header_key: str = "",
    ) -> None:
        self.base = Path(root) / f"{CACHE_FORMAT}-{environment or decoder_environment()}"
        header_folder = hashlib.sha256(header_key.encode()).hexdigest()[:16]
        self.headers = self.base / f"headers-{header_folder}"
        self.entries = self.base / f"prep-{hashlib.sha256(prep_key.encode()).hexdigest()[:16]}"
        self._prep_key = prep_key
        self._entry_folder = os.fspath(self.entries)
        self._made: set[str] = set()
        self._warned = False
        self._noted = False
        self._known: dict[str, Any] | None = None  # header records on disk, read lazily
        self._pending: dict[str, Any] = {}  # header records not yet written
        self._listed: set[str] | None = None  # "<shard>/<name>" of entry files, listed lazily
        self._chunked = chunked  # put_array collects arrays for chunk files
        self._collected: dict[str, bytes] = {}  # encoded arrays for the next chunk
        self._collected_bytes = 0
        self._chunks: dict[str, list[tuple[str, int, int]]] | None = None  # key -> places
        self._chunk_read: tuple[str, bytes] | None = None  # the last chunk read, whole

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
        """Write the collected arrays as a chunk and the queued header records as one
        batch (merging old batches), each atomically."""
        self._write_chunk()
        if not self._pending:
            return
        if self._known is None:
            self._known = self._load_batches()
        old = sorted(self.headers.glob("batch-*.json")) if self.headers.is_dir() else []
        # A record that replaces one on disk (rebuilt because it failed a check) must not
        # sit beside it: batches are read in name order, so the stale one could win.
        replaced = any(digest in self._known for digest in self._pending)
        merge = len(old) >= MAX_BATCHES or replaced
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
        for data in self._stored_arrays(key):
            array = _decode_npy(data, key, shape)
            if array is None or array.shape != shape or array.dtype != np.float32:
                continue
            if np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0:
                return array
        return None

    def put_array(self, key: str, array: np.ndarray) -> None:
        """Store an array: as a single ``.npy`` file, or collected for the next chunk."""
        self._ensure_prep_note()
        data = _encode_npy(array, key)
        if not self._chunked:
            self._put(self._name(key, ".npy"), data)
            return
        self._collected_bytes += len(data) - len(self._collected.get(key, b""))
        self._collected[key] = data
        if self._collected_bytes >= CHUNK_BYTES:
            self._write_chunk()

    def _stored_arrays(self, key: str) -> Iterator[bytes]:
        """The stored bytes of an array entry, wherever kept (not yet checked)."""
        if key in self._collected:
            yield self._collected[key]
        name = self._name(key, ".npy")
        if self._may_exist(name):
            try:
                with open(os.path.join(self._entry_folder, name), "rb") as file:
                    yield file.read()
            except OSError:
                pass
        if self._chunks is None:
            self._chunks = self._load_chunks()
        for path, offset, length in self._chunks.get(key, ()):
            if self._chunk_read is None or self._chunk_read[0] != path:
                try:
                    with open(path, "rb") as file:
                        self._chunk_read = (path, file.read())
                except OSError:
                    continue
            yield self._chunk_read[1][offset : offset + length]

    # -- chunks -------------------------------------------------------------------------
    def _write_chunk(self) -> None:
        """Write the collected arrays as one chunk file (atomically)."""
        if not self._collected:
            return
        body = bytearray(_CHUNK_MAGIC)
        index: dict[str, list[int]] = {}
        for key, data in self._collected.items():
            index[key] = [len(body), len(data)]
            body += data
        table = _json_bytes({"entries": index})
        body += table + len(table).to_bytes(8, "little") + _crc(table) + _CHUNK_MAGIC
        name = f"chunk-{hashlib.sha256(body).hexdigest()[:16]}.npc"
        path = os.path.join(self._entry_folder, "chunks", name)
        if self._write(path, body) and self._chunks is not None:
            for key, (offset, length) in index.items():
                self._chunks.setdefault(key, []).insert(0, (path, offset, length))
        self._collected, self._collected_bytes = {}, 0

    def _load_chunks(self) -> dict[str, list[tuple[str, int, int]]]:
        """Where each key lies in the chunk files; chunks with a damaged index are deleted
        (they are renamed into place whole, so none is half-written)."""
        places: dict[str, list[tuple[str, int, int]]] = {}
        folder = os.path.join(self._entry_folder, "chunks")
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return places
        for name in names:
            if not (name.startswith("chunk-") and name.endswith(".npc")):
                continue
            path = os.path.join(folder, name)
            index = _read_chunk_index(path)
            if index is None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            for key, (offset, length) in index.items():
                places.setdefault(key, []).append((path, offset, length))
        return places

    def outcome(self, key: str) -> tuple[str, str] | None:
        """A cached quarantine (kind, detail) for an entry key, or None."""
        name = self._name(key, ".json")
        path = os.path.join(self._entry_folder, name)
        record = self._read_json(path) if self._may_exist(name) else None
        if record is None or record.get("key") != key:
            return None
        kind, detail = record.get("kind"), record.get("detail")
        if not isinstance(kind, str) or not isinstance(detail, str):
            return None
        return kind, detail

    def put_outcome(self, key: str, kind: str, detail: str) -> None:
        self._ensure_prep_note()
        record = {"key": key, "kind": kind, "detail": detail}
        self._put(self._name(key, ".json"), _json_bytes(record))

    # -- files --------------------------------------------------------------------------
    @staticmethod
    def _name(key: str, suffix: str) -> str:
        """An entry file's path inside the prep folder: 16 shards by the last hex digit."""
        return f"{key[-1]}/{key}{suffix}"

    def _ensure_prep_note(self) -> None:
        """Write ``key.txt`` (the readable Preprocess key) once per prep folder."""
        if self._noted:
            return
        note = self.entries / "key.txt"
        if not note.exists():
            self._write(note, (self._prep_key + "\n").encode())
        self._noted = True

    def _may_exist(self, name: str) -> bool:
        """False when the entry file (``_name``) was not there when the prep folder was
        first listed, nor written since: one listing per cache object instead of a failed
        open per miss (a cold pass asks for every entry before writing it)."""
        if self._listed is None:
            self._listed = set()
            with contextlib.suppress(OSError), os.scandir(self._entry_folder) as shards:
                for shard in shards:
                    with contextlib.suppress(OSError):
                        if len(shard.name) == 1 and shard.is_dir(follow_symlinks=False):
                            self._listed.update(f"{shard.name}/{n}" for n in os.listdir(shard))
        return name in self._listed

    def _put(self, name: str, data: bytes) -> None:
        """Write an entry file (``_name``) into the prep folder."""
        if self._write(os.path.join(self._entry_folder, name), data) and self._listed is not None:
            self._listed.add(name)

    @staticmethod
    def _read_json(path: str | Path) -> dict[str, Any] | None:
        try:
            with open(path, "rb") as file:
                record = json.loads(file.read())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _write(self, path: str | Path, data: bytes) -> bool:
        """Atomic write (temporary file + rename, no fsync); failures only warn."""
        folder, name = os.path.split(os.fspath(path))
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if folder not in self._made:
                os.makedirs(folder, exist_ok=True)
                self._made.add(folder)
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
                os.unlink(tmp)
            if not self._warned:
                log.warning("%s: cannot write the image cache (%s); continuing without", path, exc)
                self._warned = True
            return False


def _json_bytes(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def _crc(data: bytes) -> bytes:
    return zlib.crc32(data).to_bytes(4, "little")


def _read_chunk_index(path: str) -> dict[str, tuple[int, int]] | None:
    """A chunk's index (key -> offset, length), or None if it fails any check."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            if size < len(_CHUNK_MAGIC) + _CHUNK_FOOTER:
                return None
            file.seek(size - _CHUNK_FOOTER)
            footer = file.read(_CHUNK_FOOTER)
            length = int.from_bytes(footer[:8], "little")
            end = size - _CHUNK_FOOTER - length  # where the entries end
            if footer[12:] != _CHUNK_MAGIC or end < len(_CHUNK_MAGIC):
                return None
            file.seek(0)
            if file.read(len(_CHUNK_MAGIC)) != _CHUNK_MAGIC:
                return None
            file.seek(end)
            table = file.read(length)
        if _crc(table) != footer[8:12]:
            return None
        entries = json.loads(table)["entries"]
        index = {}
        for key, (offset, count) in entries.items():
            if not (isinstance(key, str) and isinstance(offset, int) and isinstance(count, int)):
                return None
            if not len(_CHUNK_MAGIC) <= offset <= offset + count <= end:
                return None
            index[key] = (offset, count)
        return index
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _checksum(body: bytes, key: str) -> bytes:
    """CRC-32 of the entry key and the .npy bytes: catches damage and misplaced files."""
    return zlib.crc32(body, zlib.crc32(key.encode())).to_bytes(4, "little")


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes for a C-order float32 array of ``shape``."""
    header = _NPY_HEADERS.get(shape)
    if header is None:  # computed once per shape
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, np.float32), allow_pickle=False)
        header = buffer.getvalue()[: buffer.tell() - 4 * int(np.prod(shape))]
        _NPY_HEADERS[shape] = header
    return header


def _encode_npy(array: np.ndarray, key: str) -> bytes:
    """``np.save``'s bytes of the float32 array, then the trailer (magic, CRC-32)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    body = _npy_header(array.shape) + array.tobytes()
    return body + _TRAILER_MAGIC + _checksum(body, key)


def _decode_npy(data: bytes, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
    """The array of an entry whose trailer checks out, or None. With the ``shape``
    expected, a body that starts with ``np.save``'s header for it is read directly."""
    body, trailer = data[:-_TRAILER_SIZE], data[-_TRAILER_SIZE:]
    if len(data) <= _TRAILER_SIZE or trailer[:4] != _TRAILER_MAGIC:
        return None
    if _checksum(body, key) != trailer[4:]:
        return None
    if shape is not None:
        header = _npy_header(shape)
        if len(body) == len(header) + 4 * int(np.prod(shape)) and body.startswith(header):
            return np.frombuffer(body, np.float32, offset=len(header)).reshape(shape).copy()
    try:
        array = np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    return array if array.flags.writeable else array.copy()
