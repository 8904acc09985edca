"""Reading a site's DICOM tree: pydicom's own test files, synthetic series, bad input."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from medfed.client.dicom_data import (
    QUARANTINE_KINDS,
    ImageItem,
    Preprocess,
    Quarantined,
    Window,
    axis_weights,
    load_images,
)
from medfed.simulations.synthetic_imaging import SITE_SYNTAXES, generate_imaging_sites

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
BUNDLED = sorted(str(p.relative_to(TEST_FILES)) for p in TEST_FILES.rglob("*") if p.is_file())
MR_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_padded.dcm",
]
LOSSY_RGB = [
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_lossy_gdcm.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "SC_rgb_jls_lossy_line.dcm",
]
COMPRESSED = {  # bundled file -> transfer syntax it exercises
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
    "693_J2KI.dcm": "1.2.840.10008.1.2.4.91",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
    "rtdose_rle.dcm": "1.2.840.10008.1.2.5",
}


def load_one(tmp_path: Path, name: str, prep: Preprocess = Preprocess(size=32, depth=4)):
    """Load a single bundled file copied alone into a fresh folder."""
    folder = tmp_path / "one" / name.replace("/", "_")
    folder.mkdir(parents=True)
    shutil.copy(TEST_FILES / name, folder / Path(name).name)
    return load_images(folder, prep)


# -- synthetic DICOM writers (tiny images, exact geometry) ------------------------------
def write_image(
    path: Path,
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    spacing: tuple[float, float] = (1.0, 1.0),
    series_uid: str = "1.2.3.4",
    position: tuple[float, float, float] | None = None,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    instance: int = 1,
    photometric: str = "MONOCHROME2",
    **extra,
) -> Path:
    """Write a single-frame uint16 image (or CT/MR slice) as DICOM Part 10."""
    sop_class = (
        CTImageStorage if modality in ("CT", "MR") else DigitalXRayImageStorageForPresentation
    )
    ds = _dataset(sop_class, pixels.shape, modality, series_uid, instance, photometric)
    ds.PixelSpacing = list(spacing)
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _dataset(sop_class, shape, modality, series_uid, instance, photometric) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(instance)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "P1", "1.2.3", series_uid
    ds.Modality, ds.InstanceNumber = modality, instance
    ds.Rows, ds.Columns = shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def write_ct_series(
    folder: Path, z: list[float], orientations: list[tuple] | None = None, size: int = 8
) -> list[Path]:
    """CT slices at positions ``z``; slice k holds the constant 100 * (k + 1)."""
    paths = []
    for k, zk in enumerate(z):
        orientation = orientations[k] if orientations else (1, 0, 0, 0, 1, 0)
        pixels = np.full((size, size), 100 * (k + 1))
        paths.append(
            write_image(
                folder / f"S{k:03d}.dcm",
                pixels,
                modality="CT",
                position=(0.0, 0.0, zk),
                orientation=orientation,
                instance=k + 1,
            )
        )
    return paths


def disc(size: int, spacing: tuple[float, float], radius_mm: float) -> np.ndarray:
    """1000 inside a disc of ``radius_mm`` at the physical centre, 0 outside."""
    rows = (np.arange(size[0]) + 0.5) * spacing[0] - size[0] * spacing[0] / 2
    cols = (np.arange(size[1]) + 0.5) * spacing[1] - size[1] * spacing[1] / 2
    return np.where(rows[:, None] ** 2 + cols[None, :] ** 2 < radius_mm**2, 1000, 0)


BINARY = Preprocess(size=32, depth=4, window=Window(center=500, width=1000))


# -- bundled files ----------------------------------------------------------------------
@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_file_loads_or_is_quarantined(tmp_path, name):
    items, quarantined = load_one(tmp_path, name)
    assert len(items) + len(quarantined) == 1
    for q in quarantined:
        assert q.kind in QUARANTINE_KINDS and q.reason.startswith(q.kind)
    for item in items:
        assert item.array.dtype == np.float32
        assert item.array.shape in ((32, 32), (4, 32, 32))
        assert np.isfinite(item.array).all() and 0 <= item.array.min() <= item.array.max() <= 1


def test_the_whole_bundled_tree_accounts_for_every_file():
    items, quarantined = load_images(TEST_FILES, Preprocess(size=8, depth=2))
    used = [f for item in items for f in item.files]
    left_out = [q.path for q in quarantined]
    assert sorted(used + left_out) == sorted(str(TEST_FILES / n) for n in BUNDLED)
    assert len(items) > 40 and any(item.is_volume for item in items)


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        ("MR_truncated.dcm", "truncated", "less than expected"),
        ("README.txt", "not DICOM", "DICM"),
        ("rtplan.dcm", "missing pixel data", ""),
        ("JPEG-lossy.dcm", "undecodable", "JPEG Extended"),
        ("meta_missing_tsyntax.dcm", "undecodable", ""),
    ],
)
def test_bad_bundled_files_get_clear_reasons(tmp_path, name, kind, words):
    items, (q,) = load_one(tmp_path, name)
    assert not items and q.kind == kind and words in q.detail
    assert Path(q.path).name == name


def test_ct_small_is_in_hounsfield_units(tmp_path):
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() < ds.pixel_array.min()  # the intercept is applied
    # 128 x 128 square pixels onto 128 x 128: resampling is the identity
    (item,), _ = load_one(tmp_path, "CT_small.dcm", Preprocess(128, window=Window(40, 400)))
    np.testing.assert_allclose(item.array, np.clip((hu + 160) / 400, 0, 1), atol=1e-6)
    (small,), _ = load_one(tmp_path / "b", "CT_small.dcm", Preprocess(32, window=Window(40, 400)))
    assert small.array.shape == (32, 32) and small.modality == "CT" and not small.is_volume
    assert small.instance_uid == ds.SOPInstanceUID and small.study_date == ds.StudyDate


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_mr_small_variants_decode_to_the_same_pixels(tmp_path, name):
    (reference,), _ = load_one(tmp_path / "ref", "MR_small.dcm")
    (item,), quarantined = load_one(tmp_path, name)
    assert not quarantined
    np.testing.assert_array_equal(item.array, reference.array)


@pytest.mark.parametrize("name", LOSSY_RGB)
def test_lossy_copies_decode_close_to_the_lossless_one(tmp_path, name):
    (reference,), _ = load_one(tmp_path / "ref", "SC_rgb_rle.dcm")
    (item,), _ = load_one(tmp_path, name)
    np.testing.assert_allclose(item.array, reference.array, atol=0.02)


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compressed_bundled_files_decode(tmp_path, name):
    assert pydicom.dcmread(TEST_FILES / name).file_meta.TransferSyntaxUID == COMPRESSED[name]
    items, quarantined = load_one(tmp_path, name)
    assert not quarantined and len(items) == 1
    assert items[0].array.std() > 0.01  # an image, not a blank


def test_quarantine_kinds_and_reasons():
    assert Quarantined("a.dcm", "truncated", "short").reason == "truncated: short"
    assert Quarantined("a.dcm", "not DICOM").reason == "not DICOM"
    with pytest.raises(ValueError, match="kind"):
        Quarantined("a.dcm", "something else")


def test_preprocess_key_names_every_parameter():
    keys = {
        Preprocess().key(),
        Preprocess(size=32).key(),
        Preprocess(depth=8).key(),
        Preprocess(window=Window(40, 400)).key(),
        Preprocess(window=Window(40, None)).key(),
    }
    assert len(keys) == 5 and Preprocess().key() == Preprocess().key()
    with pytest.raises(ValueError):
        Preprocess(size=0)


# -- series -----------------------------------------------------------------------------
def test_shuffled_slices_are_ordered_by_position_not_names_or_numbers(tmp_path):
    paths = write_ct_series(tmp_path / "s", [5.0, 7.5, 0.0, 2.5, 10.0, 12.5])  # slice k: z[k]
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    names = [f"x{i:02d}.dcm" for i in range(len(paths))]
    random.Random(1).shuffle(names)
    for path, name in zip(paths, names, strict=True):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 1 + names.index(name)  # meaningless numbers
        ds.save_as(shuffled / name)
    prep = Preprocess(size=8, depth=6, window=Window(350, 700))
    (item,), quarantined = load_images(shuffled, prep)
    assert not quarantined and item.is_volume and item.array.shape == (6, 8, 8)
    z = [5.0, 7.5, 0.0, 2.5, 10.0, 12.5]
    expected = np.array([100, 200, 300, 400, 500, 600])[np.argsort(z)] / 700
    np.testing.assert_allclose(item.array.mean(axis=(1, 2)), expected, atol=1e-5)
    by_z = sorted(zip(z, names, strict=True))
    assert [Path(f).name for f in item.files] == [name for _, name in by_z]
    assert item.instance_uid == ""


@pytest.mark.parametrize(
    ("z", "problem"),
    [
        ([0.0, 1.0, 2.0, 4.0, 5.0], "missing slice"),
        ([0.0, 1.0, 2.0, 3.3, 4.3, 5.3], "uneven spacing"),
        ([0.0, 1.0, 1.0, 2.0], "two slices at the same position"),
    ],
)
def test_inconsistent_series_are_quarantined(tmp_path, z, problem):
    paths = write_ct_series(tmp_path, z)
    items, quarantined = load_images(tmp_path, BINARY)
    assert not items and len(quarantined) == len(paths)
    assert all(q.kind == "inconsistent series" and problem in q.detail for q in quarantined)


def test_mixed_orientations_are_quarantined(tmp_path):
    orientations = [(1, 0, 0, 0, 1, 0)] * 3 + [(0, 1, 0, 0, 0, 1)]
    write_ct_series(tmp_path, [0.0, 1.0, 2.0, 3.0], orientations)
    items, quarantined = load_images(tmp_path, BINARY)
    assert not items and {q.detail.split(" (")[0] for q in quarantined} == {"mixed orientations"}


def test_a_bad_slice_quarantines_its_series_and_names_it(tmp_path):
    paths = write_ct_series(tmp_path, [0.0, 1.0, 2.0, 3.0])
    paths[2].write_bytes(paths[2].read_bytes()[:-20])  # pixel data cut short
    items, quarantined = load_images(tmp_path, BINARY)
    by_name = {Path(q.path).name: q for q in quarantined}
    assert not items and by_name["S002.dcm"].kind == "truncated"
    assert by_name["S000.dcm"].reason == "inconsistent series: slice S002.dcm is truncated"


def test_depth_resampling_keeps_the_extent(tmp_path):
    write_ct_series(tmp_path, [0.0, 2.0, 4.0, 6.0])  # 100..400 HU
    prep = Preprocess(size=8, depth=8, window=Window(250, 300))  # 100 -> 0, 400 -> 1
    (item,), _ = load_images(tmp_path, prep)
    means = item.array.mean(axis=(1, 2))
    assert item.array.shape == (8, 8, 8) and np.all(np.diff(means) >= 0)
    np.testing.assert_allclose(means[[0, -1]], [0, 1], atol=1e-6)  # ends are the end slices
    assert abs(means.mean() - 0.5) < 1e-6  # mean brightness kept


def test_multiframe_frames_are_ordered_by_plane_position(tmp_path):
    ds = _dataset(CTImageStorage, (8, 8), "CT", "1.2.9", 1, "MONOCHROME2")
    z = [3.0, 0.0, 2.0, 1.0]
    ds.NumberOfFrames = len(z)
    frames = np.stack([np.full((8, 8), 100 * (zk + 1)) for zk in z]).astype(np.uint16)
    ds.PixelData = frames.tobytes()
    shared = Dataset()
    measures, plane = Dataset(), Dataset()
    measures.PixelSpacing = [1.0, 1.0]
    plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [plane]
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for zk in z:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, zk]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    prep = Preprocess(size=8, depth=4, window=Window(250, 300))
    (item,), quarantined = load_images(tmp_path, prep)
    assert not quarantined and item.is_volume
    np.testing.assert_allclose(item.array.mean(axis=(1, 2)), [0, 1 / 3, 2 / 3, 1], atol=1e-5)


# -- pixels and geometry ----------------------------------------------------------------
def test_non_square_pixels_are_not_distorted(tmp_path):
    # 64 rows x 32 columns of 0.5 x 1.0 mm: a 32 x 32 mm field with a disc of radius 10 mm
    write_image(tmp_path / "a.dcm", disc((64, 32), (0.5, 1.0), 10.0), spacing=(0.5, 1.0))
    (item,), _ = load_images(tmp_path, BINARY)
    expected = disc((32, 32), (1.0, 1.0), 10.0) / 1000
    assert np.abs(item.array - expected).mean() < 0.02
    mask = item.array > 0.5
    assert abs(mask.any(axis=1).sum() - mask.any(axis=0).sum()) <= 1  # as tall as wide


def test_rectangular_images_are_padded_to_a_square_field(tmp_path):
    # 32 rows x 64 columns of 1 mm: a 64 mm square field, image in the middle 32 mm
    write_image(tmp_path / "a.dcm", 1000 - disc((32, 64), (1.0, 1.0), 10.0))
    (item,), _ = load_images(tmp_path, BINARY)
    assert np.all(item.array[:7] == 0) and np.all(item.array[-7:] == 0)  # background
    inner = item.array[8:-8]
    assert inner.shape == (16, 32) and inner[1:-1, :5].min() > 0.99  # kept, not stretched
    hole = item.array < 0.5
    hole[:8] = hole[-8:] = False
    assert abs(hole.any(axis=1).sum() - hole.any(axis=0).sum()) <= 1


def test_axis_weights_are_identity_on_matching_grids_and_keep_means():
    np.testing.assert_allclose(axis_weights(16, 0.5, 8.0, 16), np.eye(16), atol=1e-7)
    shrink = axis_weights(256, 1.0, 256.0, 64)
    np.testing.assert_allclose(shrink.sum(axis=1), 1, atol=1e-6)
    padded = axis_weights(32, 1.0, 64.0, 32)
    assert padded[:7].sum() == 0 and padded[-7:].sum() == 0  # (the filter blurs one cell)
    np.testing.assert_allclose(padded[9:-9].sum(axis=1), 1, atol=1e-6)


def test_monochrome1_is_inverted_and_header_window_used(tmp_path):
    pixels = np.tile(np.arange(0, 1600, 100), (16, 1))
    window = {"WindowCenter": 800, "WindowWidth": 1600}
    write_image(tmp_path / "a" / "m2.dcm", pixels, **window)
    write_image(tmp_path / "b" / "m1.dcm", pixels, photometric="MONOCHROME1", **window)
    prep = Preprocess(size=16)
    (m2,), _ = load_images(tmp_path / "a", prep)
    (m1,), _ = load_images(tmp_path / "b", prep)
    np.testing.assert_allclose(m2.array[0], pixels[0] / 1600, atol=1e-6)
    np.testing.assert_allclose(m1.array, 1 - m2.array, atol=1e-6)


def test_identity_removed_needs_the_flag_and_a_method(tmp_path):
    pixels = np.zeros((8, 8))
    write_image(tmp_path / "a.dcm", pixels, series_uid="1.1")
    write_image(tmp_path / "b.dcm", pixels, series_uid="1.2", PatientIdentityRemoved="YES")
    write_image(
        tmp_path / "c.dcm",
        pixels,
        series_uid="1.3",
        PatientIdentityRemoved="YES",
        DeidentificationMethod="medfed deid v1",
    )
    items, _ = load_images(tmp_path, BINARY)
    assert {Path(i.files[0]).name: i.identity_removed for i in items} == {
        "a.dcm": False,
        "b.dcm": False,
        "c.dcm": True,
    }


# -- synthetic sites --------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["xray", "ct"])
def test_every_site_syntax_gives_the_same_arrays(tmp_path, modality):
    kwargs = dict(seed=6, patients_per_site=3, image_size=32, slices=4)
    results = []
    for syntax in SITE_SYNTAXES:
        (site,) = generate_imaging_sites(
            modality, 1, tmp_path / syntax, transfer_syntax=syntax, **kwargs
        )
        items, quarantined = load_images(site / "dicom", Preprocess(size=16, depth=4))
        assert not quarantined and len(items) == 3
        results.append(items)
    for items in results[1:]:
        for a, b in zip(results[0], items, strict=True):
            assert a.files != b.files and a.series_uid == b.series_uid
            np.testing.assert_array_equal(a.array, b.array)


@pytest.mark.parametrize("syntax", SITE_SYNTAXES)
def test_pixel_data_cut_short_is_truncated_in_every_syntax(tmp_path, syntax):
    (site,) = generate_imaging_sites(
        "xray", 1, tmp_path, seed=6, patients_per_site=2, image_size=32, transfer_syntax=syntax
    )
    first = sorted((site / "dicom").rglob("*.dcm"))[0]
    first.write_bytes(first.read_bytes()[:-200])
    items, quarantined = load_images(site / "dicom", Preprocess(size=16))
    assert len(items) == 1
    assert [(Path(q.path), q.kind) for q in quarantined] == [(first, "truncated")]


def test_items_are_sorted_and_progress_is_reported(tmp_path):
    sites = generate_imaging_sites("xray", 2, tmp_path, seed=2, patients_per_site=4)
    for site in sites:  # a second tree-walk order must not matter
        shutil.copytree(site / "dicom", tmp_path / "all", dirs_exist_ok=True)
    calls: list[tuple[int, int]] = []
    items, quarantined = load_images(
        tmp_path / "all", Preprocess(size=16), progress=lambda d, t: calls.append((d, t))
    )
    assert not quarantined and len(items) == 8
    keys = [(i.patient_id, i.study_uid, i.series_uid, i.instance_uid) for i in items]
    assert keys == sorted(keys)
    assert calls == [(k, 8) for k in range(1, 9)]
    assert all(isinstance(i, ImageItem) and not i.identity_removed for i in items)


def test_ct_site_gives_one_volume_per_patient(tmp_path):
    (site,) = generate_imaging_sites(
        "ct", 1, tmp_path, seed=5, patients_per_site=2, slices=6, image_size=32
    )
    items, quarantined = load_images(site / "dicom", Preprocess(size=16, depth=8))
    assert not quarantined and [len(i.files) for i in items] == [6, 6]
    assert all(i.array.shape == (8, 16, 16) and i.modality == "CT" for i in items)


def test_volume_without_any_window_uses_the_range_of_all_slices(tmp_path):
    write_ct_series(tmp_path, [0.0, 1.0, 2.0, 3.0], size=8)  # 100..400 HU, no window
    (item,), _ = load_images(tmp_path, Preprocess(size=8, depth=4))
    np.testing.assert_allclose(item.array.mean(axis=(1, 2)), [0, 1 / 3, 2 / 3, 1], atol=1e-6)


def test_unwindowed_padding_stays_background_in_volumes(tmp_path):
    for k in range(3):  # 4 rows x 8 columns: half of the square field is padding
        pixels = np.full((4, 8), 100 * (k + 1))
        pixels[:, :4] += 50
        write_image(
            tmp_path / f"S{k}.dcm",
            pixels,
            modality="CT",
            position=(0.0, 0.0, float(k)),
            instance=k + 1,
            photometric="MONOCHROME1",
        )
    (item,), _ = load_images(tmp_path, Preprocess(size=8, depth=3))
    assert np.all(item.array[:, :2] == 0) and np.all(item.array[:, -2:] == 0)
    assert item.array[:, 3:5].min() >= 0 and item.array[0, 4, 6] > item.array[2, 4, 6]
