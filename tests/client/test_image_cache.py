"""The preprocessing cache: later passes never parse DICOM, and nothing stale is served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfed.client import dicom_data, image_cache
from medfed.client.dicom_data import Preprocess, Window, load_images
from medfed.client.image_cache import ImageCache, content_hash
from medfed.simulations.synthetic_imaging import generate_imaging_sites

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
PREP = Preprocess(size=16, depth=4)


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    """Radiographs of every site syntax, one CT series per patient, and bad files."""
    root = tmp_path_factory.mktemp("tree")
    for site in generate_imaging_sites("xray", 4, root / "x", seed=1, patients_per_site=2):
        shutil.copytree(site / "dicom", root / "tree" / site.name)
    (ct,) = generate_imaging_sites(
        "ct", 1, root / "c", seed=2, patients_per_site=2, slices=4, image_size=32
    )
    shutil.copytree(ct / "dicom", root / "tree" / "ct")
    for name in ("MR_truncated.dcm", "README.txt", "rtplan.dcm", "JPEG-lossy.dcm"):
        shutil.copy(TEST_FILES / name, root / "tree" / name)
    return root / "tree"


@pytest.fixture
def tree(tmp_path, source_tree) -> Path:
    shutil.copytree(source_tree, tmp_path / "dicom")
    return tmp_path / "dicom"


@pytest.fixture
def count_reads(monkeypatch):
    """Count pydicom.dcmread calls (and let them through)."""
    calls: list[int] = []
    original = pydicom.dcmread

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return calls


def forbid_reads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("dcmread called on a cached pass")

    monkeypatch.setattr(pydicom, "dcmread", refuse)


def same(a, b) -> None:
    items_a, quarantined_a = a
    items_b, quarantined_b = b
    assert items_a == items_b and quarantined_a == quarantined_b
    for x, y in zip(items_a, items_b, strict=True):
        np.testing.assert_array_equal(x.array, y.array)


def test_cached_pass_is_identical_and_never_parses_dicom(tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    uncached = load_images(tree, PREP)
    first = load_images(tree, PREP, cache)
    same(first, uncached)
    items, quarantined = first
    assert len(items) == 10 and sum(i.is_volume for i in items) == 2
    assert {q.kind for q in quarantined} == {
        "truncated",
        "not DICOM",
        "missing pixel data",
        "undecodable",
    }
    forbid_reads(monkeypatch)
    same(load_images(tree, PREP, cache), first)


def test_changed_file_content_is_decoded_again(tree, tmp_path, count_reads):
    cache = tmp_path / "cache"
    before, _ = load_images(tree, PREP, cache)
    changed = next(i for i, item in enumerate(before) if not item.is_volume)
    target = Path(before[changed].files[0])
    ds = pydicom.dcmread(target)
    ds.PixelData = (ds.pixel_array // 2).astype(np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 200, 400
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(target)
    count_reads.clear()
    after, _ = load_images(tree, PREP, cache)
    assert len(count_reads) == 1  # only the changed file is parsed
    for i, (a, b) in enumerate(zip(after, before, strict=True)):
        assert np.array_equal(a.array, b.array) == (i != changed)


def test_changed_slice_rebuilds_its_volume(tree, tmp_path, count_reads):
    cache = tmp_path / "cache"
    before, _ = load_images(tree, PREP, cache)
    volume = next(i for i in before if i.is_volume)
    target = Path(volume.files[1])
    ds = pydicom.dcmread(target)
    ds.PixelData = np.zeros_like(ds.pixel_array).astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(target)
    count_reads.clear()
    after, _ = load_images(tree, PREP, cache)
    rebuilt = next(i for i in after if i.series_uid == volume.series_uid)
    assert not np.array_equal(rebuilt.array, volume.array)
    assert len(count_reads) == len(volume.files)  # the changed slice + its series' others


def test_changed_preprocess_is_not_served_from_the_cache(tree, tmp_path, count_reads):
    cache = tmp_path / "cache"
    load_images(tree, PREP, cache)
    count_reads.clear()
    windowed = Preprocess(size=16, depth=4, window=Window(40, 400))
    items, _ = load_images(tree, windowed, cache)
    assert count_reads  # decoded again
    same((items, []), (load_images(tree, windowed)[0], []))
    bigger, _ = load_images(tree, Preprocess(size=24, depth=4), cache)
    assert {i.array.shape for i in bigger} == {(24, 24), (4, 24, 24)}


@pytest.mark.parametrize("damage", ["garbage", "flip", "truncate", "swapped"])
def test_corrupt_arrays_are_recomputed(tree, tmp_path, count_reads, damage):
    cache = tmp_path / "cache"
    first, _ = load_images(tree, PREP, cache)
    arrays = sorted(cache.rglob("*.npy"))
    assert len(arrays) == len(first)
    for path in arrays:
        data = path.read_bytes()
        if damage == "garbage":
            path.write_bytes(b"\0" * len(data))
        elif damage == "flip":
            path.write_bytes(data[:-20] + bytes([data[-20] ^ 0xFF]) + data[-19:])
        elif damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        else:
            shutil.copy(arrays[-1] if path != arrays[-1] else arrays[0], path)
    count_reads.clear()
    again, _ = load_images(tree, PREP, cache)
    assert count_reads
    for a, b in zip(again, first, strict=True):
        np.testing.assert_array_equal(a.array, b.array)


def test_corrupt_header_batches_are_rebuilt(tree, tmp_path, monkeypatch, count_reads):
    cache = tmp_path / "cache"
    first = load_images(tree, PREP, cache)
    (batch,) = cache.rglob("batch-*.json")
    batch.write_text("{not json")
    count_reads.clear()
    same(load_images(tree, PREP, cache), first)
    assert count_reads  # every header parsed again
    forbid_reads(monkeypatch)
    same(load_images(tree, PREP, cache), first)


def test_bad_header_records_are_rebuilt(tree, tmp_path, monkeypatch, count_reads):
    cache = tmp_path / "cache"
    first = load_images(tree, PREP, cache)
    (batch,) = cache.rglob("batch-*.json")
    records = json.loads(batch.read_text())["records"]
    digests = sorted(records)
    records[digests[0]]["digest"] = "someone else"
    records[digests[1]] = {"digest": digests[1], "header": {"rows": "many"}}
    del records[digests[2]]
    batch.write_text(json.dumps({"records": records}))
    count_reads.clear()
    same(load_images(tree, PREP, cache), first)
    assert len(count_reads) >= 3
    forbid_reads(monkeypatch)
    same(load_images(tree, PREP, cache), first)


def test_header_batches_are_merged(tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache, "MAX_BATCHES", 2)
    for i in range(5):
        cache = ImageCache(tmp_path, "prep", environment="env")
        cache.put_header(content_hash(bytes([i])), {"header": {"i": i}})
        cache.flush()
    batches = list(tmp_path.rglob("batch-*.json"))
    assert len(batches) <= 2
    cache = ImageCache(tmp_path, "prep", environment="env")
    assert [cache.header(content_hash(bytes([i])))["header"]["i"] for i in range(5)] == list(
        range(5)
    )


def test_cache_inside_the_tree_is_not_scanned(tree, monkeypatch):
    first = load_images(tree, PREP, tree / ".medfed-cache")
    forbid_reads(monkeypatch)
    same(load_images(tree, PREP, tree / ".medfed-cache"), first)


def test_image_cache_round_trip_and_checks(tmp_path):
    cache = ImageCache(tmp_path, "prep-a", environment="env1")
    array = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    cache.put_array("i" + "ab" * 32, array)
    np.testing.assert_array_equal(cache.array("i" + "ab" * 32, (4, 4)), array)
    assert cache.array("i" + "ab" * 32, (2, 8)) is None
    assert cache.array("i" + "cd" * 32, (4, 4)) is None
    assert np.load(next(tmp_path.rglob("*.npy"))).shape == (4, 4)  # still a .npy file
    cache.put_outcome("s1", "truncated", "short")
    assert cache.outcome("s1") == ("truncated", "short")
    digest = content_hash(b"file")
    cache.put_header(digest, {"header": {"x": 1}})
    cache.flush()
    assert ImageCache(tmp_path, "prep-a", environment="env1").header(digest)["header"] == {"x": 1}
    other_prep = ImageCache(tmp_path, "prep-b", environment="env1")
    other_env = ImageCache(tmp_path, "prep-a", environment="env2")
    assert other_prep.array("i" + "ab" * 32, (4, 4)) is None
    assert other_env.array("i" + "ab" * 32, (4, 4)) is None and other_env.header(digest) is None


def test_unwritable_cache_only_warns(tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    cache = ImageCache(blocker, "prep", environment="env")
    cache.put_array("i00", np.zeros((2, 2), np.float32))
    assert cache.array("i00", (2, 2)) is None
    assert "cannot write the image cache" in caplog.text


# -- chunked arrays (large trees) and the plain pixel decoding ----------------------------
def chunk_files(cache: Path) -> list[Path]:
    return sorted(cache.rglob("chunk-*.npc"))


def test_large_trees_store_arrays_in_chunks(tree, tmp_path, monkeypatch, count_reads):
    monkeypatch.setattr(dicom_data, "CHUNK_MIN_FILES", 1)  # the test tree counts as large
    cache = tmp_path / "cache"
    uncached = load_images(tree, PREP)
    first = load_images(tree, PREP, cache)
    same(first, uncached)
    assert not list(cache.rglob("*.npy")) and len(chunk_files(cache)) == 1
    count_reads.clear()
    same(load_images(tree, PREP, cache), first)
    assert not count_reads  # every array came from the chunk


def test_damaged_chunks_are_recomputed(tree, tmp_path, monkeypatch, count_reads):
    monkeypatch.setattr(dicom_data, "CHUNK_MIN_FILES", 1)
    cache = tmp_path / "cache"
    first = load_images(tree, PREP, cache)
    (chunk,) = chunk_files(cache)
    data = bytearray(chunk.read_bytes())
    data[200] ^= 0xFF  # inside the first entry: that one array is a miss
    chunk.write_bytes(bytes(data))
    count_reads.clear()
    same(load_images(tree, PREP, cache), first)
    assert count_reads
    count_reads.clear()
    same(load_images(tree, PREP, cache), first)  # the recomputed array was stored again
    assert not count_reads
    for path in chunk_files(cache):
        path.write_bytes(path.read_bytes()[:-3])  # a damaged footer: the index is not trusted
    count_reads.clear()
    same(load_images(tree, PREP, cache), first)
    assert count_reads
    assert len(chunk_files(cache)) == 1  # damaged chunks deleted, a new one written
    forbid_reads(monkeypatch)
    same(load_images(tree, PREP, cache), first)


def test_image_cache_chunks_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache, "CHUNK_BYTES", 3 * 64 + 200)  # about 2 arrays a chunk
    cache = ImageCache(tmp_path, "prep", environment="env", chunked=True)
    arrays = {f"i{i:064x}": np.full((4, 4), i / 10, np.float32) for i in range(5)}
    for key, array in arrays.items():
        cache.put_array(key, array)
        np.testing.assert_array_equal(cache.array(key, (4, 4)), array)  # before any flush
    cache.flush()
    assert not list(tmp_path.rglob("*.npy")) and len(chunk_files(tmp_path)) >= 2
    again = ImageCache(tmp_path, "prep", environment="env")
    for key, array in arrays.items():
        np.testing.assert_array_equal(again.array(key, (4, 4)), array)
        assert again.array(key, (2, 8)) is None
    assert (
        ImageCache(tmp_path, "prep-b", environment="env").array(next(iter(arrays)), (4, 4)) is None
    )
