"""Reading a site's DICOM tree: pydicom's own test files, synthetic series, bad input."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfed.client.dicom_data import Window, group_by_patient, load_series, scan_tree
from medfed.simulations.synthetic_imaging import generate_imaging_sites

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
BUNDLED = sorted(p.name for p in TEST_FILES.glob("*.dcm"))


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_file_loads_or_is_quarantined(tmp_path, name):
    shutil.copy(TEST_FILES / name, tmp_path / name)
    series, quarantined = scan_tree(tmp_path)
    loaded = 0
    for s in series:
        array, more = load_series(s, 16)
        quarantined += more
        if array is not None:
            loaded += 1
            assert np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1
    assert loaded + len(quarantined) >= 1
    assert all(q.reason for q in quarantined)


def test_ct_small_in_hounsfield_units(tmp_path):
    shutil.copy(TEST_FILES / "CT_small.dcm", tmp_path)
    (series,), quarantined = scan_tree(tmp_path)
    assert not quarantined and series.modality == "CT"
    ds = series.files[0][1]
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    assert ds.RescaleIntercept != 0 and hu.min() < ds.pixel_array.min()
    image, _ = load_series(series, 32, Window(center=40, width=400))
    assert image.shape == (32, 32)


def test_truncated_and_non_dicom_files_are_quarantined_with_reasons(tmp_path):
    shutil.copy(TEST_FILES / "MR_truncated.dcm", tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    series, quarantined = scan_tree(tmp_path)
    reasons = {Path(q.path).name: q.reason for q in quarantined}
    assert reasons["notes.txt"] == "not DICOM"
    for s in series:
        array, more = load_series(s, 16)
        assert array is None and "truncated" in more[0].reason


@pytest.fixture
def ct_site(tmp_path) -> Path:
    (site,) = generate_imaging_sites(
        "ct", 1, tmp_path, seed=5, patients_per_site=1, slices=8, image_size=32
    )
    return site


def test_shuffled_files_are_ordered_by_position(ct_site, tmp_path):
    files = sorted((ct_site / "dicom").rglob("*.dcm"))
    reference, _ = load_series(scan_tree(ct_site / "dicom")[0][0], 32)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    names = [f"x{i:02d}.dcm" for i in range(len(files))]
    random.Random(1).shuffle(names)
    for f, name in zip(files, names, strict=True):
        shutil.copy(f, shuffled / name)
    (series,), _ = scan_tree(shuffled)
    volume, problems = load_series(series, 32)
    assert not problems and volume.shape == (8, 32, 32)
    np.testing.assert_allclose(volume, reference)


def test_missing_slice_quarantines_the_series(ct_site):
    files = sorted((ct_site / "dicom").rglob("*.dcm"))
    files[4].unlink()
    (series,), _ = scan_tree(ct_site / "dicom")
    volume, problems = load_series(series, 32)
    assert volume is None and "missing slice" in problems[0].reason


def test_series_are_grouped_by_patient(tmp_path):
    sites = generate_imaging_sites("xray", 1, tmp_path, seed=2, patients_per_site=5)
    series, quarantined = scan_tree(sites[0] / "dicom")
    assert not quarantined
    grouped = group_by_patient(series)
    assert len(grouped) == 5 and all(len(v) == 1 for v in grouped.values())
    for s in series:  # MONOCHROME1 and compressed files included
        image, problems = load_series(s, 24)
        assert not problems and image.shape == (24, 24)
